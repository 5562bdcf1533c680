"""The writer lock: one process at a time writes checkpoints into a run directory."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from ..supervised import read_owner, write_owner
from .errors import CheckpointLocked
from .layout import LOCK_FILE, OWNER_FILE


class WriterLock:
    """A non-blocking ``filelock`` on ``checkpoints/.writer.lock``.

    The kernel drops the lock when its holder dies, however it dies, so a SIGKILLed writer never
    blocks the next attempt. ``.writer.owner`` records who holds it, for the error message only.
    """

    def __init__(self, ckpt_dir: Path) -> None:
        self.path = ckpt_dir / LOCK_FILE
        self._owner = ckpt_dir / OWNER_FILE
        self._lock = FileLock(self.path, timeout=0, thread_local=False, preserve_lock_file=True)

    def acquire(self) -> None:
        """Take the lock now or raise CheckpointLocked naming the holder when it is known."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            owner = read_owner(self._owner)
            holder = f" (pid {owner[0]} on {owner[1]})" if owner is not None else ""
            raise CheckpointLocked(
                f"another process{holder} is writing checkpoints into {self.path.parent}; "
                "stop it first, or give this run its own run directory"
            ) from None
        write_owner(self._owner)

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock.is_locked:
            self._lock.release(force=True)

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return bool(self._lock.is_locked)
