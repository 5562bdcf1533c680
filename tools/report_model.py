"""What the run report holds: the attempts, failures and recoveries of one run (one node's, on
several nodes), as read back from its run directory (``tools.report``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PHASES = ("detect", "stop", "backoff", "launch", "first_step")
"""The phases of one recovery, in order (``tools.report`` says what each one spans)."""


@dataclass
class Attempt:
    """One launch of torchrun, as the events tell it."""

    number: int
    """1-based over the whole run directory (a relaunched supervisor continues the count)."""
    supervisor_attempt: int
    """The attempt number the supervisor logged (restarts at 1 when a supervisor is relaunched)."""
    launched_at: float
    """Unix time of the ``launch`` event."""
    resume_step: int | None
    """The step it resumed from (0: a fresh start; None: a script that resumes from its own
    state, at a step it does not report)."""
    workers_started_at: float | None = None
    first_step_at: float | None = None
    """Unix time the first step after ``resume_step`` completed."""
    ended_at: float | None = None
    """Unix time the attempt was over (stopped, or the run ended); None when the log stops."""
    outcome: str = "unknown"
    """``succeeded``, ``failed``, ``hung``, ``interrupted``, or ``unknown`` (log ends mid-way)."""
    last_step: int | None = None
    """The highest step known to have been reached in this attempt."""
    standby: bool = False
    """Started by opening a standby's gate rather than by a cold start."""


@dataclass
class FailureRecord:
    """One failed attempt: its cause, its root-cause rank, and the work it cost."""

    attempt: int
    """``Attempt.number`` of the failed attempt."""
    cause: str
    """Human cause, e.g. ``worker killed by SIGKILL``, ``hang``, ``torchrun exited 1``."""
    rank: int | None
    """The root-cause rank (the earliest failing rank; the stalled rank of a hang)."""
    pid: int | None
    exit_code: int | None
    signal: str | None
    detected_at: float
    injected: str | None = None
    """The chaos fault kind that caused it, when one was logged."""
    injected_at: float | None = None
    step: int | None = None
    """The last step reached before the failure (None when the events do not tell)."""
    resumed_from: int | None = None
    """The step the next attempt resumed from (None when there was no next attempt)."""

    @property
    def steps_lost(self) -> int | None:
        """Steps done but not kept: ``step - resumed_from`` (None when either is unknown)."""
        if self.step is None or self.resumed_from is None:
            return None
        return max(0, self.step - self.resumed_from)


@dataclass
class Recovery:
    """The phases from one failure to the first completed step after the resume, in seconds."""

    failed_attempt: int
    next_attempt: int
    phases: dict[str, float | None]
    """Seconds per phase of ``PHASES``; None when an event the phase needs is missing."""
    first_step_source: str
    """``metrics`` or ``event``: where the first step's time came from."""
    standby: bool = False
    """The next attempt was a standby: its ``launch`` phase is the gate opening."""

    @property
    def total(self) -> float | None:
        """Fault (or detection, when no fault was logged) → first step after resume."""
        values = [self.phases[p] for p in PHASES if p != "detect"]
        if any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None) + (self.phases["detect"] or 0.0)


@dataclass
class Checkpoint:
    """The newest checkpoint that verifies."""

    step: int
    path: Path
    params_sha256: str | None = None
    """The hash of its parameters, as its manifest records it."""


@dataclass
class Report:
    """Everything the summary and the plot show. Times are unix seconds."""

    run_dir: Path
    started_at: float | None
    ended_at: float | None
    end_state: str
    """The run's end: ``succeeded``, ``interrupted``, a give-up reason, or ``running or lost``."""
    attempts: list[Attempt] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    cold_start: float | None = None
    """Seconds from the first launch to the first completed step."""
    start_step: int | None = 0
    """The step the run directory's first attempt started from (None: not known)."""
    final_step: int | None = None
    newest_checkpoint: Checkpoint | None = None
    loss: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) from metrics.jsonl."""
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    faults_injected: int = 0
    divergences: list[tuple[int | None, str]] = field(default_factory=list)
    """(step, what the trainer did: ``rollback`` or ``stop``) per ``diverged`` event."""
    skipped: list[tuple[int, int]] = field(default_factory=list)
    """Ranges ``[start, end)`` of sampler positions the run skipped after divergences, as the
    newest ``data_skipped`` event records them."""
    intervals: list[tuple[int, str, int]] = field(default_factory=list)
    """(step, tier, interval in steps) per ``checkpoint_interval`` event: the auto intervals
    the trainer chose, ``disk`` or ``memory``."""
    node: str | None = None
    """The node's tag on a multi-node run directory (its ``events-<tag>.jsonl``); None on one."""

    @property
    def wall_seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)

    @property
    def useful_steps(self) -> int | None:
        """Steps that count: the final step minus where the run started."""
        if self.final_step is None:
            return None
        return max(0, self.final_step - (self.start_step or 0))

    @property
    def goodput(self) -> float | None:
        """Useful steps per wall-clock second over the whole run (None when unknown)."""
        wall, useful = self.wall_seconds, self.useful_steps
        if not wall or useful is None:
            return None
        return useful / wall

    @property
    def steps_lost(self) -> int:
        """Steps lost over all failures whose loss is known."""
        return sum(f.steps_lost or 0 for f in self.failures)

    def causes(self) -> list[tuple[str, int, list[int | None]]]:
        """(cause, count, root-cause ranks in order) per cause, most frequent first."""
        counts = Counter(f.cause for f in self.failures)
        return [
            (cause, n, [f.rank for f in self.failures if f.cause == cause])
            for cause, n in counts.most_common()
        ]


def gap(start: float | None, end: float | None) -> float | None:
    """``end - start``, or None when either is unknown."""
    if start is None or end is None:
        return None
    return end - start
