"""Durable file-system steps: write+hash+fsync a file, fsync a directory, the test pause hook."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runcontract import env

#: Test-only: ``ROSE_CKPT_PAUSE_AT=<phase>`` makes the writer stop itself (SIGSTOP) at that phase,
#: so a test can SIGKILL it at a precise instant. Phases: ``payload-mid`` (half of the model file
#: written), ``manifest-mid`` (half of manifest.json written), ``before-rename`` (everything
#: durable in the temp directory), ``after-rename`` (renamed, parent directory not yet fsync'd).
PAUSE_ENV = env.CKPT_PAUSE_AT
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

    Raises OSError from the OS as-is (ENOSPC, EIO, EFBIG…); the caller decides what it means.
    """
    view = memoryview(data).cast("B")
    return write_chunks(path, iter([view]), len(view), pause_phase)


def write_chunks(
    path: Path, chunks: Iterator[memoryview], total: int, pause_phase: str | None = None
) -> dict[str, int | str]:
    """Write ``chunks`` (``total`` bytes in all) to a new file, fsync it, return size and sha256.

    Hashing runs in a helper thread while the next chunk is written (both release the GIL), so a
    large file costs about max(write, hash) rather than their sum. The pause point, when named,
    is hit once half of ``total`` is written. Raises OSError from the OS as-is.
    """
    h = hashlib.sha256()
    half = total // 2
    pos = 0
    paused = pause_phase is None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash") as hasher:
        try:
            pending = []
            for chunk in _split_at(chunks, half if not paused else -1):
                written = 0
                while written < len(chunk):
                    written += os.write(fd, chunk[written:])
                # One worker: updates run in submission order, so the digest is of the file.
                pending.append(hasher.submit(h.update, chunk))
                pos += len(chunk)
                if not paused and pos >= half:
                    paused = True
                    pause_point(pause_phase)  # type: ignore[arg-type]
                if len(pending) > 4:
                    pending.pop(0).result()
            os.fsync(fd)
            for f in pending:
                f.result()
        finally:
            os.close(fd)
    if pos != total:
        raise RuntimeError(f"wrote {pos} bytes to {path}, expected {total}")
    return {"size": total, "sha256": h.hexdigest()}


def _split_at(chunks: Iterator[memoryview], at: int) -> Iterator[memoryview]:
    """The same bytes, with a chunk boundary at offset ``at`` (for the mid-file pause point)."""
    pos = 0
    for chunk in chunks:
        if pos < at < pos + len(chunk):
            cut = at - pos
            yield chunk[:cut]
            yield chunk[cut:]
        else:
            yield chunk
        pos += len(chunk)


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
