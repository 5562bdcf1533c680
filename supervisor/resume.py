"""Choosing the checkpoint an attempt resumes from: the newest that verifies, across the disk and,
on one node, the memory tier; and removing the memory tier once the run is over."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import tenacity

from runcontract import layout
from runcontract.states import State
from trainer.supervised import read_owner

EventSink = Callable[[dict[str, Any]], None]


def select_checkpoint(
    run_dir: Path, on_event: EventSink | None = None, *, memory: bool = False
) -> Path | None:
    """The newest verified checkpoint of ``run_dir``, or None for a fresh start. With
    ``memory``, a snapshot of the memory tier newer than the newest valid disk checkpoint wins
    (the disk wins a tie: it is durable).

    Invalid newer ones are quarantined by the checkpoint store (invalid memory snapshots are
    removed), which reports each through ``on_event``. Raises OSError when the checkpoint
    directory cannot be read.
    """
    disk = None
    if (run_dir / layout.CHECKPOINTS).is_dir():
        from trainer.checkpoint import find_latest_valid

        disk = find_latest_valid(run_dir, on_event=on_event)
    if not memory:
        return disk
    from trainer.checkpoint.memtier import find_latest_valid_memory

    newer = find_latest_valid_memory(run_dir, on_event, newer_than=checkpoint_step(disk))
    if newer is None and disk is None:
        return None
    return newer or disk


def selection_reason(run_dir: Path, chosen: Path | None, single_node: bool) -> dict[str, Any]:
    """``tier`` (``memory``, ``disk``, or None for a fresh start) and ``reason`` of a choice by
    :func:`select_checkpoint`, for the ``checkpoint_selected`` event."""
    from trainer.checkpoint.memtier import memory_slots

    tier = None if chosen is None else ("memory" if is_memory(run_dir, chosen) else "disk")
    if not single_node:
        why = "several nodes: a memory snapshot lives on one node only, so the disk decides"
    elif tier == "memory":
        disk = _newest_disk_step(run_dir)
        on_disk = f"step {disk}" if disk is not None else "none"
        why = f"the memory snapshot is newer than the newest valid disk checkpoint ({on_disk})"
    elif memory_slots(run_dir):
        why = "no memory snapshot is newer than the newest valid disk checkpoint"
    else:
        why = "no valid memory snapshot"
    return {"tier": tier, "reason": why}


def _newest_disk_step(run_dir: Path) -> int | None:
    # Names only: the choice has just quarantined every invalid one newer than its pick.
    try:
        names = os.listdir(run_dir / layout.CHECKPOINTS)
    except OSError:
        return None
    steps = [s for s in map(layout.parse_step, names) if s is not None]
    return max(steps, default=None)


def is_memory(run_dir: Path, path: Path) -> bool:
    """Whether ``path`` is a snapshot of ``run_dir``'s memory tier."""
    return path.parent == layout.memory_dir(run_dir)


def release_memory_tier(run_dir: Path, emit: Callable[..., object], state: State) -> None:
    """Remove ``run_dir``'s memory tier once the run ends in ``state``: always after a success
    or a failure (the run is finished or abandoned); after an interrupt only when it holds no
    step newer than the disk (else a relaunch on this node resumes from it). Left alone while
    another process holds the checkpoint writer lock (a live writer's) after
    ``LOCK_RELEASE_WAIT`` seconds: a stopped worker may still be letting go. Never raises."""
    from trainer.checkpoint.memtier import memory_slots, remove_memory

    try:
        slots = memory_slots(run_dir)
        if not slots or writer_lock_holder(run_dir, wait=LOCK_RELEASE_WAIT) is not None:
            return
        if state == State.INTERRUPTED and slots[0][0] > (_newest_disk_step(run_dir) or 0):
            return

        def on_event(event: dict[str, Any]) -> None:
            emit(event["type"], **{k: v for k, v in event.items() if k not in ("type", "time")})

        reason = {State.SUCCEEDED: "the run finished", State.FAILED: "the run was abandoned"}
        remove_memory(run_dir, on_event, reason.get(state, "the disk holds every step it did"))
    except OSError:
        pass  # shared memory is freed at reboot anyway; the run's outcome stands


def checkpoint_step(path: Path | None) -> int:
    """The step a checkpoint directory holds (0 for None), from its ``step-XXXXXXXX`` name."""
    if path is None:
        return 0
    step = layout.parse_step(path.name)
    if step is not None:
        return step
    from trainer.checkpoint import verify

    return int(verify(path)["step"])


#: Seconds a lock held after an attempt's stop gets to be let go: a SIGKILLed worker whose main
#: thread is already reaped can hold its files until its last thread is gone.
LOCK_RELEASE_WAIT = 10.0


def writer_lock_holder(run_dir: Path, wait: float = 0.0) -> str | None:
    """Who holds ``checkpoints/.writer.lock`` of ``run_dir`` when another process does ("pid N
    on HOST", or "an unknown process"); None when it is free. Takes and drops the lock at once;
    with ``wait``, looks again every 50 ms for up to that many seconds until it is free."""
    if wait <= 0:
        return _lock_holder(run_dir)
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda held: held is not None),
        stop=tenacity.stop_after_delay(wait),
        wait=tenacity.wait_fixed(0.05),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    return retrying(_lock_holder, run_dir)


def _lock_holder(run_dir: Path) -> str | None:
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
