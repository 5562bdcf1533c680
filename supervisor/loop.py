"""The Supervisor: a state machine over attempts. It decides; the runner acts.

One pass per attempt: choose the checkpoint → launch → watch → on a failure or hang stop the
tree, consult the restart policy, back off, and go again; on success or an unrecoverable
condition, return the documented exit code. Signals only set a flag; the loop acts on it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runcontract import exit_codes
from runcontract.events import EventType
from runcontract.exit_codes import TrainerExit
from runcontract.states import State
from supervisor.attempt import AttemptResult, Failure, Observation, Outcome, Runner, StopReport
from supervisor.config import LaunchConfig
from supervisor.events import EventLog, read_events
from supervisor.policy import RestartPolicy
from supervisor.resume import (
    LOCK_RELEASE_WAIT,
    checkpoint_step,
    release_memory_tier,
    select_checkpoint,
    selection_reason,
    writer_lock_holder,
)
from supervisor.script_files import files_written_since, state_left_behind
from supervisor.status import write_state

# Worker exit codes that no restart can fix (see the trainer's exit codes).
FATAL_WORKER_CODES: dict[int, int] = {
    TrainerExit.USAGE: exit_codes.WORKER_BAD_INPUT,
    TrainerExit.CKPT_LOCKED: exit_codes.CHECKPOINTS_LOCKED,
    # The trainer rolls back by itself when told to (--on-divergence rollback-skip:N) and exits
    # 74 only when it cannot: the same checkpoint and data would diverge again.
    TrainerExit.DIVERGED: exit_codes.DIVERGED,
}

# Why each of them stops the run, in the ``fatal`` event.
_FATAL_REASONS: dict[int, str] = {
    TrainerExit.USAGE: " (bad input)",
    TrainerExit.CKPT_LOCKED: ": another process holds the checkpoint writer lock",
    TrainerExit.DIVERGED: ": the training diverged (a non-finite loss or gradient norm; the "
    "trainer's diverged event names the step), and the same checkpoint and data would diverge "
    "again",
}


# Notes from the runner after which supervisor.json is rewritten at once.
_STATE_CHANGING_NOTES = frozenset(
    {
        EventType.WORKERS_STARTED,
        EventType.STANDBY_STARTED,
        EventType.STANDBY_READY,
        EventType.STANDBY_LOST,
    }
)

# Allowed state changes (runcontract.states draws them).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.INIT: frozenset({State.STARTING, State.INTERRUPTED, State.FAILED}),
    State.STARTING: frozenset({State.RUNNING}),
    State.RUNNING: frozenset({State.STOPPING, State.SUCCEEDED, State.FAILED}),
    State.STOPPING: frozenset({State.BACKOFF, State.FAILED, State.INTERRUPTED, State.SUCCEEDED}),
    State.BACKOFF: frozenset({State.STARTING, State.INTERRUPTED, State.FAILED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.INTERRUPTED: frozenset(),
}


class Supervisor:
    """Owns one run directory for its lifetime (the caller holds ``supervisor.lock``)."""

    def __init__(
        self,
        config: LaunchConfig,
        runner: Runner,
        events: EventLog,
        policy: RestartPolicy | None = None,
        *,
        select: Callable[..., Path | None] = select_checkpoint,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        first_attempt: int = 1,
        restarts_carried: int = 0,
        on_poll: Callable[[Observation], None] | None = None,
    ) -> None:
        """``first_attempt`` continues the numbering of an earlier supervisor of the same run
        directory, so that its logs and heartbeats are never mistaken for this one's;
        ``restarts_carried`` are the restarts that earlier supervisor already spent (a relaunch
        or a SLURM requeue does not refill the budget). ``on_poll`` sees each look at a running
        attempt (the console's status line)."""
        self.config = config
        self.runner = runner
        self.events = events
        self.policy = policy or RestartPolicy(config.policy, clock=clock)
        self.policy.carry(restarts_carried)
        self._select = select
        self._clock = clock
        self._sleep = sleep
        self.state = State.INIT
        self.attempt = first_attempt - 1
        self.step: int | None = None
        self.resume_from: Path | None = None
        self.torchrun_pid: int | None = None
        self._signals: list[int] = []
        self.exit_reason = ""
        """How the run ended, in words (set on exit; the CLI prints it)."""
        self.checkpoint_failures = 0
        """Checkpoint writes that failed since the last one that succeeded."""
        self.last_checkpoint_failure: str | None = None
        self._state_written_at = float("-inf")
        self._started_at = time.time()
        self.hang_detector = ""
        """What judges hangs in the running attempt (the runner says)."""
        self._launched_wall = 0.0
        """When the current attempt was launched, seconds since the epoch."""
        self._steps_seen: tuple[int, int] | None = None
        """The first and the highest step the current attempt's ranks reported."""
        self._on_poll = on_poll
        self._memory_released = False

    # -- signals -----------------------------------------------------------------------------

    def request_stop(self, signum: int) -> None:
        """Called from a signal handler: only records the request; the loop acts on it."""
        self._signals.append(signum)

    @property
    def interrupted(self) -> bool:
        return bool(self._signals)

    # -- state file --------------------------------------------------------------------------

    def _write_state(self, force: bool = True, **extra: Any) -> None:
        now = self._clock()
        if not force and now - self._state_written_at < 1.0:
            return
        self._state_written_at = now
        state = {
            "state": self.state.value,
            "supervisor_pid": _getpid(),
            "run_dir": str(self.config.run_dir),
            "node": self.config.node_tag or None,
            "script": str(self.config.script),
            "attempt": self.attempt,
            "step": self.step,
            "torchrun_pid": self.torchrun_pid,
            "workers": self.runner.worker_pids() if self.state == State.RUNNING else {},
            "newest_valid_checkpoint": str(self.resume_from) if self.resume_from else None,
            "checkpoint_write_failures": self.checkpoint_failures,
            "last_checkpoint_failure": self.last_checkpoint_failure,
            "restarts_used": self.policy.restarts_used,
            "restarts_left": self.policy.restarts_left(),
            "max_restarts": self.config.policy.max_restarts,
            "failures_without_progress": self.policy.failures_without_progress,
            "crash_loop": self.config.policy.crash_loop,
            "hang_detector": self.hang_detector or None,
            "standby": self.runner.standby_state(),
            "started_at": self._started_at,
            "updated_at": time.time(),
        }
        state.update(extra)
        try:
            write_state(self.config.run_dir, state, self.config.state_file)
        except OSError as e:
            self.events.emit(EventType.WARNING, reason=f"cannot write supervisor.json: {e}")

    def _transition(self, state: State, **extra: Any) -> None:
        """The one way the state changes: checks that the move is allowed and records it in
        ``supervisor.json``. An illegal move is a bug, reported as an internal error."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal state change {self.state.value} -> {state.value}")
        self.state = state
        self._write_state(**extra)

    def _finish(self, state: State, code: int, detail: str = "") -> int:
        self.exit_reason = exit_codes.describe(code) + (f": {detail}" if detail else "")
        self._transition(state, exit_code=code, exit_reason=self.exit_reason)
        if code != exit_codes.CHECKPOINTS_LOCKED:  # then a live writer may be using it
            self._end_memory_tier(state)
        return code

    def _end_memory_tier(self, state: State) -> None:
        """Remove the memory tier as the run ends in ``state`` (once; called before the verdict
        event, so that the verdict stays the log's last line)."""
        if not self._memory_released:
            self._memory_released = True
            release_memory_tier(self.config.run_dir, self.events.emit, state)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Run attempts until success or a reason to stop; returns the exit code."""
        self.events.emit(
            EventType.SUPERVISOR_STARTED,
            run_dir=str(self.config.run_dir),
            script=str(self.config.script),
            script_args=list(self.config.script_args),
            nproc=self.config.nproc,
            nnodes=self.config.nnodes,
            node=self.config.node_tag or None,
            node_rank=self.config.node_rank,
            rdzv_endpoint=self.config.rdzv_endpoint,
            slurm=self.config.slurm,
            max_restarts=self.config.policy.max_restarts,
            restarts_carried=self.policy.restarts_used,
            restart_window=self.config.policy.restart_window,
            crash_loop=self.config.policy.crash_loop,
        )
        self.resume_from = self._choose_checkpoint()
        self._warn_of_state_left_behind()
        while True:
            if self.interrupted:
                return self._interrupted_idle()
            locked = self._writer_lock_holder()
            if locked is not None:
                return self._checkpoints_locked(locked)
            self.attempt += 1
            result = self._run_attempt()
            outcome = result.outcome
            if outcome == Outcome.INTERRUPTED and self.runner.all_done():
                outcome = Outcome.SUCCEEDED  # every rank had finished: the signal came late
            if outcome in (Outcome.FAILED, Outcome.HUNG) and self._finished_anyway(result):
                outcome = Outcome.SUCCEEDED
            if outcome == Outcome.SUCCEEDED:
                return self._finish_success()
            if outcome == Outcome.INTERRUPTED:
                return self._finish_interrupted()
            code = self._after_failure(result)
            if code is not None:
                return code

    def _warn_of_state_left_behind(self) -> None:
        """A script that keeps its own checkpoints in the working directory would resume an
        earlier run's state there and call it this run's: say so before the first launch."""
        if self.config.uses_checkpoint_store() or self.resume_from is not None:
            return
        old = state_left_behind(Path.cwd(), self.config.run_dir, self._started_at)
        if old:
            shown = ", ".join(old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
            self.events.emit(
                EventType.WARNING,
                files=old[:20],
                reason=f"the working directory holds checkpoint-like files from before this "
                f"run ({shown}): a script that resumes from its working directory takes them "
                "for its own; keep each run's state under ROSE_RUN_DIR",
            )

    def _finished_anyway(self, result: AttemptResult) -> bool:
        """Whether the job had finished before the attempt failed: every rank reported
        ``done``, or the script created its ``--done-marker`` during the attempt. A rank that
        aborts at exit (gloo teardown) then does not restart a finished job."""
        if self.runner.all_done():
            evidence = "every rank reported done"
        elif self._done_marker_written():
            evidence = f"the script created its done marker {self.config.done_marker}"
        else:
            return False
        failure = result.failure
        self.events.emit(
            EventType.EXIT_AFTER_DONE,
            attempt=self.attempt,
            rank=failure.rank if failure else None,
            exit_code=failure.exit_code if failure else None,
            outcome=result.outcome.value,
            reason=f"{evidence} before the attempt {result.outcome.value}: the job is finished "
            "and is not restarted",
        )
        return True

    def _done_marker_written(self) -> bool:
        """Whether the ``--done-marker`` file was written during this attempt (an older one is
        another attempt's, or another run's)."""
        if not self.config.done_marker:
            return False
        try:
            return os.stat(self.config.done_marker).st_mtime >= self._launched_wall
        except OSError:
            return False

    def _durable(self) -> tuple[Path | None, int]:
        """The newest valid checkpoint on disk now, and its step (0 for none)."""
        self.resume_from = self._choose_checkpoint(memory=False)
        return self.resume_from, checkpoint_step(self.resume_from)

    def _finish_success(self) -> int:
        """Success only when the final state is durable: for a run on the checkpoint store, a
        valid checkpoint must hold the last step the workers reported."""
        newest, saved = self._durable()
        if self.config.uses_checkpoint_store() and self.step is not None and saved < self.step:
            self._end_memory_tier(State.FAILED)
            self.events.emit(
                EventType.FINAL_STATE_UNSAVED,
                attempt=self.attempt,
                step=self.step,
                durable_step=saved,
                checkpoint=str(newest) if newest else None,
                reason=f"the workers finished step {self.step}, but the newest valid "
                f"checkpoint holds step {saved}: the final state is lost",
            )
            return self._finish(
                State.FAILED,
                exit_codes.FINAL_STATE_UNSAVED,
                f"the newest valid checkpoint holds step {saved}, not the final step {self.step}",
            )
        self._end_memory_tier(State.SUCCEEDED)
        self.events.emit(
            EventType.DONE,
            attempt=self.attempt,
            step=self.step,
            checkpoint=str(newest) if newest else None,
            restarts_used=self.policy.restarts_used,
            seconds=round(time.time() - self._started_at, 3),
        )
        return self._finish(State.SUCCEEDED, exit_codes.SUCCESS)

    def _finish_interrupted(self) -> int:
        """75 (79 under SLURM) only when a valid checkpoint holds the step the workers reached;
        otherwise INTERRUPTED_UNSAVED, naming the newest durable step."""
        newest, saved = self._durable()
        verified = self.config.uses_checkpoint_store()
        # A script that keeps its own snapshots is taken at its word (its exit code); with no
        # step reported, nothing was trained beyond the checkpoint the attempt started from.
        durable = not verified or self.step is None or saved >= self.step
        self._end_memory_tier(State.INTERRUPTED)
        self.events.emit(
            EventType.EMERGENCY_CHECKPOINT,
            attempt=self.attempt,
            durable=durable,
            verified=verified,
            reached_step=self.step,
            durable_step=saved if verified else None,
            checkpoint=str(newest) if newest else None,
        )
        if durable:
            if not verified:
                where = "the script's own checkpoint"
            else:
                where = f"step {saved}" if newest else "a fresh start (nothing was trained)"
            return self._finish(
                State.INTERRUPTED, self._interrupted_code(), f"resumes from {where}"
            )
        return self._finish(
            State.INTERRUPTED,
            exit_codes.INTERRUPTED_UNSAVED,
            f"the workers had reached step {self.step}; the newest valid checkpoint holds step "
            f"{saved}",
        )

    def _choose_checkpoint(self, memory: bool = True) -> Path | None:
        """The newest valid checkpoint; a memory snapshot may win only on one node."""

        def on_event(event: dict[str, Any]) -> None:
            fields = {k: v for k, v in event.items() if k not in ("type", "time")}
            self.events.emit(str(event.get("type", "checkpoint_event")), **fields)

        tiers = {"memory": True} if memory and self.config.single_node else {}
        return self._select(self.config.run_dir, on_event=on_event, **tiers)

    def _run_attempt(self) -> AttemptResult:
        """Launch and watch one attempt, and stop it unless it succeeded."""
        launched_at = self._launch()
        resume_step = self.step or 0
        first_step_seen = False
        while True:
            if self.interrupted:
                self._stop_interrupted()
                return AttemptResult(Outcome.INTERRUPTED)
            obs = self.runner.poll()
            self._follow_workers_events()
            for type_, fields in obs.notes:
                self.events.emit(type_, **fields)
                if type_ in _STATE_CHANGING_NOTES:
                    self._write_state()
            if obs.hang_detector and obs.hang_detector != self.hang_detector:
                self.hang_detector = obs.hang_detector
                self._write_state(force=False)
            if obs.step is not None:
                first = self._steps_seen[0] if self._steps_seen else obs.step
                self._steps_seen = (
                    first,
                    max(obs.step, self._steps_seen[1] if self._steps_seen else obs.step),
                )
            if obs.step is not None and obs.step != self.step:
                self.step = obs.step
                self._write_state(force=False)
            if self._on_poll is not None:
                self._on_poll(obs)
            if not first_step_seen and obs.step is not None and obs.step > resume_step:
                first_step_seen = True
                self.events.emit(
                    EventType.FIRST_STEP,
                    attempt=self.attempt,
                    step=obs.step,
                    since_launch=round(self._clock() - launched_at, 3),
                )
            if obs.outcome == Outcome.SUCCEEDED:
                return AttemptResult(Outcome.SUCCEEDED)
            if obs.outcome in (Outcome.FAILED, Outcome.HUNG):
                return self._stop_failed(obs, launched_at)
            self._sleep(self.config.poll_interval)

    def _follow_workers_events(self) -> None:
        """Take in what the workers reported to the event log themselves: a failed checkpoint
        write is counted in ``supervisor.json`` (so ``status`` shows it), a good one clears it."""
        for record in self.events.follow():
            if record.get("type") == EventType.CHECKPOINT_WRITE_FAILED:
                self.checkpoint_failures += 1
                self.last_checkpoint_failure = f"step {record.get('step')}: {record.get('error')}"
                self._write_state()
            elif record.get("type") == EventType.CHECKPOINT_SAVED and self.checkpoint_failures:
                self.checkpoint_failures = 0
                self.last_checkpoint_failure = None
                self._write_state()

    def _launch(self) -> float:
        """Start the attempt from ``resume_from``; returns the launch time (monotonic)."""
        resume_step: int | None = checkpoint_step(self.resume_from)
        selected: dict[str, Any] = {}
        if self.resume_from is None and not self.config.uses_checkpoint_store():
            # Not a fresh start from step 0 for all we know: the script may resume from its
            # own state, which only it can read.
            resume_step = None
            selected["reason"] = (
                "no checkpoint of ours: the script resumes from its own state, if it keeps any"
            )
        tier = selection_reason(self.config.run_dir, self.resume_from, self.config.single_node)
        self.events.emit(
            EventType.CHECKPOINT_SELECTED,
            attempt=self.attempt,
            path=str(self.resume_from) if self.resume_from else None,
            step=resume_step,
            **{**tier, **selected},
        )
        self._transition(State.STARTING)
        launched_at = self._clock()
        self._launched_wall = time.time()
        self._steps_seen = None
        self.hang_detector = ""
        self.torchrun_pid = self.runner.start(self.attempt, self.resume_from)
        self.events.emit(
            EventType.LAUNCH,
            attempt=self.attempt,
            torchrun_pid=self.torchrun_pid,
            resume_from=str(self.resume_from) if self.resume_from else None,
            resume_step=resume_step,
            restarts_left=self.policy.restarts_left(),
            **self.runner.launch_info(),
        )
        self.events.emit(EventType.HANG_DETECTION, attempt=self.attempt, **self._hang_detection())
        if not self.config.single_node:
            self.events.emit(
                EventType.RENDEZVOUS_WAIT,
                attempt=self.attempt,
                endpoint=self.config.rdzv_endpoint,
                nnodes=self.config.nnodes,
                timeout=self.config.rdzv_timeout,
                reason=f"waiting up to {self.config.rdzv_timeout:g} s for {self.config.nnodes} "
                "node(s) to join",
            )
        # The step this attempt starts from; None for a fresh start until a rank reports one.
        self.step = resume_step if self.resume_from else None
        self._transition(State.RUNNING)
        return launched_at

    def _hang_detection(self) -> dict[str, Any]:
        """Which hang detector this attempt starts with, said at launch."""
        hang = self.config.hang
        if hang.require_heartbeats:
            return {
                "detector": "heartbeats",
                "reason": "the script keeps the heartbeat contract: a rank silent past its "
                "phase's allowance is hung (--require-heartbeats)",
            }
        if hang.process_hang == "no":
            return {
                "detector": "heartbeats",
                "reason": "heartbeats if the script writes them; without them only crashes are "
                "detected (--process-hang no)",
            }
        return {
            "detector": "process",
            "timeout": hang.process_timeout,
            "reason": "until a rank writes a heartbeat, the process table: a rank stopped, or "
            f"every rank idle (no CPU, no output), for {hang.process_timeout:g} s is a hang",
        }

    def _stop_failed(self, obs: Observation, launched_at: float) -> AttemptResult:
        detected_at = self._clock()
        runtime = detected_at - launched_at
        if obs.failure is not None:
            self.events.emit(
                EventType.WORKER_FAILED,
                attempt=self.attempt,
                step=self.step,
                **obs.failure.fields(),
            )
            reason = "worker failed"
        else:
            hang = obs.hang
            assert hang is not None
            self.events.emit(
                EventType.HANG_DETECTED,
                attempt=self.attempt,
                rank=hang.rank,
                pid=hang.pid,
                step=hang.step,
                phase=hang.phase,
                stalled_for=round(hang.stalled_for, 3),
                timeout=round(hang.timeout, 3),
                reason=hang.reason,
            )
            reason = "hang"
        self._transition(State.STOPPING)
        # The survivors of a failure hold nothing a restart needs (it resumes from a
        # checkpoint), unless one is writing a checkpoint: only then do they get the grace.
        grace = self.config.stop_grace if self.runner.checkpointing() else 0.0
        self.events.emit(EventType.STOPPING, attempt=self.attempt, reason=reason, grace=grace)
        report = self.runner.stop(grace)
        root: dict[str, Any] = {}
        if obs.failure is not None:
            failure = self.runner.complete(obs.failure)
            root = failure.fields()
        root_cause = {k: v for k, v in root.items() if k != "log_tail"} or None
        self._emit_stopped(report, root_cause=root_cause)
        return AttemptResult(obs.outcome, runtime, obs.failure)

    def _after_failure(self, result: AttemptResult) -> int | None:
        """Decide after a failed attempt: None to go on (after the backoff), or an exit code."""
        failure = result.failure
        if failure is not None and failure.exit_code in FATAL_WORKER_CODES:
            return self._fatal(failure)
        if failure is not None and failure.exit_code == TrainerExit.CKPT_UNLOADABLE:
            return self._next_older_checkpoint()
        previous = self.resume_from
        newest = self._choose_checkpoint()
        self.resume_from = newest
        progress = self._progress(previous, newest, result)
        progressed = progress is not None
        decision = self.policy.on_failure(attempt_runtime=result.runtime, progressed=progressed)
        if not decision.restart:
            assert decision.exit_code is not None
            crash_loop = decision.exit_code == exit_codes.CRASH_LOOP
            self._end_memory_tier(State.FAILED)
            self.events.emit(
                EventType.CRASH_LOOP if crash_loop else EventType.BUDGET_EXHAUSTED,
                attempt=self.attempt,
                attempts=self.attempt,
                restarts_used=decision.restarts_used,
                reason=decision.reason,
                exit_code=decision.exit_code,
            )
            return self._finish(State.FAILED, decision.exit_code)
        self.events.emit(
            EventType.BACKOFF,
            attempt=self.attempt,
            delay=round(decision.delay, 3),
            restarts_used=decision.restarts_used,
            restarts_left=decision.restarts_left,
            progressed=progressed,
            progress=progress
            or f"none: {self.policy.failures_without_progress} failed attempt(s) in a row "
            f"without progress (--crash-loop {self.config.policy.crash_loop})",
        )
        self._transition(State.BACKOFF)
        deadline = self._clock() + decision.delay
        while self._clock() < deadline:
            if self.interrupted:
                return self._interrupted_idle()
            self._sleep(min(self.config.poll_interval, max(0.0, deadline - self._clock())))
        return None

    def _progress(
        self, previous: Path | None, newest: Path | None, result: AttemptResult
    ) -> str | None:
        """What the failed attempt achieved that a restart keeps, in words; None for nothing.

        On the checkpoint store only a newer valid checkpoint counts: steps trained past it are
        lost. A script that keeps its own checkpoints is judged by what the supervisor can see:
        files written under ``--ckpt-path``, steps its heartbeats reported, or failing late."""
        if newest is not None and (
            previous is None or checkpoint_step(newest) > checkpoint_step(previous)
        ):
            return f"a new valid checkpoint, {newest.name}"
        if self.config.uses_checkpoint_store():
            return None
        roots = [self.config.run_dir, Path.cwd()]
        written = files_written_since(self.config.ckpt_path, roots, self._launched_wall)
        if written:
            how = "--ckpt-path" if self.config.ckpt_path else "a checkpoint-like file"
            return f"the script wrote {written[0]} ({how})"
        if self._steps_seen is not None and self._steps_seen[1] > self._steps_seen[0]:
            first, last = self._steps_seen
            return f"its heartbeats went from step {first} to {last}"
        healthy = self.config.policy.healthy_after
        if result.runtime >= healthy:
            return f"it ran {result.runtime:.0f} s before failing (--healthy-after {healthy:g})"
        return None

    def _next_older_checkpoint(self) -> int | None:
        """The workers could not use the checkpoint they were given; they marked it, so choosing
        again quarantines it with their reason. Relaunch at once from the next older one: no
        restart is spent and no backoff taken, since each such attempt sets one checkpoint
        aside. None to relaunch; an exit code when no older checkpoint is left (a fresh start
        would discard the run's history) or the choice cannot move on."""
        unusable = self.resume_from
        newest = self._choose_checkpoint()
        if newest is None or newest == unusable:
            why = "no older valid checkpoint is left" if newest is None else "it was chosen again"
            self._end_memory_tier(State.FAILED)
            self.events.emit(
                EventType.FATAL,
                attempt=self.attempt,
                exit_code=exit_codes.NO_USABLE_CHECKPOINT,
                reason=f"the workers could not use {unusable} and {why}: not starting over "
                "from scratch",
            )
            return self._finish(State.FAILED, exit_codes.NO_USABLE_CHECKPOINT)
        self.resume_from = newest
        self.events.emit(
            EventType.BACKOFF,
            attempt=self.attempt,
            delay=0.0,
            restarts_used=self.policy.restarts_used,
            restarts_left=self.policy.restarts_left(),
            progressed=False,
            reason=f"{unusable} could not be used; the next older checkpoint, at no restart",
        )
        self._transition(State.BACKOFF)
        return None

    def _fatal(self, failure: Failure) -> int:
        """A worker exit that no restart can fix: stop the run at once, spending no restart."""
        code = FATAL_WORKER_CODES[failure.exit_code]  # type: ignore[index]
        if failure.source != "worker":
            why = f"torchrun exited {failure.exit_code} (bad usage)"
        else:
            reason = _FATAL_REASONS[failure.exit_code]  # type: ignore[index]
            why = f"rank {failure.rank} exited {failure.exit_code}{reason}"
        step = self._diverged_step() if code == exit_codes.DIVERGED else None
        self._end_memory_tier(State.FAILED)
        self.events.emit(
            EventType.FATAL,
            attempt=self.attempt,
            rank=failure.rank,
            exit_code=failure.exit_code,
            reason=why + ": a restart cannot fix it; see the log tail above",
            **({"step": step} if step is not None else {}),
        )
        return self._finish(State.FAILED, code, f"at step {step}" if step is not None else "")

    def _diverged_step(self) -> int | None:
        """The step the workers' newest ``diverged`` event names (they write it into this
        event log), or None when there is none to read."""
        try:
            events = read_events(self.events.path)
        except OSError:
            return None
        steps = [e.get("step") for e in events if e.get("type") == EventType.DIVERGED]
        return steps[-1] if steps and isinstance(steps[-1], int) else None

    def _writer_lock_holder(self) -> str | None:
        """Who holds the run's checkpoint writer lock, when another process does (one node
        only: on several nodes the writer may be a peer node's rank 0 still being stopped).
        After an attempt, a holder gets ``LOCK_RELEASE_WAIT`` seconds to let go first."""
        if not self.config.single_node:
            return None
        # Before the first launch a holder is another job's; after an attempt, most likely one
        # of its workers still exiting.
        wait = LOCK_RELEASE_WAIT if self.attempt > 0 else 0.0
        return writer_lock_holder(self.config.run_dir, wait=wait)

    def _checkpoints_locked(self, holder: str) -> int:
        self.events.emit(
            EventType.FATAL,
            attempt=self.attempt,
            exit_code=exit_codes.CHECKPOINTS_LOCKED,
            reason=f"another process ({holder}) holds the checkpoint writer lock of "
            f"{self.config.run_dir}: nothing was launched",
        )
        return self._finish(State.FAILED, exit_codes.CHECKPOINTS_LOCKED, f"held by {holder}")

    def _stop_interrupted(self) -> None:
        signum = self._signals[0]
        name = _signal_name(signum)
        self.events.emit(EventType.INTERRUPTED, attempt=self.attempt, signal=name, step=self.step)
        self._transition(State.STOPPING)
        forwarded = self.runner.forward_sigterm()
        timeout = self.config.term_timeout
        self.events.emit(
            EventType.STOPPING,
            attempt=self.attempt,
            reason=f"{name}: workers asked to checkpoint and exit",
            grace=timeout,
            forwarded=forwarded,
        )
        # A second signal cuts the wait short.
        deadline = self._clock() + timeout
        had_workers = bool(self.runner.worker_pids())
        while self._clock() < deadline and len(self._signals) < 2:
            obs = self.runner.poll()
            if obs.step is not None:
                self.step = obs.step
            # Wait for every worker, not just the first to exit: rank 0 may still be writing.
            live = self.runner.worker_pids()
            if not self.runner.attempt_alive() or (had_workers and not live):
                break
            if live and not had_workers:  # started after the signal: they must hear it too
                self.runner.forward_sigterm()
                had_workers = True
            self._sleep(self.config.poll_interval)
        report = self.runner.stop(0.0, already_signalled=True)
        self._emit_stopped(report)

    def _emit_stopped(self, report: StopReport, **extra: Any) -> None:
        self.events.emit(
            EventType.STOPPED,
            attempt=self.attempt,
            seconds=round(report.seconds, 3),
            terminated=report.terminated,
            killed=report.killed,
            leftovers=report.leftovers,
            **extra,
        )

    def _interrupted_idle(self) -> int:
        name = _signal_name(self._signals[0])
        self._end_memory_tier(State.INTERRUPTED)
        self.events.emit(EventType.INTERRUPTED, attempt=self.attempt, signal=name, step=self.step)
        return self._finish(State.INTERRUPTED, self._interrupted_code())

    def _interrupted_code(self) -> int:
        """REQUEUE for SLURM's pre-timeout signal or its SIGTERM, else INTERRUPTED."""
        if self.config.slurm and self._signals[0] in (signal.SIGUSR1, signal.SIGTERM):
            return exit_codes.REQUEUE
        return exit_codes.INTERRUPTED


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _getpid() -> int:
    return os.getpid()
