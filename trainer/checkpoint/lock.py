"""The writer lock: one process at a time writes checkpoints into a run directory."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

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
            holder = ""
            try:
                info = json.loads(self._owner.read_text())
                holder = f" (pid {info['pid']} on {info['host']})"
            except (OSError, ValueError, KeyError, TypeError):
                pass
            raise CheckpointLocked(
                f"another process{holder} is writing checkpoints into {self.path.parent}; "
                "stop it first, or give this run its own run directory"
            ) from None
        tmp = self._owner.with_name(f"{OWNER_FILE}.{os.getpid()}")
        tmp.write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        )
        os.replace(tmp, self._owner)

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock.is_locked:
            self._lock.release(force=True)

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return bool(self._lock.is_locked)
