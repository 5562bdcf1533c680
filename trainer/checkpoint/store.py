"""``CheckpointStore``: the trainer's handle on its run directory's checkpoints.

Saving is asynchronous by default. ``save()`` blocks only while the state is copied to host
memory; a background *thread* then serialises, hashes, writes, fsyncs and commits. A thread was
chosen over a process after measuring both (docs/checkpoints.md, "Benchmarks"): the heavy parts
(file writes, fsync, sha256) release the GIL, and a process would need the same host copy plus a
hand-over through shared memory. At most one save is in flight; the next ``save()`` waits for it.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runcontract.events import EventType

from . import manifest
from .commit import write_checkpoint
from .errors import CheckpointError, CheckpointInvalid, CheckpointWriteFailed
from .integrity import EventSink, emit, quarantine, remove_stale_work_dirs, step_dirs, verify, warn
from .layout import checkpoints_dir, step_name
from .lock import WriterLock
from .retention import RetentionPolicy, free_space, prune
from .state import Snapshot, capture

#: Nice value of the background writer thread (Linux threads have their own).
BACKGROUND_NICE = 10
#: Preflight wants this much more free space than the checkpoint itself needs.
PREFLIGHT_MARGIN = 1.05
#: A write that fails with one of these is retried once, after pruning to make room.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class CheckpointStore:
    """Saves checkpoints into ``RUN_DIR/checkpoints``; only the writer (global rank 0) writes.

    Args:
        run_dir: the run directory (``checkpoints/`` is created inside it).
        is_writer: True on exactly one process (global rank 0). Other ranks get a store whose
            methods return at once, so every rank can run the same code.
        keep_last, keep_every: retention, see :class:`RetentionPolicy`.
        async_save: write in a background thread (default) or inside ``save()``.
        fail_fatal: a failed write raises CheckpointWriteFailed from the next ``save()``,
            ``wait()`` or ``close()`` (from ``save()`` itself when synchronous); otherwise it is
            reported (``on_event`` + stderr) and training goes on.
        on_event: called with one dict per event (``checkpoint_saved``, ``checkpoint_write_failed``,
            ``checkpoint_pruned``…); may be called from the background thread.

    Raises CheckpointLocked when another process holds the writer lock, ValueError for bad
    arguments.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        is_writer: bool,
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        fail_fatal: bool = False,
        on_event: EventSink | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.dir = checkpoints_dir(run_dir)
        self.policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
        self.is_writer = bool(is_writer)
        self.async_save = bool(async_save)
        self.fail_fatal = bool(fail_fatal)
        self.on_event = on_event
        self.last_path: Path | None = None
        self._thread: threading.Thread | None = None
        self._writing = -1
        """The step the background writer is writing (while ``in_flight``)."""
        self._failure: CheckpointWriteFailed | None = None
        self._closed = False
        self._last_size: int | None = None
        self.last_write_seconds: float | None = None
        """How long the last write took, from the host copy to its commit (or failure)."""
        self._known_valid: set[Path] = set()
        self._lock: WriterLock | None = None
        if not self.is_writer:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.dir)
        self._lock.acquire()
        # We hold the lock, so no other writer lives: every temp dir not ours is debris.
        remove_stale_work_dirs(self.dir, on_event, all_but_self=True)
        for _, path in step_dirs(self.dir):
            try:  # only what its manifest lists: a stray file beside it is not the next save's size
                self._last_size = manifest.payload_bytes(manifest.read(path))
                break
            except CheckpointError:
                continue

    # -- public API ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: Any,
        train_state: dict[str, Any] | None,
        meta: dict[str, Any] | None,
        *,
        skip_if_busy: bool = False,
        asynchronous: bool | None = None,
    ) -> bool:
        """Checkpoint ``step``; returns once the state is in host memory (async) or committed.

        Waits first for the previous save, unless ``skip_if_busy``: then, while the previous
        save is still being written (``in_flight``), this one is skipped (event
        ``checkpoint_save_skipped``) and False returned, so that a periodic save never stalls
        the loop behind a slow disk. ``asynchronous`` overrides the store's ``async_save`` for
        this save. True when the save was made (or handed to the writer).
        Raises CheckpointWriteFailed (``fail_fatal`` only) for this or an earlier failed write,
        ValueError when ``train_state``/``meta`` are not JSON,
        CheckpointError when the store is closed.
        """
        if not self.is_writer:
            return True
        if self._closed:
            raise CheckpointError("save() on a closed CheckpointStore")
        manifest.check_meta(meta or {})
        if skip_if_busy and self.in_flight:
            warn(
                self.on_event,
                f"checkpoint {step_name(step)} skipped: {step_name(self._writing)} is still "
                "being written",
                {
                    "type": EventType.CHECKPOINT_SAVE_SKIPPED,
                    "step": step,
                    "writing": self._writing,
                    "reason": "the previous save is still being written",
                },
            )
            return False
        self.wait()
        snap = capture(step, model, optimizer, scaler, train_state, meta)
        if not (self.async_save if asynchronous is None else asynchronous):
            self._write(snap)
            self._raise_failure()
            return True
        self._writing = step
        self._thread = threading.Thread(
            target=self._write_in_background,
            args=(snap,),
            name=f"checkpoint-{step_name(step)}",
            daemon=False,
        )
        self._thread.start()
        return True

    def wait(self) -> None:
        """Block until the in-flight save (if any) has committed or failed.

        Raises CheckpointWriteFailed when it failed and ``fail_fatal`` is set (once per failure).
        """
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None
        self._raise_failure()

    def close(self) -> None:
        """Wait for the last save, then release the writer lock. Idempotent.

        Raises CheckpointWriteFailed like :meth:`wait`; the lock is released either way.
        """
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def writing_step(self) -> int:
        """The step of the last save handed to the background writer (-1: none yet)."""
        return self._writing

    @property
    def in_flight(self) -> bool:
        """True while a background save is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- the writing side ---------------------------------------------------------------------

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None and self.fail_fatal:
            raise failure

    def _write_in_background(self, snap: Snapshot) -> None:
        # Low CPU priority for this thread (and the hashing helper it starts, which inherits
        # it): on a CPU-bound loop the write then takes only cycles the loop leaves idle.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except (OSError, AttributeError):
            pass  # not Linux, or not allowed: the write still happens, at normal priority
        self._write(snap)

    def _write(self, snap: Snapshot) -> None:
        started = time.monotonic()
        try:
            self._write_and_report(snap, started)
        finally:
            self.last_write_seconds = time.monotonic() - started

    def _write_and_report(self, snap: Snapshot, started: float) -> None:
        if snap.nonfinite:
            self._refuse_nonfinite(snap)
            return
        try:
            self._ensure_dir()
            final = self.dir / step_name(snap.step)
            if final.exists() and self._exists_valid(final, snap.step):
                return
            path, man = self._commit_with_room(snap)
        except BaseException as e:  # noqa: B036 - reported, re-raised via fail_fatal
            self._report_failure(snap.step, e)
            return
        size = manifest.payload_bytes(man)
        self._last_size = size
        self.last_path = path
        self._known_valid.add(path)
        emit(
            self.on_event,
            {
                "type": EventType.CHECKPOINT_SAVED,
                "step": snap.step,
                "path": str(path),
                "bytes": size,
                "seconds": round(time.monotonic() - started, 4),
            },
        )
        try:
            prune(self.dir, self.policy, self.on_event, is_valid=self._is_valid_cached)
        except OSError as e:
            warn(
                self.on_event,
                f"checkpoint pruning failed: {e}",
                {"type": EventType.CHECKPOINT_PRUNE_FAILED, "error": str(e)},
            )

    def _ensure_dir(self) -> None:
        """Recreate ``checkpoints/`` when it vanished under a running writer (deleted by hand, a
        cleanup script), and take the writer lock again there: the one held was on a file in the
        old directory. Raises OSError, or CheckpointLocked when another writer took the new lock."""
        lock = self._lock
        if lock is not None and lock.path.exists():
            return
        recreated = not self.dir.is_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock.release()
        self._lock = WriterLock(self.dir)
        self._lock.acquire()
        self._known_valid.clear()
        what = self.dir if recreated else self._lock.path
        warn(
            self.on_event,
            f"{what} had vanished; recreated it and took the writer lock again",
            {"type": EventType.CHECKPOINT_DIR_RECREATED, "path": str(what)},
        )

    def _commit_with_room(self, snap: Snapshot) -> tuple[Path, dict[str, Any]]:
        """Commit ``snap``. When the free space looks short, or the write itself runs out of
        room, what retention would prune after this save is pruned before it (``free_space``:
        never the newest valid checkpoint) and the write is tried once more; raises OSError
        ENOSPC when that is not enough."""
        size = max(self._last_size or 0, snap.nbytes)
        need = int(size * PREFLIGHT_MARGIN)
        if self._free() < need:
            self._make_room(need)
            free = self._free()
            if free < need:
                raise OSError(
                    errno.ENOSPC,
                    f"not enough free space for checkpoint {step_name(snap.step)}: "
                    f"{free} bytes free in {self.dir}, about {need} needed, after pruning what "
                    "retention lets go once this save lands",
                )
        try:
            return write_checkpoint(self.dir, snap)
        except OSError as e:
            # The disk held less than it said (a quota, another writer): free a checkpoint's
            # worth more than it says now, and try once more if anything went.
            if e.errno not in _NO_ROOM or not self._make_room(self._free() + size):
                raise
        return write_checkpoint(self.dir, snap)

    def _free(self) -> int:
        return shutil.disk_usage(self.dir).free

    def _make_room(self, need: int) -> bool:
        """Prune for space until ``need`` bytes are free; True when anything was pruned."""
        return bool(
            free_space(self.dir, self.policy, need, self.on_event, is_valid=self._is_valid_cached)
        )

    def _exists_valid(self, final: Path, step: int) -> bool:
        """A checkpoint of this step is already there: keep it if it verifies, else set it aside."""
        try:
            verify(final)
        except CheckpointInvalid as e:
            dest = quarantine(final, e.reason)
            warn(
                self.on_event,
                f"checkpoint {final} is invalid ({e.reason}); moved to {dest}",
                {
                    "type": EventType.CHECKPOINT_QUARANTINED,
                    "path": str(final),
                    "to": str(dest),
                    "reason": e.reason,
                },
            )
            return False
        emit(self.on_event, {"type": EventType.CHECKPOINT_EXISTS, "step": step, "path": str(final)})
        self.last_path = final
        return True

    def _refuse_nonfinite(self, snap: Snapshot) -> None:
        """A snapshot with NaN or infinite weights is never committed: it would be listed as
        valid, a restart would resume from it, and retention would prune the healthy ones to
        make way for it. Nothing is written and nothing pruned; this is no write failure (the
        disk is fine), so ``fail_fatal`` does not apply."""
        names = snap.nonfinite
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warn(
            self.on_event,
            f"checkpoint {step_name(snap.step)} was not written: {shown} hold NaN or infinity; "
            "older checkpoints are intact",
            {"type": EventType.CHECKPOINT_NOT_FINITE, "step": snap.step, "tensors": names[:20]},
        )

    def _report_failure(self, step: int, e: BaseException) -> None:
        code = getattr(e, "errno", None)
        kind = errno.errorcode.get(code, "") if isinstance(code, int) else ""
        what = f"{kind}: {e}" if kind else f"{type(e).__name__}: {e}"
        warn(
            self.on_event,
            f"checkpoint {step_name(step)} was not written ({what}); older checkpoints are intact"
            + ("" if self.fail_fatal else ", training goes on"),
            {
                "type": EventType.CHECKPOINT_WRITE_FAILED,
                "step": step,
                "errno": kind or None,
                "error": str(e),
            },
        )
        failure = CheckpointWriteFailed(
            f"checkpoint {step_name(step)} could not be written: {what}"
        )
        failure.__cause__ = e
        self._failure = failure

    def _is_valid_cached(self, path: Path) -> bool:
        if path in self._known_valid:
            return True
        try:
            verify(path)
        except CheckpointError:
            return False
        self._known_valid.add(path)
        return True
