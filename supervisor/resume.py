"""Choosing the checkpoint an attempt resumes from: the newest that verifies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock

from runcontract import layout
from trainer.supervised import read_owner

EventSink = Callable[[dict[str, Any]], None]


def select_checkpoint(run_dir: Path, on_event: EventSink | None = None) -> Path | None:
    """The newest verified checkpoint of ``run_dir``, or None for a fresh start.

    Invalid newer ones are quarantined by the checkpoint store, which reports each through
    ``on_event``. Raises OSError when the checkpoint directory cannot be read.
    """
    if not (run_dir / layout.CHECKPOINTS).is_dir():
        return None  # a fresh run: no need to import the store (and torch) yet
    from trainer.checkpoint import find_latest_valid

    return find_latest_valid(run_dir, on_event=on_event)


def checkpoint_step(path: Path | None) -> int:
    """The step a checkpoint directory holds (0 for None), from its ``step-XXXXXXXX`` name."""
    if path is None:
        return 0
    step = layout.parse_step(path.name)
    if step is not None:
        return step
    from trainer.checkpoint import verify

    return int(verify(path)["step"])


def writer_lock_holder(run_dir: Path) -> str | None:
    """Who holds ``checkpoints/.writer.lock`` of ``run_dir`` when another process does ("pid N
    on HOST", or "an unknown process"); None when it is free. Takes and drops the lock at once."""
    ckpt_dir = run_dir / layout.CHECKPOINTS
    if not ckpt_dir.is_dir():
        return None
    lock = filelock.FileLock(
        str(ckpt_dir / layout.WRITER_LOCK), timeout=0, thread_local=False, preserve_lock_file=True
    )
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        owner = read_owner(ckpt_dir / layout.WRITER_OWNER)
        return f"pid {owner[0]} on {owner[1]}" if owner is not None else "an unknown process"
    except OSError:
        return None  # an unreadable directory is the checkpoint choice's to report
    lock.release()
    return None
