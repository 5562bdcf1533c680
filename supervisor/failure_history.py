"""The failures a run has seen and how long its attempts ran, read from its events file.

Handed to each attempt (``ROSE_FAILURES``, ``ROSE_RUN_SECONDS``, ``ROSE_MEMORY_RECOVERIES``) so
that the built-in trainer can estimate the mean time between failures for its auto checkpoint
intervals: of all failures for the memory tier, of those the memory tier did not recover for the
disk. Read from the events, not kept in memory, so that it spans supervisor restarts (a requeue,
a relaunch).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runcontract import env
from runcontract.events import CHAOS_SOURCE, EventType, read_jsonl

FAILURES = frozenset({EventType.WORKER_FAILED, EventType.HANG_DETECTED})
"""What counts as a failure. An interruption (preemption) is planned, not a failure."""
OTHER_WRITERS = frozenset({"trainer", CHAOS_SOURCE})
"""The ``source`` of the events not the supervisor's own (a failure's ``source`` field names
what failed: ``worker`` or ``torchrun``)."""
ENDS = frozenset(
    {
        EventType.STOPPED,
        EventType.DONE,
        EventType.LAUNCH,
        EventType.SUPERVISOR_STARTED,
    }
)
"""What ends an attempt's running time: its stop, the run's end, or the next start (a
supervisor that was killed wrote no stop)."""


@dataclass(frozen=True)
class FailureHistory:
    failures: int
    seconds: float
    memory_recoveries: int = 0
    """Failures after which the next attempt resumed from the memory tier."""

    def environment(self) -> dict[str, str]:
        return {
            env.FAILURES: str(self.failures),
            env.RUN_SECONDS: f"{self.seconds:.1f}",
            env.MEMORY_RECOVERIES: str(self.memory_recoveries),
        }


def failure_history(events: Iterable[dict[str, Any]]) -> FailureHistory:
    """Count the failures and those the memory tier recovered (the next ``checkpoint_selected``
    after them chose a memory snapshot), and add up the time from each ``launch`` to what ended
    it."""
    failures, seconds, recovered = 0, 0.0, 0
    unresumed = 0  # failures since the last checkpoint choice
    launched: float | None = None
    for event in events:
        if event.get("source") in OTHER_WRITERS:
            continue
        kind, at = event.get("type"), event.get("time")
        if not isinstance(at, (int, float)):
            continue
        if kind in FAILURES:
            failures += 1
            unresumed += 1
        if kind == EventType.CHECKPOINT_SELECTED:
            if event.get("tier") == "memory":
                recovered += unresumed
            unresumed = 0
        if kind in ENDS and launched is not None:
            seconds += max(0.0, at - launched)
            launched = None
        if kind == EventType.LAUNCH:
            launched = at
    return FailureHistory(failures, seconds, recovered)


def read_failure_history(events_file: Path) -> FailureHistory:
    """The history in ``events_file``; none when it cannot be read (the prior then holds)."""
    try:
        return failure_history(read_jsonl(events_file))
    except OSError:
        return FailureHistory(0, 0.0)
