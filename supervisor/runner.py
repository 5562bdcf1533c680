"""The mechanics of one attempt: start a fresh torchrun, watch it, stop it.

The loop (``supervisor.loop``) decides; this module only acts and observes. Each ``poll`` is
cheap: ``Popen.poll`` of torchrun plus a psutil look at the workers; heartbeat files are read
every ``heartbeat_interval``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from runcontract import env as env_names
from runcontract.events import EventType
from runcontract.exit_codes import TrainerExit
from runcontract.heartbeat import Phase
from supervisor.activity import STOPPED_STATES, ActivityMonitor
from supervisor.attempt import Failure, Hang, Observation, Outcome, StopReport
from supervisor.config import BUILTIN_TRAINER, PROJECT_ROOT, LaunchConfig
from supervisor.failure_history import read_failure_history
from supervisor.heartbeat import HeartbeatMonitor
from supervisor.logcap import LogCap
from supervisor.proctree import AttemptTree, Worker, start_in_new_session
from supervisor.standby import BASE_PRELOAD, STANDBY_DIR, Standby
from supervisor.standby import TRAINER_PRELOAD as BUILTIN_PRELOAD

# torchrun reaps its workers on this interval. The supervisor polls faster, so it usually sees
# a dead worker as a zombie and reads its exit status before torchrun reaps it.
TORCHRUN_MONITOR_INTERVAL = "1"
# Seconds between looks for new processes under torchrun once every worker is known.
TREE_WALK_INTERVAL = 1.0
# Seconds between looks at the size of the workers' log files.
LOG_CHECK_INTERVAL = 1.0
# Seconds an attempt trains (from its first completed step; for a script without heartbeats,
# from its workers' start) before the next attempt's standby starts: its imports then never slow
# this attempt's own start, and a short run (a test, a smoke run) pays nothing for one.
STANDBY_DELAY = 5.0
# Standbys that may die while waiting before the run gives up on them.
MAX_STANDBY_LOSSES = 2

_EXITCODE_PID = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")
_FAILED_LINE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


class TorchrunRunner:
    """Runs attempts as fresh ``torchrun --max-restarts 0`` processes."""

    def __init__(self, config: LaunchConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.tree: AttemptTree | None = None
        self.monitor: HeartbeatMonitor | None = None
        self.activity: ActivityMonitor | None = None
        """Watches the process table while no rank has written a heartbeat."""
        self.attempt = 0
        self._failure: Failure | None = None
        self._early_leaver: Worker | None = None
        """A rank gone without "done" while the attempt still ran (see ``_judge_exit``)."""
        self._next_heartbeat_read = 0.0
        self._next_tree_walk = 0.0
        self._next_log_check = 0.0
        self.logcap: LogCap | None = None
        self._announced_workers = False
        self._announced_silent = False
        self._workers_seen_at: float | None = None
        self.standby: Standby | None = None
        """The next attempt, prepared and waiting at its gate (see ``supervisor.standby``)."""
        self._standby_off: str | None = (
            None if config.single_node else "several nodes: each attempt joins a new rendezvous"
        )
        """Why no standby is used any more (None: it is)."""
        self._standby_losses = 0
        self._standby_lost: str | None = None
        """Why the current attempt's standby is gone (the next start is cold)."""
        self._next_standby_check = 0.0
        self._first_attempt: int | None = None
        self._launch_info: dict[str, Any] = {}
        self._first_beat_step: int | None = None
        self._training_since: float | None = None

    # -- start -------------------------------------------------------------------------------

    def command(self, attempt: int | None = None) -> list[str]:
        """The torchrun command line for attempt ``attempt`` (default: the current one)."""
        cfg = self.config
        attempt = self.attempt if attempt is None else attempt
        cmd = [sys.executable, "-m", "torch.distributed.run"]
        if cfg.single_node:
            # --standalone: a fresh c10d store on a free local port for every attempt.
            cmd += ["--standalone", "--nnodes", "1"]
        else:
            cmd += [
                "--nnodes",
                cfg.nnodes,
                "--rdzv-backend",
                cfg.rdzv_backend,
                "--rdzv-endpoint",
                str(cfg.rdzv_endpoint),
                "--rdzv-id",
                cfg.rdzv_id or cfg.run_dir.name,
                # Bounds the wait for a lost node to come back: past it the attempt fails and
                # the restart policy decides.
                "--rdzv-conf",
                f"join_timeout={max(1, round(cfg.rdzv_timeout))}",
            ]
            if cfg.node_rank is not None:
                cmd += ["--node-rank", str(cfg.node_rank)]
        cmd += [
            "--nproc-per-node",
            str(cfg.nproc),
            "--max-restarts",
            "0",
            "--monitor-interval",
            TORCHRUN_MONITOR_INTERVAL,
            # Each rank's output straight into its own files: torchrun reads none of it back
            # (its --tee would hold a line without a newline in memory, however long).
            "--redirects",
            "3",
            "--log-dir",
            str(self.config.attempt_log_dir(attempt) / "ranks"),
            # Without "--", torchrun's parser would take a script flag such as --signal for an
            # abbreviation of one of its own.
            "--",
            str(cfg.script),
            *cfg.script_args,
        ]
        return cmd

    def environment(self, resume_from: Path | None, attempt: int | None = None) -> dict[str, str]:
        """The workers' environment: ours plus the ``ROSE_*`` contract."""
        env = dict(os.environ)
        env.update(
            {
                env_names.RUN_DIR: str(self.config.run_dir),
                env_names.ATTEMPT: str(self.attempt if attempt is None else attempt),
                env_names.RESUME_FROM: str(resume_from) if resume_from else "",
                env_names.HEARTBEAT_DIR: str(self.config.heartbeat_dir),
                env_names.SUPERVISOR_PID: str(os.getpid()),
                env_names.EVENTS_FILE: str(self.config.events_file),
            }
        )
        # Worker logs are read for root causes: keep them current.
        env.setdefault("PYTHONUNBUFFERED", "1")
        # So that user scripts can `from trainer import supervised` without installing.
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(PROJECT_ROOT) not in paths:
            env["PYTHONPATH"] = os.pathsep.join([*paths, str(PROJECT_ROOT)])
        return env

    def start(self, attempt: int, resume_from: Path | None) -> int:
        """Launch attempt ``attempt``, through the standby when one can serve; returns
        torchrun's pid. Raises OSError if it cannot start."""
        self.attempt = attempt
        self._failure = None
        self._early_leaver = None
        self._announced_workers = False
        self._announced_silent = False
        self._workers_seen_at = None
        self._first_beat_step = None
        self._training_since = None
        if self._first_attempt is None:
            self._first_attempt = attempt
        log_dir = self.config.attempt_log_dir(attempt)
        self.config.heartbeat_dir.mkdir(parents=True, exist_ok=True)
        standby, why_not = self._take_standby(attempt)
        started = self.clock()
        # What the attempt learns only now: where to resume, and the failures seen so far.
        handed = {
            env_names.RESUME_FROM: str(resume_from) if resume_from else "",
            **read_failure_history(self.config.events_file).environment(),
        }
        if standby is not None:
            ready = standby.ready()
            standby.open(handed)
            self.tree = standby.tree
            self._launch_info = {
                "standby": True,
                "standby_ready": ready,
                "standby_age": round(started - standby.started_at, 3),
            }
        else:
            if log_dir.exists():  # an earlier supervisor's, or a discarded standby's
                shutil.rmtree(log_dir, ignore_errors=True)
            log_dir.mkdir(parents=True, exist_ok=True)
            proc = start_in_new_session(
                self.command(),
                {**self.environment(resume_from), **handed},
                log_dir / "torchrun.log",
                parent_death_signal=signal.SIGTERM,
            )
            self.tree = AttemptTree(proc)
            self._launch_info = {"standby": False}
            if why_not is not None:
                self._launch_info["standby_reason"] = why_not
        self.monitor = HeartbeatMonitor(
            self.config.heartbeat_dir, attempt, self.config.hang, started, clock=self.clock
        )
        hang = self.config.hang
        self.activity = None
        if hang.process_hang == "yes" and not hang.require_heartbeats:
            self.activity = ActivityMonitor(
                hang.process_timeout, output_dir=log_dir / "ranks", clock=self.clock
            )
        self._next_heartbeat_read = started
        self._next_tree_walk = started
        self._next_log_check = started + LOG_CHECK_INTERVAL
        self.logcap = LogCap(log_dir / "ranks", int(self.config.log_max_mb * 1e6))
        return self.tree.torchrun_pid

    # -- the standby -------------------------------------------------------------------------

    def launch_info(self) -> dict[str, Any]:
        """How the current attempt was started, for its ``launch`` event: ``standby`` (true
        when a standby served it) and, when one could not, ``standby_reason``."""
        return dict(self._launch_info)

    def _standby_wanted(self) -> bool:
        return self.config.standby == "on" and self.config.single_node and not self._standby_off

    def _take_standby(self, attempt: int) -> tuple[Standby | None, str | None]:
        """The standby to serve ``attempt``, or None and why not (None: standby is off)."""
        standby, self.standby = self.standby, None
        if not self._standby_wanted():
            if standby is not None:
                standby.discard()
            return None, self._standby_off
        lost, self._standby_lost = self._standby_lost, None
        if standby is None:
            if attempt == self._first_attempt:
                return None, None  # the first attempt of a run is always a cold start
            return None, lost or "no standby had been started (the attempt before failed early)"
        problem = (
            standby.problem() if standby.attempt == attempt else "prepared for another attempt"
        )
        if problem is not None:
            standby.discard()
            return None, f"the standby cannot serve: {problem}"
        self._standby_losses = 0
        return standby, None

    def _prepare_standby(self, now: float, notes: list[tuple[str, dict[str, Any]]]) -> None:
        """Start the next attempt's standby once this attempt trains (so that the standby's
        imports do not slow this attempt's start), and watch the one waiting."""
        if not self._standby_wanted():
            return
        standby = self.standby
        if standby is not None:
            if now < self._next_standby_check:
                return
            self._next_standby_check = now + TREE_WALK_INTERVAL
            problem = standby.problem()
            if problem is not None:
                # Not replaced within this attempt: the next start is cold, and says why.
                self.standby = None
                standby.discard()
                self._standby_losses += 1
                self._standby_lost = f"the standby died while waiting: {problem}"
                fields: dict[str, Any] = {"attempt": self.attempt, "reason": problem}
                if self._standby_losses >= MAX_STANDBY_LOSSES:
                    self._standby_off = (
                        f"{self._standby_losses} standbys died while waiting: standby is off "
                        "for the rest of this run"
                    )
                    fields["reason"] += f"; {self._standby_off}"
                notes.append((EventType.STANDBY_LOST, fields))
            elif not standby.announced_ready and standby.ready():
                standby.announced_ready = True
                notes.append(
                    (
                        EventType.STANDBY_READY,
                        {
                            "attempt": self.attempt,
                            "for_attempt": standby.attempt,
                            "torchrun_pid": standby.torchrun_pid,
                            "workers": {
                                str(r): int(i["pid"]) for r, i in standby.read_ready().items()
                            },
                            "rss_mb": standby.rss_mb(),
                            "seconds": round(now - standby.started_at, 3),
                        },
                    )
                )
            return
        if self._standby_lost is not None:
            return
        monitor = self.monitor
        assert monitor is not None
        steps = [r.step for r in monitor.ranks.values()]
        if steps and self._first_beat_step is None:
            self._first_beat_step = min(steps)
        if self._training_since is None:
            if steps or self.config.hang.require_heartbeats:
                if steps and max(steps) > (self._first_beat_step or 0):
                    self._training_since = now  # a step completed in this attempt
            elif self._workers_seen_at is not None:
                self._training_since = self._workers_seen_at
        if self._training_since is None or now - self._training_since < STANDBY_DELAY:
            return
        nxt = self.attempt + 1
        log_dir = self.config.attempt_log_dir(nxt)
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        preload = self._preload()
        try:
            self.standby = Standby.launch(
                self.command(nxt),
                self.environment(None, attempt=nxt),
                nxt,
                self.config.run_dir,
                log_dir,
                self.config.nproc,
                preload,
                now,
            )
        except OSError as e:
            self._standby_off = f"a standby could not start: {e}"
            notes.append((EventType.STANDBY_LOST, {"attempt": self.attempt, "reason": str(e)}))
            return
        self._next_standby_check = now + TREE_WALK_INTERVAL
        notes.append(
            (
                EventType.STANDBY_STARTED,
                {
                    "attempt": self.attempt,
                    "for_attempt": nxt,
                    "torchrun_pid": self.standby.torchrun_pid,
                    "preload": list(preload),
                },
            )
        )

    def _preload(self) -> tuple[str, ...]:
        extra = BUILTIN_PRELOAD if self.config.script == BUILTIN_TRAINER else ()
        return (*BASE_PRELOAD, *extra, *self.config.standby_modules())

    def standby_state(self) -> dict[str, Any] | None:
        """The waiting standby, for ``supervisor.json``: its attempt, whether it is ready, its
        workers' resident memory."""
        standby = self.standby
        if standby is None:
            return {"off": self._standby_off} if self._standby_off else None
        return {
            "for_attempt": standby.attempt,
            "torchrun_pid": standby.torchrun_pid,
            "ready": standby.announced_ready,
            "rss_mb": standby.rss_mb(),
        }

    def close(self) -> None:
        """Stop the standby, if one waits (the run is over)."""
        standby, self.standby = self.standby, None
        if standby is not None:
            standby.discard()
            # Its logs are of an attempt that never ran.
            shutil.rmtree(self.config.attempt_log_dir(standby.attempt), ignore_errors=True)
        shutil.rmtree(self.config.run_dir / STANDBY_DIR, ignore_errors=True)

    # -- watch -------------------------------------------------------------------------------

    def worker_pids(self) -> dict[str, int]:
        """Live workers by rank (``"?"``-prefixed pid keys where the rank is unknown)."""
        if self.tree is None:
            return {}
        out: dict[str, int] = {}
        for w in sorted(self.tree.workers.values(), key=lambda w: (w.rank is None, w.rank or 0)):
            if w.gone_at is None:
                out[str(w.rank) if w.rank is not None else f"?{w.pid}"] = w.pid
        return out

    def poll(self) -> Observation:
        """Look once. Never blocks longer than a few file reads."""
        assert self.tree is not None and self.monitor is not None, "start() first"
        now = self.clock()
        notes: list[tuple[str, dict[str, Any]]] = []
        exited = self._discover(now, notes)
        if self.logcap is not None and now >= self._next_log_check:
            self._next_log_check = now + LOG_CHECK_INTERVAL
            for fields in self.logcap.check():
                notes.append((EventType.LOG_TRUNCATED, {"attempt": self.attempt, **fields}))
        read_heartbeats = self._read_heartbeats(now, bool(exited), notes)
        self._prepare_standby(now, notes)
        step = self.monitor.max_step()
        failure = self._detect_failure(exited)
        if failure is None and self.tree.root.poll() == 0:
            self.tree.refresh()
            return Observation(Outcome.SUCCEEDED, step=step, notes=notes)
        if failure is not None:
            return Observation(Outcome.FAILED, failure=failure, step=step, notes=notes)
        hang = self._detect_hang(notes) if read_heartbeats else None
        detector = self.hang_detector()
        if hang is not None:
            return Observation(
                Outcome.HUNG, hang=hang, step=step, hang_detector=detector, notes=notes
            )
        return Observation(Outcome.RUNNING, step=step, hang_detector=detector, notes=notes)

    def hang_detector(self) -> str:
        """What judges hangs now: ``heartbeats`` (the script beats, or must), ``process`` (the
        process table, while no rank has beaten) or ``off``."""
        beating = self.monitor is not None and bool(self.monitor.ranks)
        if beating or self.config.hang.require_heartbeats:
            return "heartbeats"
        return "process" if self.activity is not None else "off"

    def _discover(self, now: float, notes: list[tuple[str, dict[str, Any]]]) -> list[Worker]:
        """Find new workers and those that exited since the last look; announce the workers
        once they are all there."""
        tree, monitor = self.tree, self.monitor
        assert tree is not None and monitor is not None
        # Finding new processes reads every /proc/<pid>/stat (psutil's parent map), the bulk
        # of the supervisor's own CPU: every look until each worker is found, then once a
        # second (only the workers' own children appear later, and a stop walks anyway).
        find_new = len(tree.workers) < self.config.nproc or now >= self._next_tree_walk
        if find_new:
            self._next_tree_walk = now + TREE_WALK_INTERVAL
        exited = tree.refresh(find_new=find_new)
        ranks_known = all(w.rank is not None for w in tree.workers.values())
        if not self._announced_workers and len(tree.workers) >= self.config.nproc and ranks_known:
            self._announced_workers = True
            self._workers_seen_at = now
            fields: dict[str, Any] = {
                "attempt": self.attempt,
                "torchrun_pid": tree.torchrun_pid,
                "workers": self.worker_pids(),
                "run_dir": str(self.config.run_dir),
                "log_dir": str(
                    self.config.attempt_log_dir(self.attempt).relative_to(self.config.run_dir)
                ),
            }
            if not self.config.single_node:
                # Workers exist only once every node has joined: the start-up allowance runs
                # from here, not from the launch, so a long wait for a peer is not a hang.
                fields["rendezvous_seconds"] = round(now - monitor.started_at, 3)
                monitor.started_at = now
            notes.append((EventType.WORKERS_STARTED, fields))
        return exited

    def _read_heartbeats(
        self, now: float, exited: bool, notes: list[tuple[str, dict[str, Any]]]
    ) -> bool:
        """Read the heartbeat files when due; True when they were read."""
        tree, monitor = self.tree, self.monitor
        assert tree is not None and monitor is not None
        # Until a rank reports training, read on every poll: the first step after a launch is
        # a recovery's last phase, worth timing to 0.1 s rather than 0.5 s.
        training = any(r.phase != Phase.STARTUP for r in monitor.ranks.values())
        if now < self._next_heartbeat_read and not exited and training:
            return False
        self._next_heartbeat_read = now + self.config.heartbeat_interval
        monitor.poll(tree.workers.keys())
        new_timeout = monitor.timeout_to_log() if monitor.ranks else None
        if new_timeout is not None:
            fields = {
                "attempt": self.attempt,
                "timeout": round(new_timeout, 3),
                "derived": self.config.hang.hang_timeout is None,
                "startup_timeout": self.config.hang.startup_timeout,
                "checkpoint_timeout": self.config.hang.checkpoint_timeout,
            }
            notes.append((EventType.HANG_TIMEOUT, fields))
        return True

    def _detect_failure(self, exited: list[Worker]) -> Failure | None:
        """The attempt's root cause once something died: torchrun killed, a worker that exited
        badly (the likeliest cause first), or torchrun's own non-zero exit."""
        tree = self.tree
        assert tree is not None
        if self._failure is not None:
            return self._failure
        rc = tree.root.poll()
        if rc is not None and rc < 0:
            # torchrun killed (a lost node): its workers die after it; it is the root cause.
            self._failure = Failure(
                source="torchrun",
                pid=tree.torchrun_pid,
                exit_code=rc,
                log_tail=self.torchrun_log_tail(),
            )
            return self._failure
        if len(exited) > 1 and any(w.exit_code is None for w in exited):
            self._codes_from_torchrun(exited)
        for worker in sorted(exited, key=_likely_cause_first):
            self._judge_exit(worker)
            if self._failure is not None:
                return self._failure
        if rc is not None and rc != 0:
            tree.refresh()
            self._failure = self._blame_after_torchrun_exit(rc)
        return self._failure

    def _codes_from_torchrun(self, workers: list[Worker], wait: float = 1.0) -> None:
        """Several workers gone in one look, some reaped by torchrun before it (code unknown):
        which one died first cannot be told from the process table. torchrun logs each one's
        code as it stops the group; wait that long (at most ``wait`` seconds) so that the rank
        that failed, not the peers torchrun terminated after it, is named."""
        deadline = self.clock() + wait
        while True:
            codes = self.exit_codes_from_log()
            for w in workers:
                w.exit_code = codes.get(w.pid, w.exit_code)
            if all(w.exit_code is not None for w in workers) or self.clock() >= deadline:
                return
            time.sleep(0.05)

    def _detect_hang(self, notes: list[tuple[str, dict[str, Any]]]) -> Hang | None:
        """A rank stuck past its phase's allowance, judged by the heartbeats once any rank
        beats and by the process table until then; notes when a script never beats."""
        tree, monitor = self.tree, self.monitor
        assert tree is not None and monitor is not None
        live = tree.live_workers()
        hang = monitor.check([w.pid for w in live])
        if hang is not None:
            hang = _stopped_rank_first(hang, live, monitor)
        if hang is None and self.activity is not None:
            if monitor.ranks:
                self.activity = None  # the script beats: its heartbeats judge from now on
                notes.append(
                    (
                        EventType.HANG_DETECTION,
                        {
                            "attempt": self.attempt,
                            "detector": "heartbeats",
                            "reason": "a rank wrote a heartbeat: hangs are judged by the "
                            "heartbeats from now on",
                        },
                    )
                )
            else:
                hang = self.activity.look(live, tree.others.values())
                if hang is not None and hang.phase == "idle":
                    hang = _after_peers_finished(hang, tree)
        if hang is None and monitor.silent() and not self._announced_silent:
            self._announced_silent = True
            if self.activity is not None:
                how = (
                    "hangs are judged from the process table (a stopped rank, or every rank "
                    f"idle, for {self.activity.timeout:g} s)"
                )
            else:
                how = "hang detection is off for this attempt (--process-hang no)"
            fields = {
                "attempt": self.attempt,
                "reason": f"no heartbeat within the start-up timeout: {how}; crashes are "
                "still detected",
            }
            notes.append((EventType.HEARTBEATS_ABSENT, fields))
        return hang

    def _judge_exit(self, worker: Worker) -> None:
        code = worker.exit_code
        # For a script that keeps the heartbeat contract (it reports "done" before exiting 0),
        # a rank that torchrun reaped first (code unknown) without "done" died; one that
        # exited 0 without "done" is remembered: if the attempt fails, it left first and is
        # the root cause, not the peers whose collectives broke after it. Otherwise torchrun's
        # own exit status decides.
        if code in (0, None):
            if not self._left_without_done(worker):
                return
            if code == 0:
                self._early_leaver = self._early_leaver or worker
                return
        self._failure = self._worker_failure(self._early_leaver or worker)

    def _worker_failure(self, worker: Worker) -> Failure:
        return Failure(
            source="worker",
            rank=worker.rank,
            local_rank=worker.local_rank,
            pid=worker.pid,
            exit_code=worker.exit_code,
            log_tail=self.rank_log_tail(worker.local_rank),
        )

    def _left_without_done(self, worker: Worker) -> bool:
        """Whether a rank of a script known to keep the heartbeat contract (it reports "done"
        before exiting 0) is gone without having reported it."""
        if not self.config.hang.require_heartbeats or self.monitor is None or self.tree is None:
            return False
        self.monitor.poll(self.tree.workers.keys())  # its last beat may be newer than our look
        state = self.monitor.ranks.get(worker.rank) if worker.rank is not None else None
        return state is not None and state.phase != Phase.DONE

    def _blame_after_torchrun_exit(self, rc: int) -> Failure:
        if self._early_leaver is not None:
            return self._worker_failure(self._early_leaver)
        codes = self.exit_codes_from_log()
        for worker in sorted(
            (w for w in self.tree.workers.values() if w.gone_at is not None),  # type: ignore[union-attr]
            key=lambda w: w.gone_at or 0.0,
        ):
            code = worker.exit_code if worker.exit_code is not None else codes.get(worker.pid)
            if code not in (0, None):
                return Failure(
                    source="worker",
                    rank=worker.rank,
                    local_rank=worker.local_rank,
                    pid=worker.pid,
                    exit_code=code,
                    log_tail=self.rank_log_tail(worker.local_rank),
                )
        return Failure(
            source="torchrun",
            pid=self.tree.torchrun_pid,  # type: ignore[union-attr]
            exit_code=rc,
            log_tail=self.torchrun_log_tail(),
        )

    # -- root cause --------------------------------------------------------------------------

    def exit_codes_from_log(self) -> dict[int, int]:
        """Worker exit codes by pid, as torchrun reported them in its log."""
        text = self._read_tail(self.config.attempt_log_dir(self.attempt) / "torchrun.log", 64_000)
        codes: dict[int, int] = {}
        for code, pid in _EXITCODE_PID.findall(text):
            codes[int(pid)] = int(code)
        for code, _local, pid in _FAILED_LINE.findall(text):
            codes.setdefault(int(pid), int(code))
        return codes

    def complete(self, failure: Failure) -> Failure:
        """Fill in what was unknown at detection (exit code, log tail) once the attempt stopped."""
        if failure.exit_code is None and failure.pid is not None:
            failure.exit_code = self.exit_codes_from_log().get(failure.pid)
        if failure.source == "worker":
            failure.log_tail = self.rank_log_tail(failure.local_rank) or failure.log_tail
        return failure

    def rank_log_tail(self, local_rank: int | None, lines: int = 15) -> str:
        """The last lines of a worker's stderr (else stdout) in this attempt."""
        if local_rank is None:
            return self.torchrun_log_tail(lines)
        base = self.config.attempt_log_dir(self.attempt) / "ranks"
        for name in ("stderr.log", "stdout.log"):
            for path in sorted(base.glob(f"*/attempt_*/{local_rank}/{name}")):
                text = self._read_tail(path, 8_000).strip()
                if text:
                    return "\n".join(text.splitlines()[-lines:])
        return ""

    def torchrun_log_tail(self, lines: int = 15) -> str:
        """The last lines of torchrun's own output in this attempt."""
        text = self._read_tail(self.config.attempt_log_dir(self.attempt) / "torchrun.log", 8_000)
        return "\n".join(text.strip().splitlines()[-lines:])

    @staticmethod
    def _read_tail(path: Path, size: int) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    # -- stop --------------------------------------------------------------------------------

    def forward_sigterm(self) -> int:
        """SIGTERM to every live worker (not torchrun: it must outlive them to reap them)."""
        if self.tree is None:
            return 0
        self.tree.refresh()
        return self.tree.signal_workers(signal.SIGTERM)

    def stop(self, grace: float, already_signalled: bool = False) -> StopReport:
        """Stop the attempt's whole tree (see ``AttemptTree.stop``)."""
        assert self.tree is not None, "start() first"
        # torchrun is given time to log its workers' exit codes only when the root cause still
        # lacks one; otherwise every second it takes is recovery time lost.
        # After an interrupt there is no hurry, and torchrun exits cleanly once it sees its
        # workers gone.
        known = self._failure is None or self._failure.exit_code is not None
        quick = known and not already_signalled
        return self.tree.stop(
            grace, torchrun_grace=0.0 if quick else 1.5, already_signalled=already_signalled
        )

    def checkpointing(self) -> bool:
        """Whether a survivor may still write something worth keeping: a rank in its
        ``checkpoint`` phase, or a script without heartbeats (who knows what it does on
        SIGTERM)."""
        if self.monitor is None:
            return True
        self.monitor.poll(self.tree.workers.keys() if self.tree is not None else None)
        ranks = self.monitor.ranks.values()
        return not ranks or any(r.phase == Phase.CHECKPOINT for r in ranks)

    def attempt_alive(self) -> bool:
        """True while torchrun runs."""
        return self.tree is not None and self.tree.root.poll() is None

    def all_done(self) -> bool:
        """Whether every worker of this node reported ``done`` in this attempt: the script
        finished, whatever happened to its processes afterwards (a late signal, a teardown)."""
        if self.tree is None or self.monitor is None or len(self.tree.workers) < self.config.nproc:
            return False
        self.monitor.poll(self.tree.workers.keys())
        ranks = [w.rank for w in self.tree.workers.values()]
        states = self.monitor.ranks
        return all(r is not None and r in states and states[r].phase == Phase.DONE for r in ranks)


def _likely_cause_first(worker: Worker) -> int:
    """Order for workers seen exited in the same look: the likeliest root cause first.

    A rank killed by a signal (other than torchrun's SIGTERM) takes its peers down with it:
    they fail in their next collective and exit 1 within milliseconds, often before the next
    look. A rank torchrun already reaped died before those still waiting to be reaped. Ranks
    that exited 0 come first of all: one that left without "done" is remembered as the likely
    cause before its peers' failures are judged (``_judge_exit``).
    """
    code = worker.exit_code
    if code == 0:
        return -1
    if code is not None and code < 0 and code != -signal.SIGTERM:
        return 0
    if code is None:
        return 1
    if code in (-signal.SIGTERM, TrainerExit.PREEMPTED):
        return 3  # stopped by torchrun after a peer's failure (75: the answer to its SIGTERM)
    return 2


def _stopped_rank_first(hang: Hang, live: list[Worker], monitor: HeartbeatMonitor) -> Hang:
    """The hang, blamed on a rank whose process is stopped (state T: SIGSTOP, a terminal stop,
    a debugger) when there is one. Its peers wait for it in a collective, stalled since about
    the same moment; which of them beat last is noise, the stopped process is not."""
    for worker in live:
        if worker.rank is None or worker.rank == hang.rank:
            continue
        try:
            stopped = worker.proc.status() in STOPPED_STATES
        except psutil.Error:
            continue
        state = monitor.ranks.get(worker.rank)
        if stopped and state is not None:
            return dataclasses.replace(
                hang,
                rank=worker.rank,
                pid=worker.pid,
                step=state.step,
                phase=state.phase,
                reason=f"rank {worker.rank} stopped (process state T) at step {state.step}; "
                f"its peers wait for it ({hang.reason})",
            )
    return hang


def _after_peers_finished(hang: Hang, tree: AttemptTree) -> Hang:
    """An idle hang of ranks whose peers already exited 0 says so: ranks left behind after their
    peers finished are most often stuck in their teardown (gloo's destroy_process_group() is
    known to hang now and then once a peer is gone), not in their training."""
    finished = sorted(
        w.rank
        for w in tree.workers.values()
        if w.gone_at is not None and w.exit_code == 0 and w.rank is not None
    )
    if not finished:
        return hang
    ranks = ", ".join(str(r) for r in finished)
    note = (
        f"; rank(s) {ranks} had already exited 0: the ranks left may be stuck in their teardown "
        "(destroy_process_group) after the work was done"
    )
    return dataclasses.replace(hang, reason=hang.reason + note)
