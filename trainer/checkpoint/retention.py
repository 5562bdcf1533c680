"""Retention: which committed checkpoints to keep after a new one lands."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import fsio
from .errors import CheckpointIncompatible, CheckpointInvalid
from .integrity import EventSink, emit, step_dirs, verify
from .layout import DEL_PREFIX, work_name


@dataclass(frozen=True)
class RetentionPolicy:
    """How many checkpoints survive pruning."""

    keep_last: int = 3
    """Keep the newest ``keep_last`` *valid* checkpoints (invalid ones do not count). At least 1."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (milestones); 0 = none."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(
                f"keep_last must be an integer >= 1 (the newest checkpoint is what a restart "
                f"resumes from), got {self.keep_last!r}"
            )
        if not isinstance(self.keep_every, int) or self.keep_every < 0:
            raise ValueError(
                f"keep_every must be an integer >= 0 (0 = no milestones), got {self.keep_every!r}"
            )

    def is_milestone(self, step: int) -> bool:
        """True when ``step`` is kept forever as a milestone."""
        return self.keep_every > 0 and step % self.keep_every == 0


def prune(
    ckpt_dir: Path,
    policy: RetentionPolicy,
    on_event: EventSink | None = None,
    is_valid: Callable[[Path], bool] | None = None,
) -> list[Path]:
    """Delete checkpoints older than the newest ``keep_last`` valid ones, except milestones.

    Checkpoints newer than the oldest kept one are never touched, valid or not (an invalid one is
    for ``find_latest_valid`` to quarantine). A pruned directory is first renamed to a ``.del-``
    name, so a concurrent reader sees it either whole or gone. Returns the pruned paths.
    """
    check = is_valid or _verifies
    kept_valid = 0
    pruned = []
    for step, path in step_dirs(ckpt_dir):
        if kept_valid < policy.keep_last:
            if check(path):
                kept_valid += 1
            continue
        if policy.is_milestone(step):
            continue
        doomed = ckpt_dir / work_name(DEL_PREFIX, step)
        try:
            path.rename(doomed)
        except FileNotFoundError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        pruned.append(path)
        emit(on_event, {"type": "checkpoint_pruned", "path": str(path), "step": step})
    if pruned:
        fsio.fsync_dir(ckpt_dir)
    return pruned


def _verifies(path: Path) -> bool:
    try:
        verify(path)
        return True
    except (CheckpointInvalid, CheckpointIncompatible):
        return False
