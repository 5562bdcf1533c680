"""The boundary between the loop (which decides) and the runner (which acts): the values that
cross it and the ``Runner`` protocol. Both sides import this module, and nothing else of each
other."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Outcome(str, enum.Enum):
    """How one attempt ended, as the runner saw it."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HUNG = "hung"
    INTERRUPTED = "interrupted"
    """A signal asked the run to stop; the attempt has been stopped."""


def signal_name(code: int | None) -> str | None:
    """``SIGKILL`` for an exit code of -9 (Popen's convention), else None."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclass
class Failure:
    """Why an attempt failed: the earliest failing rank, or torchrun itself."""

    source: str
    """``worker`` or ``torchrun``."""
    rank: int | None = None
    local_rank: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    """Popen convention: the code, or -N for signal N; None when not (yet) known."""
    log_tail: str = ""

    @property
    def signal(self) -> str | None:
        return signal_name(self.exit_code)

    def fields(self) -> dict[str, Any]:
        """The event fields describing this failure."""
        return {
            "source": self.source,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "log_tail": self.log_tail,
        }


@dataclass(frozen=True)
class Hang:
    """A rank that stopped making progress."""

    rank: int | None
    """Global rank, or None when the stuck worker never wrote a heartbeat."""
    pid: int | None
    step: int | None
    phase: str
    stalled_for: float
    timeout: float
    reason: str


@dataclass
class Observation:
    """One look at the running attempt."""

    outcome: Outcome
    failure: Failure | None = None
    hang: Hang | None = None
    step: int | None = None
    """Highest step any rank reported (None before the first heartbeat)."""
    hang_detector: str = ""
    """What judges hangs now: ``heartbeats``, ``process`` (the process table, for a script that
    has written none) or ``off``; empty when not known."""
    notes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Events the loop should log (``workers_started``, ``hang_timeout``, …)."""


@dataclass(frozen=True)
class StopReport:
    """What stopping an attempt took."""

    terminated: int
    """Workers that exited after SIGTERM."""
    killed: int
    """Workers that needed SIGKILL (after the grace period)."""
    leftovers: int
    """Processes the final walk still found and killed."""
    seconds: float


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended, as the loop hands it to the restart decision."""

    outcome: Outcome
    """SUCCEEDED, FAILED, HUNG or INTERRUPTED (the attempt is stopped in every case)."""
    runtime: float = 0.0
    """Seconds from the launch to the detection of the failure."""
    failure: Failure | None = None
    """The root cause of a FAILED attempt."""


class Runner(Protocol):
    """The mechanics the loop drives (``supervisor.runner.TorchrunRunner``, or a fake in tests)."""

    def start(self, attempt: int, resume_from: Path | None) -> int: ...
    def poll(self) -> Observation: ...
    def forward_sigterm(self) -> int: ...
    def stop(self, grace: float, already_signalled: bool = False) -> StopReport: ...
    def complete(self, failure: Failure) -> Failure: ...
    def worker_pids(self) -> dict[str, int]: ...
    def attempt_alive(self) -> bool: ...
    def all_done(self) -> bool: ...
    def launch_info(self) -> dict[str, Any]: ...
    def standby_state(self) -> dict[str, Any] | None: ...
    def checkpointing(self) -> bool: ...
