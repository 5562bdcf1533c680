"""Choosing the checkpoint an attempt resumes from: the newest that verifies."""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_STEP_DIR = re.compile(r"^step-(\d+)$")

EventSink = Callable[[dict[str, Any]], None]


def select_checkpoint(run_dir: Path, on_event: EventSink | None = None) -> Path | None:
    """The newest verified checkpoint of ``run_dir``, or None for a fresh start.

    Invalid newer ones are quarantined by the checkpoint store, which reports each through
    ``on_event``. Raises OSError when the checkpoint directory cannot be read.
    """
    if not (run_dir / "checkpoints").is_dir():
        return None  # a fresh run: no need to import the store (and torch) yet
    from trainer.checkpoint import find_latest_valid

    return find_latest_valid(run_dir, on_event=on_event)


def checkpoint_step(path: Path | None) -> int:
    """The step a checkpoint directory holds (0 for None), from its ``step-XXXXXXXX`` name."""
    if path is None:
        return 0
    match = _STEP_DIR.match(path.name)
    if match:
        return int(match.group(1))
    from trainer.checkpoint import verify

    return int(verify(path)["step"])


def prewarm() -> threading.Thread:
    """Import the checkpoint store (and with it torch) in a background thread.

    The first recovery then does not pay for the import (seconds on a busy machine) between
    stopping the failed attempt and launching the next one. Import errors surface later, at
    the real call.
    """

    def _import() -> None:
        try:
            importlib.import_module("trainer.checkpoint")
        except Exception:  # noqa: BLE001 - reported by the real import in select_checkpoint
            pass

    thread = threading.Thread(target=_import, name="rose-prewarm", daemon=True)
    thread.start()
    return thread
