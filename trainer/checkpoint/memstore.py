"""``MemoryStore``: the writer of the memory tier (rank 0 only, like the disk store).

Every K steps the same snapshot a disk checkpoint holds is committed into shared memory on the
node, in a disk checkpoint's layout (temp directory, manifest last, rename) with the fast xxh3
checksum. Two slots are rewritten in place, alternately (``memslots``), so the newest committed
snapshot is always there and a snapshot costs about one copy of the state. A layout the slots
cannot map falls back to writing each snapshot anew (``commit.write_checkpoint``). The write is
synchronous: it costs a memory copy and a hash at memory speed, and a snapshot that lands in the
background could not bound the steps a kill loses.

The tier must never cost the run: a missing or full root, or any write error, turns it off for
the rest of this process with one ``memory_save_failed`` event, and training goes on.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runcontract.events import EventType
from runcontract.layout import memory_dir, memory_root

from . import hashing, memtier
from .commit import write_checkpoint
from .errors import describe
from .integrity import EventSink, emit, remove_stale_work_dirs, step_dirs, warn
from .layout import step_name
from .liveplan import LivePlan
from .memslots import SLOTS, NonFiniteSnapshot, SlotWriter
from .state import Snapshot, host_copy

#: A snapshot is written only when this much more than its size is free in the root.
ROOM_MARGIN = 1.05


class MemoryStore:
    """Commits snapshots to ``<root>/rose-<id>/`` (``runcontract.layout.memory_dir``).

    Args:
        run_dir: the run directory the snapshots belong to.
        enabled: False (another rank than 0, several nodes, ``--mem-every 0``): every method
            returns at once.
        on_event: called with ``memory_saved`` / ``memory_save_failed`` events.
        event_every: seconds between two ``memory_saved`` events (0: one per snapshot). A
            snapshot every few steps would otherwise flood the events file; each event counts
            the snapshots since the one before it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        enabled: bool,
        on_event: EventSink | None = None,
        event_every: float = 0.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.event_every = event_every
        self._event_due = float("-inf")
        self._unreported = 0
        self._newest: int | None = None  # the newest step this store committed
        self.on_event = on_event
        self.dir = memory_dir(run_dir)
        self.off_reason: str | None = None if enabled else "disabled"
        self.last_path: Path | None = None
        self._claimed = False
        self._slots: SlotWriter | None = SlotWriter(self.dir, self._ensure_room)
        self._live = LivePlan()

    @property
    def enabled(self) -> bool:
        """True while snapshots are being written."""
        return self.off_reason is None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: Any,
        train_state: dict[str, Any] | None,
        meta: dict[str, Any] | None,
    ) -> bool:
        """Commit a snapshot of ``step``; True when it landed. Never raises for the file system:
        a failure turns the tier off (event ``memory_save_failed``) and returns False."""
        if not self.enabled:
            return False
        started = time.monotonic()
        # The live tensors: the slot writer copies them once, straight into the mapped files.
        snap = self._live.capture(step, model, optimizer, scaler, train_state, meta)
        try:
            path = self._commit(snap)
        except NonFiniteSnapshot:
            return False  # never a snapshot a resume would diverge from; the loop will say why
        except Exception as e:  # noqa: BLE001 - whatever it is, the run goes on without the tier
            self._turn_off(step, e)
            return False
        self.last_path, self._newest = path, step
        self._unreported += 1
        now = time.monotonic()
        if now >= self._event_due:
            self._event_due = now + self.event_every
            emit(
                self.on_event,
                {
                    "type": EventType.MEMORY_SAVED,
                    "step": step,
                    "path": str(path),
                    "bytes": snap.nbytes,
                    "seconds": round(now - started, 4),
                    "snapshots": self._unreported,
                },
            )
            self._unreported = 0
        return True

    def _commit(self, snap: Snapshot) -> Path:
        if not self._claimed or not self.dir.is_dir():  # also: removed under us, by hand
            root = memory_root()
            if not root.is_dir():
                raise OSError(errno.ENOENT, f"the memory tier's root {root} is not a directory")
            self._claim()
            self._newest = None
        # Under the writer lock only this store writes here: past its newest step, none to drop.
        if self._newest is None or snap.step <= self._newest:
            self._drop_from(snap.step)
        if self._slots is not None:
            try:
                return self._slots.commit(snap)
            except ValueError:  # a layout the slots cannot map: each snapshot is written anew
                self._slots = None
        older = [path for step, path in step_dirs(self.dir) if step < snap.step]
        for path in older[SLOTS - 1 :]:  # the older slot goes before the next is written
            shutil.rmtree(path)
        if snap.nonfinite:
            raise NonFiniteSnapshot(snap.nonfinite)
        self._ensure_room(snap.nbytes)
        path, _ = write_checkpoint(self.dir, host_copy(snap), file_hash=hashing.FAST, durable=False)
        return path

    def _ensure_room(self, nbytes: int) -> None:
        need = int(nbytes * ROOM_MARGIN)
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"{free} bytes free in {memory_root()}, a snapshot needs about {need}",
            )

    def drop_from(self, step: int) -> None:
        """Remove the snapshots of ``step`` and later: after a rollback they belong to a past
        this run no longer continues, and a kill must not resume it. A failure turns the tier
        off, as in :meth:`save`."""
        if not self.enabled:
            return
        try:
            if not self._claimed:
                self._claim()
            self._drop_from(step)
            self._newest = None
        except Exception as e:  # noqa: BLE001
            self._turn_off(step, e)

    def _drop_from(self, step: int) -> None:
        # Also a snapshot of this very step, left by an attempt that died: it is rewritten.
        for s, path in step_dirs(self.dir):
            if s >= step:
                shutil.rmtree(path)

    def _claim(self) -> None:
        untrusted = memtier.untrusted_reason(self.dir)
        if untrusted is not None:
            raise ValueError(untrusted)
        if self.dir.exists() and memtier.stale_reason(self.run_dir, self.dir) is not None:
            shutil.rmtree(self.dir)  # an earlier run directory's, at this path
        memtier.claim(self.run_dir, self.dir)
        # We write under the disk writer lock, so no other writer lives: its debris goes.
        remove_stale_work_dirs(self.dir, self.on_event, all_but_self=True)
        self._claimed = True

    def _turn_off(self, step: int, e: BaseException) -> None:
        code = getattr(e, "errno", None)
        kind = errno.errorcode.get(code, "") if isinstance(code, int) else ""
        self.off_reason = describe(e) if isinstance(e, OSError) else str(e)
        warn(
            self.on_event,
            f"memory snapshot {step_name(step)} was not written ({self.off_reason}); the memory "
            "tier is off for the rest of this attempt, training goes on",
            {
                "type": EventType.MEMORY_SAVE_FAILED,
                "step": step,
                "path": str(self.dir),
                "errno": kind or None,
                "error": self.off_reason,
            },
        )
