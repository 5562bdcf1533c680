"""What a rank reports in ``heartbeats/rank-<R>.json``: ``rank``, ``pid``, ``attempt``,
``step`` (completed optimizer steps), ``phase`` and ``time``."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

from runcontract import layout


class Phase(str, enum.Enum):
    """Where a rank is; each phase has its own allowance before the supervisor calls a hang."""

    STARTUP = "startup"
    TRAIN = "train"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    DONE = "done"
    """The script finished: a rank in this phase is never hung, and a signal after every rank
    reported it does not change the run's outcome."""


PHASES = tuple(p.value for p in Phase)


def read_heartbeat(run_dir: Path, rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s newest heartbeat in ``RUN_DIR/heartbeats``, or None while there is none
    (or it is being replaced right now)."""
    try:
        record = json.loads((run_dir / layout.HEARTBEATS / layout.heartbeat_name(rank)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
