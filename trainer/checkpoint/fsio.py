"""File-system steps: write+hash+fsync a file, fsync a directory, read a checkpoint's files
without trusting them, replace a small file atomically, the test pause hook."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runcontract import env

from . import hashing

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
    path: Path,
    data: bytes | memoryview,
    pause_phase: str | None = None,
    algo: str = hashing.DEFAULT,
    durable: bool = True,
) -> dict[str, int | str]:
    """Write ``data`` to a new file, fsync it, return ``{"size", algo}`` of what was written.

    Raises OSError from the OS as-is (ENOSPC, EIO, EFBIG…); the caller decides what it means.
    """
    view = memoryview(data).cast("B")
    return write_chunks(path, iter([view]), len(view), pause_phase, algo, durable)


def write_chunks(
    path: Path,
    chunks: Iterator[memoryview],
    total: int,
    pause_phase: str | None = None,
    algo: str = hashing.DEFAULT,
    durable: bool = True,
) -> dict[str, int | str]:
    """Write ``chunks`` (``total`` bytes in all) to a new file, fsync it (unless not
    ``durable``: the memory tier, where fsync buys nothing), return its size and its digest
    under the name of ``algo`` (``{"size": n, "sha256": hex}``).

    A large file's sha256 runs in a helper thread while the next chunk is written (both release
    the GIL), so it costs about max(write, hash) rather than their sum; a small file, or a fast
    hash, is hashed inline, where a helper thread would cost more than it saves. The pause
    point, when named, is hit once half of ``total`` is written. Raises OSError as-is.
    """
    h = hashing.new(algo)
    half = total // 2
    pos = 0
    paused = pause_phase is None
    inline = algo != hashing.SHA256 or total <= _CHUNK
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with contextlib.ExitStack() as stack:
        hasher = None
        if not inline:
            hasher = stack.enter_context(
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash")
            )
        try:
            pending = []
            for chunk in _split_at(chunks, half if not paused else -1):
                written = 0
                while written < len(chunk):
                    written += os.write(fd, chunk[written:])
                if hasher is None:
                    h.update(chunk)
                else:
                    # One worker: updates run in submission order, so the digest is of the file.
                    pending.append(hasher.submit(h.update, chunk))
                pos += len(chunk)
                if not paused and pos >= half:
                    paused = True
                    pause_point(pause_phase)  # type: ignore[arg-type]
                if len(pending) > 4:
                    pending.pop(0).result()
            if durable:
                os.fsync(fd)
            for f in pending:
                f.result()
        finally:
            os.close(fd)
    if pos != total:
        raise RuntimeError(f"wrote {pos} bytes to {path}, expected {total}")
    return {"size": total, algo: h.hexdigest()}


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


# -- reading files we did not write (a checkpoint may hold anything) ------------------------------

# A payload name is one plain file inside the checkpoint: no separator, no NUL, no leading dot
# (so never "." or ".."), at most NAME_MAX bytes. The store itself writes three such names.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")

_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def check_plain_name(name: object) -> str:
    """``name`` when it is a plain file name inside a directory; ValueError otherwise."""
    if isinstance(name, str) and _PLAIN_NAME.fullmatch(name):
        return name
    shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
    raise ValueError(f"manifest lists a file that is not a plain name in the checkpoint: {shown}")


def _require_regular(name: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a plain file")
        raise ValueError(f"{name} is {kind}, not a regular file")


@contextlib.contextmanager
def open_dir(path: Path) -> Iterator[int]:
    """A descriptor of directory ``path`` (the caller named it: a link to it is followed) for
    opening the files inside it with :func:`open_regular`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_regular(name: str, dir_fd: int) -> Iterator[tuple[int, int]]:
    """``(fd, size)`` of the regular file ``name`` directly inside ``dir_fd``, opened read-only.

    Never follows a link and never blocks: a FIFO or a device in its place is refused before it
    is opened (lstat), and again after (fstat), in case it was swapped in between. Raises
    ValueError for a bad name or anything that is not a regular file, OSError as the OS says.
    """
    check_plain_name(name)
    _require_regular(name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        _require_regular(name, st.st_mode)
        yield fd, st.st_size
    finally:
        os.close(fd)


def fd_path(fd: int) -> str:
    """A path that opens the file behind descriptor ``fd`` itself (``/dev/fd``), for a library
    that takes only a path: a name swapped for a FIFO or a link meanwhile is never opened."""
    return f"/dev/fd/{fd}"


def _read_up_to(fd: int, limit: int) -> Iterator[bytes]:
    """The file's bytes in chunks, never more than ``limit`` of them."""
    left = limit
    while left > 0:
        chunk = os.read(fd, min(_CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def sha256_regular(name: str, dir_fd: int, size: int) -> str:
    """sha256 of the first ``size`` bytes of ``name`` (see :func:`hash_regular`)."""
    return hash_regular(name, dir_fd, size, hashing.SHA256)


def hash_regular(name: str, dir_fd: int, size: int, algo: str) -> str:
    """The ``algo`` digest of ``name`` (see :func:`open_regular`), which must be exactly ``size``
    bytes long. Raises ValueError when it is not, or is not a regular file."""
    with open_regular(name, dir_fd) as (fd, actual):
        if actual != size:
            raise ValueError(f"{name} is {actual} bytes, manifest says {size}")
        h = hashing.new(algo)
        got = 0
        for chunk in _read_up_to(fd, size):
            h.update(chunk)
            got += len(chunk)
    if got != size:  # shrank while we read it
        raise ValueError(f"{name} ended after {got} of {size} bytes")
    return h.hexdigest()


def read_regular(name: str, dir_fd: int, limit: int) -> bytes:
    """The whole of the regular file ``name`` (see :func:`open_regular`); ValueError when it
    holds more than ``limit`` bytes (nothing beyond ``limit + 1`` bytes is read)."""
    with open_regular(name, dir_fd) as (fd, _):
        data = b"".join(_read_up_to(fd, limit + 1))
    if len(data) > limit:
        raise ValueError(f"{name} is larger than {limit} bytes")
    return data


def replace_small_file(path: Path, text: str) -> None:
    """Write ``text`` as ``path`` by renaming a fresh file over it: whatever stood there (a FIFO,
    a link) is replaced, never opened. Raises OSError."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            data = text.encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dir_size(path: Path) -> int:
    """Total size of the regular files directly inside ``path`` (checkpoints are flat)."""
    total = 0
    with os.scandir(path) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    return total
