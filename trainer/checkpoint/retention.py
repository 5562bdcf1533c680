"""Retention: which committed checkpoints to keep after a new one lands."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runcontract.events import EventType

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
    doomed = _beyond(ckpt_dir, policy, policy.keep_last, is_valid or _verifies)
    return _remove_all(ckpt_dir, doomed, on_event, lambda: False)


def free_space(
    ckpt_dir: Path,
    policy: RetentionPolicy,
    need: int,
    on_event: EventSink | None = None,
    is_valid: Callable[[Path], bool] | None = None,
) -> list[Path]:
    """Make room for the save in hand: prune now, oldest first, what :func:`prune` would prune
    once it has landed, until ``need`` bytes are free in ``ckpt_dir``.

    The save will be the newest of ``keep_last``, so the newest ``keep_last - 1`` valid ones stay,
    and always the newest valid one (the save may yet fail), milestones too: with no valid
    checkpoint nothing goes. Events: ``checkpoint_pruned`` with ``reason: "disk space"``.
    Returns the pruned paths.
    """
    keep = max(1, policy.keep_last - 1)
    doomed = _beyond(ckpt_dir, policy, keep, is_valid or _verifies)[::-1]
    return _remove_all(
        ckpt_dir,
        doomed,
        on_event,
        lambda: shutil.disk_usage(ckpt_dir).free >= need,
        reason="disk space",
    )


def _beyond(
    ckpt_dir: Path, policy: RetentionPolicy, keep: int, check: Callable[[Path], bool]
) -> list[tuple[int, Path]]:
    """The checkpoints, newest first, older than the newest ``keep`` valid ones, milestones
    left out: none at all while fewer than ``keep`` are valid."""
    kept_valid = 0
    beyond = []
    for step, path in step_dirs(ckpt_dir):
        if kept_valid < keep:
            if check(path):
                kept_valid += 1
        elif not policy.is_milestone(step):
            beyond.append((step, path))
    return beyond


def _remove_all(
    ckpt_dir: Path,
    doomed: list[tuple[int, Path]],
    on_event: EventSink | None,
    enough: Callable[[], bool],
    **fields: object,
) -> list[Path]:
    """Remove ``doomed`` in order until ``enough()``; fsync the parent once at the end."""
    pruned = []
    for step, path in doomed:
        if enough():
            break
        if _remove(ckpt_dir, step, path, on_event, **fields):
            pruned.append(path)
    if pruned:
        fsio.fsync_dir(ckpt_dir)
    return pruned


def _remove(
    ckpt_dir: Path, step: int, path: Path, on_event: EventSink | None, **fields: object
) -> bool:
    """Rename ``path`` to a ``.del-`` name (a concurrent reader sees it whole or gone), then
    delete it; False when it was already gone."""
    doomed = ckpt_dir / work_name(DEL_PREFIX, step)
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    emit(on_event, {"type": EventType.CHECKPOINT_PRUNED, "path": str(path), "step": step, **fields})
    return True


def _verifies(path: Path) -> bool:
    try:
        verify(path)
        return True
    except (CheckpointInvalid, CheckpointIncompatible):
        return False
