"""The chaos tool: inject real faults into a running supervised run, from outside.

``python -m tools.chaos RUN_DIR [--node TAG] [--fault KIND[,KIND...]] [--every S |
--at-steps N,M,...] [--count C] [--seed X]`` attaches to the run that owns RUN_DIR, as a real
failure would arrive: it finds its targets through the run directory (``supervisor.json``,
``heartbeats/``, ``checkpoints/``) and psutil, sends real signals and damages real files. Every
injection is appended to the run's ``events.jsonl`` (type ``fault_injected``) and printed; every
random choice comes from ``--seed``, so a failing run can be replayed. See docs/chaos.md.

On a multi-node run directory ``--node TAG`` (``node1``) picks the node to attack: its
``supervisor-TAG.json``, its supervisor and torchrun, the workers under that torchrun; the
injections go to ``events-TAG.jsonl``. Without it the tool refuses such a directory (exit 2) and
names its nodes: it never guesses.

Exit codes: 0 every planned fault was injected (or, with ``--every`` and no ``--count``, the run
ended); 2 bad input; 3 the run ended, or ``--timeout`` passed, before the planned faults were
injected.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runcontract.cli import UsageError
from runcontract.events import CHAOS_SOURCE, EventType, EventWriter
from tools.chaos_config import (
    HOSTILE_MODES,
    PROG,
    RANDOM,
    RANDOM_POOL,
    RESTARTING_FAULTS,
    ChaosConfig,
    build_parser,
    config_from_args,
    node_argv,
    parse_spec,
    spec_to_argv,
)
from tools.chaos_run import RunView, Snapshot, TempDir, node_tags

# Kinds that end the run: nothing can follow them.
_ENDING = frozenset({"preempt", "kill-supervisor"})
# Faults that need checkpoints of the store to act on.
_CHECKPOINT_FAULTS = frozenset({"kill-writer", "corrupt", "hostile-file", "fill-disk"})

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_DONE = 3


class ChaosError(Exception):
    """A fault cannot be injected as asked; the message says what to change."""


@dataclass
class Injection:
    """One fault, as logged."""

    kind: str
    pid: int | None
    rank: int | None
    step: int | None
    attempt: int | None
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The ``fault_injected`` event fields."""
        return {
            "kind": self.kind,
            "pid": self.pid,
            "rank": self.rank,
            "step": self.step,
            "attempt": self.attempt,
            **self.details,
        }


class ChaosLog:
    """The chaos tool's events, appended to the run's events file beside the supervisor's own
    (``runcontract.events.EventWriter``, marked ``source: chaos``) and echoed to the console."""

    def __init__(self, path: Path, console: Any = sys.stdout) -> None:
        self.path = path
        self.console = console
        self._writer: EventWriter | None = None

    def emit(self, type_: EventType | str, **fields: Any) -> dict[str, Any]:
        """Append one event and print it. Raises OSError."""
        if self._writer is None:  # opened at the first event: the run may start after the tool
            self._writer = EventWriter(self.path, source=CHAOS_SOURCE)
        record = self._writer.write(type_, **fields)
        if self.console is not None:
            stamp = time.strftime("%H:%M:%S", time.localtime(record["time"]))
            parts = " ".join(
                f"{k}={v}"
                for k, v in fields.items()
                if v is not None and not isinstance(v, (dict, list))
            )
            print(f"[chaos {stamp}] {type_}: {parts}", file=self.console, flush=True)
        return record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Injector:
    """Waits for the run to be in the right place, then injects, one fault at a time."""

    def __init__(self, config: ChaosConfig, console: Any = sys.stdout) -> None:
        self.config = config
        self.view = RunView(config.run_dir, config.node)
        self.events = ChaosLog(self.view.events_path, console)
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
        self.seed = seed
        self.rng = random.Random(seed)
        self.injected: list[Injection] = []
        self._stop: list[int] = []
        self._pending_kind: str | None = None

    def request_stop(self, signum: int) -> None:
        """Called from a signal handler: only records the request. The loop stops before the
        next injection; one under way is completed, so no worker is left frozen."""
        self._stop.append(signum)

    # -- the schedule --------------------------------------------------------------------------

    def run(self) -> int:
        """Inject the planned faults; returns the exit code (module docstring)."""
        cfg = self.config
        started = time.monotonic()
        deadline = None if cfg.timeout is None else started + cfg.timeout
        if not self._wait_for_supervisor(started + cfg.wait_start):
            raise ChaosError(self._no_supervisor_message())
        planned = cfg.planned
        self.events.emit(
            EventType.CHAOS_STARTED,
            faults=list(cfg.faults),
            every=cfg.every,
            at_steps=list(cfg.at_steps),
            count=planned,
            seed=self.seed,
            pid=os.getpid(),
        )
        next_time = time.monotonic() + (cfg.every or 0.0)
        waiting_for_new_attempt: int | None = None
        while planned is None or len(self.injected) < planned:
            if self._stop:
                return self._finish("stopped by a signal", EXIT_NOT_DONE)
            if self.view.ended():
                return self._finish("run ended", EXIT_OK if planned is None else EXIT_NOT_DONE)
            if deadline is not None and time.monotonic() > deadline:
                return self._finish("timeout", EXIT_NOT_DONE)
            snap = self.view.snapshot()
            if (
                snap is not None
                and snap.ready
                and snap.attempt != waiting_for_new_attempt
                and self._due(snap, next_time)
            ):
                kind = self._next_kind()
                injection = self.inject(kind, snap)
                if injection is not None:
                    self.injected.append(injection)
                    next_time = time.monotonic() + (cfg.every or 0.0)
                    # The next injection waits for the attempt that replaces this one.
                    if kind in RESTARTING_FAULTS:
                        waiting_for_new_attempt = snap.attempt
                    if kind in _ENDING:
                        break
                else:
                    # The moment passed (the target exited, no checkpoint yet): the same kind is
                    # tried again, after a pause so as not to pester a process that is starting.
                    self._pending_kind = kind
                    time.sleep(0.5)
            time.sleep(cfg.poll_interval)
        return self._finish("done", EXIT_OK)

    def _wait_for_supervisor(self, until: float) -> bool:
        """True once the supervisor's state file is there. Raises ChaosError as soon as the
        run directory shows that ``--node`` is missing or not wanted."""
        while time.monotonic() < until and not self._stop:
            problem = self.view.layout_error()
            if problem is not None:
                raise ChaosError(problem)
            if self.view.state() is not None:
                return True
            time.sleep(self.config.poll_interval)
        return False

    def _no_supervisor_message(self) -> str:
        view, wait = self.view, self.config.wait_start
        if view.node is None:
            return (
                f"{view.run_dir} has no {view.state_path.name} after {wait:g} s: "
                "is a supervisor running on this run directory?"
            )
        tags = node_tags(view.run_dir)
        known = f"its nodes are {', '.join(tags)}" if tags else "no node has written one yet"
        return (
            f"--node {view.node}: {view.run_dir} has no {view.state_path.name} after {wait:g} s "
            f"({known}): check the tag, or that this node's supervisor is running"
        )

    def _due(self, snap: Snapshot, next_time: float) -> bool:
        cfg = self.config
        if cfg.at_steps:
            if snap.step is None:
                raise ChaosError(
                    "--at-steps needs the steps a script reports in its heartbeats, and this "
                    "one writes none: use --every"
                )
            return snap.step >= cfg.at_steps[len(self.injected)]
        if cfg.every is not None:
            return time.monotonic() >= next_time
        return True

    def _next_kind(self) -> str:
        if self._pending_kind is not None:
            kind, self._pending_kind = self._pending_kind, None
            return kind
        kind = self.config.faults[len(self.injected) % len(self.config.faults)]
        return self.rng.choice(RANDOM_POOL) if kind == RANDOM else kind

    def _finish(self, reason: str, code: int) -> int:
        try:
            self.events.emit(
                EventType.CHAOS_FINISHED, reason=reason, injected=len(self.injected), exit_code=code
            )
        except OSError:
            pass
        return code

    # -- the faults ----------------------------------------------------------------------------

    def inject(self, kind: str, snap: Snapshot) -> Injection | None:
        """Inject one fault of ``kind`` into the attempt ``snap`` describes.

        Returns what was done, or None when the moment passed (the target died first, no
        checkpoint was written in time); the caller tries the same kind again.
        Raises ChaosError when the fault cannot be injected into this run at all.
        """
        if kind in _CHECKPOINT_FAULTS and not snap.heartbeats and not self.view.has_checkpoints():
            raise ChaosError(
                f"{kind} needs the checkpoints of the store under {self.view.run_dir}, and this "
                "script keeps none there (nor writes heartbeats): kill-worker, hang and "
                "kill-torchrun work on any script"
            )
        handler = getattr(self, "_inject_" + kind.replace("-", "_"))
        return handler(snap)

    def _log(self, injection: Injection) -> None:
        self.events.emit(EventType.FAULT_INJECTED, **injection.record())

    def _signal(self, injection: Injection, sig: int) -> bool:
        """Log, then signal: the log reads in causal order. A target that vanished in between
        is logged as such (the injection then counts as not made)."""
        assert injection.pid is not None
        self._log(injection)
        try:
            os.kill(injection.pid, sig)
        except ProcessLookupError:
            self.events.emit(
                EventType.FAULT_MISSED,
                kind=injection.kind,
                pid=injection.pid,
                reason="target exited",
            )
            return False
        return True

    def _worker(self, kind: str, snap: Snapshot, rank: int | None = None) -> Injection:
        if rank is None:
            rank = self.rng.choice(sorted(snap.workers))
        return Injection(
            kind,
            snap.workers[rank],
            rank,
            snap.step,
            snap.attempt,
            {"committed": self.view.committed()},
        )

    def _inject_kill_worker(self, snap: Snapshot) -> Injection | None:
        injection = self._worker("kill-worker", snap)
        return injection if self._signal(injection, signal.SIGKILL) else None

    def _inject_hang(self, snap: Snapshot) -> Injection | None:
        injection = self._worker("hang", snap)
        return injection if self._signal(injection, signal.SIGSTOP) else None

    def _inject_kill_torchrun(self, snap: Snapshot) -> Injection | None:
        pid = snap.torchrun_pid
        if not pid or not self.view.is_run_process(int(pid)):
            return None
        injection = Injection(
            "kill-torchrun",
            int(pid),
            None,
            snap.step,
            snap.attempt,
            {"committed": self.view.committed(), "workers": snap.workers},
        )
        return injection if self._signal(injection, signal.SIGKILL) else None

    def _inject_kill_writer(self, snap: Snapshot) -> Injection | None:
        if 0 not in snap.workers:
            raise ChaosError("kill-writer needs rank 0 (the checkpoint writer) on this node")
        pid = snap.workers[0]
        deadline = time.monotonic() + self.config.writer_wait
        next_check = 0.0
        # A tiny model's write lasts milliseconds: look often (a directory listing is cheap),
        # and check the much dearer process table only now and then.
        while time.monotonic() < deadline and not self._stop:
            mine = [t for t in self.view.temp_dirs() if t.pid == pid]
            if mine:
                return self._kill_writer(snap, pid, mine[0])
            if time.monotonic() >= next_check:
                if not self.view.is_run_process(pid):
                    return None
                # On a busy machine the whole write can fall between two looks. A writer that
                # stopped itself just after renaming a new checkpoint into place (the store's
                # test pause hook) is still taken there.
                if _stopped(pid):
                    new = self.view.committed_since(snap.attempt)
                    if new:
                        return self._kill_renamed_writer(snap, pid, new[-1])
                next_check = time.monotonic() + 0.1
            time.sleep(0.001)
        return None

    def _kill_writer(self, snap: Snapshot, pid: int, tmp: TempDir) -> Injection | None:
        # A seeded point inside the write; a writer that stopped itself at a named phase (the
        # store's ROSE_CKPT_PAUSE_AT test hook) is taken there at once.
        until = time.monotonic() + self.rng.uniform(0.0, self.config.writer_delay)
        paused = _stopped(pid)
        while not paused and time.monotonic() < until:
            time.sleep(0.001)
            paused = _stopped(pid)
        try:
            os.kill(pid, signal.SIGSTOP)  # frozen, so what is logged is what the kill interrupts
        except ProcessLookupError:
            return None
        step = self._heartbeat_step(0, snap.step)
        injection = Injection(
            "kill-writer",
            pid,
            0,
            step,
            snap.attempt,
            {
                "temp_dir": tmp.path.name,
                "writing_step": tmp.step,
                "temp_files": _listing(tmp.path),
                "renamed": not tmp.path.exists() and self.view.step_dir(tmp.step).is_dir(),
                "writer_paused_itself": paused,
                "committed": self.view.committed(),
            },
        )
        return injection if self._signal(injection, signal.SIGKILL) else None

    def _kill_renamed_writer(self, snap: Snapshot, pid: int, step: int) -> Injection | None:
        injection = Injection(
            "kill-writer",
            pid,
            0,
            self._heartbeat_step(0, snap.step),
            snap.attempt,
            {
                "temp_dir": None,
                "writing_step": step,
                "temp_files": {},
                "renamed": True,
                "writer_paused_itself": True,
                "committed": self.view.committed(),
            },
        )
        return injection if self._signal(injection, signal.SIGKILL) else None

    def _inject_corrupt(self, snap: Snapshot) -> Injection | None:
        mode = self.config.corrupt_mode
        if mode == "any":
            mode = self.rng.choice(("flip", "truncate"))
        return self._damage_newest("corrupt", mode, snap)

    def _inject_hostile_file(self, snap: Snapshot) -> Injection | None:
        mode = self.config.corrupt_mode
        if mode not in HOSTILE_MODES:
            mode = self.rng.choice(HOSTILE_MODES)
        return self._damage_newest("hostile-file", mode, snap)

    def _damage_newest(self, kind: str, mode: str, snap: Snapshot) -> Injection | None:
        """Damage a payload file of the newest committed checkpoint (``mode``: see
        ``_corrupt_file``), then SIGKILL rank 0: the next attempt must set it aside."""
        if 0 not in snap.workers:
            raise ChaosError(f"{kind} needs rank 0 (the checkpoint writer) on this node")
        pid = snap.workers[0]
        # Rank 0 frozen: no checkpoint can be committed or pruned between the choice of the
        # newest one and the kill, so "newest" stays true.
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return None
        committed = self.view.committed()
        if not committed:
            os.kill(pid, signal.SIGCONT)
            return None
        target = self.view.step_dir(committed[-1])
        files = sorted(
            p.name for p in target.iterdir() if p.is_file() and p.name != "manifest.json"
        )
        if not files:
            os.kill(pid, signal.SIGCONT)
            return None
        name = self.rng.choice(files)
        details = _corrupt_file(target / name, mode, self.rng)
        injection = Injection(
            kind,
            pid,
            0,
            self._heartbeat_step(0, snap.step),
            snap.attempt,
            {"path": str(target), "file": name, **details, "committed": committed},
        )
        return injection if self._signal(injection, signal.SIGKILL) else None

    def _supervisor(self, kind: str, snap: Snapshot) -> Injection | None:
        if not self.view.is_supervisor(snap.supervisor_pid):
            return None
        return Injection(
            kind,
            snap.supervisor_pid,
            None,
            snap.step,
            snap.attempt,
            {
                "committed": self.view.committed(),
                "torchrun_pid": snap.torchrun_pid,
                "workers": snap.workers,
            },
        )

    def _inject_preempt(self, snap: Snapshot) -> Injection | None:
        injection = self._supervisor("preempt", snap)
        return injection if injection and self._signal(injection, signal.SIGTERM) else None

    def _inject_kill_supervisor(self, snap: Snapshot) -> Injection | None:
        injection = self._supervisor("kill-supervisor", snap)
        return injection if injection and self._signal(injection, signal.SIGKILL) else None

    def _inject_fill_disk(self, snap: Snapshot) -> Injection | None:
        ckpt_dir = self.view.ckpt_dir
        if not ckpt_dir.is_dir():
            return None
        stat = os.statvfs(ckpt_dir)
        free = stat.f_bavail * stat.f_frsize
        need = free - self.config.fill_leave
        if need > self.config.fill_limit:
            raise ChaosError(
                f"fill-disk: {ckpt_dir} has {free} bytes free; filling it would take more than "
                f"--fill-limit ({self.config.fill_limit} bytes). Put the checkpoint directory on "
                "a small file system of its own (e.g. a tmpfs) or raise --fill-limit"
            )
        ballast = ckpt_dir / f".chaos-fill-{os.getpid()}"
        injection = Injection(
            "fill-disk",
            None,
            None,
            snap.step,
            snap.attempt,
            {"path": str(ballast), "free_before": free, "committed": self.view.committed()},
        )
        self._log(injection)
        written = _fill(ballast, max(0, need))
        stat = os.statvfs(ckpt_dir)
        self.events.emit(
            EventType.DISK_FILLED,
            path=str(ballast),
            bytes=written,
            free_after=stat.f_bavail * stat.f_frsize,
        )
        injection.details["bytes"] = written
        return injection

    def _heartbeat_step(self, rank: int, default: int | None) -> int | None:
        record = self.view.heartbeats().get(rank)
        step = record.get("step") if record else None
        return int(step) if step is not None else default


def _stopped(pid: int) -> bool:
    """True when ``pid`` is in the stopped state (SIGSTOP)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _listing(path: Path) -> dict[str, int]:
    """name -> size of the files in ``path`` (empty when it is gone)."""
    try:
        return {e.name: e.stat().st_size for e in os.scandir(path) if e.is_file()}
    except OSError:
        return {}


def _corrupt_file(path: Path, mode: str, rng: random.Random) -> dict[str, Any]:
    """Damage ``path`` in place (fsync'd) and say how: ``flip`` a byte, ``truncate`` it to
    half, or replace it with a hostile file (``HOSTILE_MODES``)."""
    if mode in HOSTILE_MODES:
        size = path.stat().st_size
        path.unlink()
        if mode == "fifo":
            os.mkfifo(path)
        else:
            os.symlink(path.name if mode == "symlink-loop" else "/dev/zero", path)
        _fsync_dir(path.parent)
        return {"mode": mode, "size_before": size}
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        if mode == "truncate" or size == 0:
            os.ftruncate(fd, size // 2)
            out: dict[str, Any] = {"mode": "truncate", "size_before": size, "size": size // 2}
        else:
            offset = rng.randrange(size)
            old = os.pread(fd, 1, offset)[0]
            os.pwrite(fd, bytes([old ^ 0xFF]), offset)
            out = {"mode": "flip", "offset": offset, "size": size}
        os.fsync(fd)
    finally:
        os.close(fd)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(path: Path, nbytes: int) -> int:
    """Write up to ``nbytes`` into ``path`` (stopping quietly at a full disk); bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while written < nbytes:
            try:
                written += os.write(fd, chunk[: min(len(chunk), nbytes - written)])
            except OSError:
                break  # the disk is full: that was the point
        try:
            os.fsync(fd)
        except OSError:
            pass
    finally:
        os.close(fd)
    return written


# -- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``python -m tools.chaos`` (``prog`` names the command in messages);
    returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(build_parser(prog).parse_args(argv))
        injector = Injector(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: injector.request_stop(signum))
        node = f" node {config.node};" if config.node else ""
        print(
            f"[chaos] run dir {injector.view.run_dir};{node} faults {','.join(config.faults)}; "
            f"seed {injector.seed} (replay with --seed {injector.seed})",
            flush=True,
        )
        return injector.run()
    except (UsageError, ChaosError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


# -- alongside a job (``launch.py --chaos SPEC``) ------------------------------------------------


def spawn(
    run_dir: Path, spec: str, node: str | None = None, **popen: Any
) -> subprocess.Popen[bytes]:
    """Start the tool as its own process against ``run_dir`` (which a supervisor owns or is
    about to own; on a multi-node run, the supervisor of node ``node``): the faults arrive from
    outside the supervisor, as real ones would.

    The process ends by itself when its faults are injected or the run ends; stop it early
    with :func:`stop_spawned`. ``popen`` goes to ``subprocess.Popen`` (e.g. ``stdout=``).
    Raises ValueError for a bad SPEC (before anything starts), OSError if it cannot start.
    """
    parse_spec(spec, run_dir, node)
    cmd = [sys.executable, "-m", "tools.chaos", str(run_dir), *node_argv(node), *spec_to_argv(spec)]
    env = dict(popen.pop("env", None) or os.environ)
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return subprocess.Popen(cmd, env=env, **popen)


def stop_spawned(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Stop a tool process started by :func:`spawn` and reap it; returns its exit status.

    SIGTERM first: the tool completes an injection under way (so no worker is left frozen) and
    exits 3; SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
