"""Durable file-system steps: write+hash+fsync a file, fsync a directory, the test pause hook."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

#: Test-only: ``ROSE_CKPT_PAUSE_AT=<phase>`` makes the writer stop itself (SIGSTOP) at that phase,
#: so a test can SIGKILL it at a precise instant. Phases: ``payload-mid`` (half of the model file
#: written), ``manifest-mid`` (half of manifest.json written), ``before-rename`` (everything
#: durable in the temp directory), ``after-rename`` (renamed, parent directory not yet fsync'd).
PAUSE_ENV = "ROSE_CKPT_PAUSE_AT"
PHASES = ("payload-mid", "manifest-mid", "before-rename", "after-rename")

_CHUNK = 8 << 20


def pause_point(phase: str) -> None:
    """Stop this process when the test hook names ``phase``; a no-op otherwise."""
    if os.environ.get(PAUSE_ENV) == phase:
        # Directed at this thread: a process-wide kill() may be taken by another thread, and the
        # writer would run on past the pause point before the group stop reaches it.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def write_file(
    path: Path, data: bytes | memoryview, pause_phase: str | None = None
) -> dict[str, int | str]:
    """Write ``data`` to a new file, fsync it, return ``{"size", "sha256"}`` of what was written.

    The hash is computed from the same buffer in the same pass. Raises OSError from the OS as-is
    (ENOSPC, EIO, EFBIG…); the caller decides what a failure means.
    """
    view = memoryview(data).cast("B")
    h = hashlib.sha256()
    half = len(view) // 2
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        pos = 0
        paused = pause_phase is None
        while pos < len(view):
            end = min(pos + _CHUNK, len(view))
            if not paused and end > half:
                end = max(half, pos + 1)
            chunk = view[pos:end]
            n = os.write(fd, chunk)
            h.update(chunk[:n])
            pos += n
            if not paused and pos >= half:
                paused = True
                pause_point(pause_phase)  # type: ignore[arg-type]
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": len(view), "sha256": h.hexdigest()}


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or new entry inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in large chunks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    """Total size of the regular files directly inside ``path`` (checkpoints are flat)."""
    total = 0
    with os.scandir(path) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    return total
