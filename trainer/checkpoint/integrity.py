"""Decide which checkpoints are valid: verify, find the newest valid, quarantine, clean temp dirs.

Validity is decided here and only here: a checkpoint is valid when it carries no UNLOADABLE.txt,
its manifest parses and passes its self-hash, its format version is one this code reads, its step
matches its directory name and its ``train_state``, it does not record non-finite tensors
(``finite: false``), every file it lists is a plain name of a regular file present with the
listed size and checksum (sha256, or the ``file_hash`` the manifest names), and ``state.json``
holds state a trainer can resume from (``schema``).
Whatever a checkpoint holds, reading it never follows a link, never opens a FIFO or a device, and
never reads more than the manifest says.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from runcontract.events import EventType

from . import fsio, manifest, schema
from .errors import CheckpointIncompatible, CheckpointInvalid, describe, invalid_on_error
from .layout import (
    MANIFEST,
    MODEL_FILE,
    OPTIM_FILE,
    QUARANTINE,
    REASON_FILE,
    STATE_FILE,
    UNLOADABLE_FILE,
    checkpoints_dir,
    parse_step,
    parse_work_name,
    this_host,
)

EventSink = Callable[[dict[str, Any]], None]


#: An UNLOADABLE.txt longer than this is cut: its first line becomes a one-line reason.
MAX_REASON_BYTES = 4096


def verify(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the manifest of the checkpoint directory ``path`` if every check passes.

    Only regular files directly inside ``path`` are opened, never through a link and never a
    FIFO or a device, and no file is read past the size its manifest gives. Raises
    CheckpointInvalid(reason) when it does not verify (any OSError or ValueError about the
    checkpoint becomes one), and CheckpointIncompatible when it was written in a newer format than
    this code reads (valid, but not ours to judge).
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointInvalid("not a directory" if ckpt.exists() else "does not exist", ckpt)
    with invalid_on_error(ckpt, "the checkpoint directory"), fsio.open_dir(ckpt) as dir_fd:
        return _verify(ckpt, dir_fd)


def _verify(ckpt: Path, dir_fd: int) -> dict[str, Any]:
    marked = unloadable_reason(ckpt, dir_fd)
    if marked is not None:
        raise CheckpointInvalid(f"unloadable: {marked}", ckpt)
    man = manifest.read(ckpt, dir_fd)
    dir_step = parse_step(ckpt.name)
    if dir_step is not None and dir_step != man["step"]:
        raise CheckpointInvalid(
            f"manifest says step {man['step']} but directory is {ckpt.name}", ckpt
        )
    with invalid_on_error(ckpt, MANIFEST):
        schema.check_train_state(man)
    finite = man.get("finite", True)  # absent: written before the field existed
    if finite is False:
        raise CheckpointInvalid("manifest records tensors holding NaN or infinity", ckpt)
    if finite is not True:
        raise CheckpointInvalid(f"manifest field 'finite' is {json.dumps(finite)[:40]}", ckpt)
    files = man["files"]
    for required in (MODEL_FILE, STATE_FILE):
        if required not in files:
            raise CheckpointInvalid(f"manifest lists no {required}", ckpt)
    with invalid_on_error(ckpt, MANIFEST):
        algo = manifest.file_hash(man)
    for name, info in sorted(files.items()):
        with invalid_on_error(ckpt, name):
            fsio.check_plain_name(name)
            size = info.get("size") if isinstance(info, dict) else None
            if type(size) is not int or size < 0 or not isinstance(info.get(algo), str):
                raise ValueError(f"manifest gives {name} no integer size and {algo}")
            if fsio.hash_regular(name, dir_fd, size, algo) != info[algo]:
                raise ValueError(f"{name} {algo} does not match the manifest")
    with invalid_on_error(ckpt, STATE_FILE):
        refs = schema.check_state(fsio.read_regular(STATE_FILE, dir_fd, files[STATE_FILE]["size"]))
        if refs and OPTIM_FILE not in files:
            raise ValueError(f"{STATE_FILE} refers to optimizer tensors, but no {OPTIM_FILE}")
        schema.check_steps(OPTIM_FILE, dir_fd, refs)
    return man


def unloadable_reason(ckpt: Path, dir_fd: int | None = None) -> str | None:
    """The first line of the checkpoint's ``UNLOADABLE.txt``, or None when it has none."""
    if dir_fd is None:
        with invalid_on_error(ckpt, "the checkpoint directory"), fsio.open_dir(ckpt) as fd:
            return unloadable_reason(ckpt, fd)
    with invalid_on_error(ckpt, UNLOADABLE_FILE):
        try:
            os.stat(UNLOADABLE_FILE, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
    try:
        text = fsio.read_regular(UNLOADABLE_FILE, dir_fd, MAX_REASON_BYTES).decode(errors="replace")
    except (OSError, ValueError):
        text = ""  # whatever stands there, the mark is what counts
    return text.strip().split("\n")[0] or "marked unloadable by a trainer"


def mark_unloadable(ckpt: Path, reason: str) -> None:
    """Write ``reason`` to ``ckpt/UNLOADABLE.txt``: from now on the checkpoint does not verify,
    so the next search quarantines it with that reason and moves on to an older one. Raises
    OSError."""
    line = " ".join(reason.split())  # one line, whatever the error said
    fsio.replace_small_file(ckpt / UNLOADABLE_FILE, f"{line}\nmarked_at: {time.time():.3f}\n")


def _emit(on_event: EventSink | None, event: dict[str, Any]) -> None:
    event = {"type": event.pop("type"), "time": time.time(), **event}
    if on_event is not None:
        try:
            on_event(event)
        except Exception as e:  # a broken logger must not stop recovery
            print(f"warning: checkpoint event handler failed: {e!r}", file=sys.stderr)


def warn(on_event: EventSink | None, message: str, event: dict[str, Any]) -> None:
    """Print one warning line to stderr and pass ``event`` to ``on_event``."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
    _emit(on_event, event)


def emit(on_event: EventSink | None, event: dict[str, Any]) -> None:
    """Pass ``event`` (a ``type`` key plus details) to ``on_event`` with a ``time`` stamp."""
    _emit(on_event, dict(event))


def quarantine(path: Path, reason: str) -> Path:
    """Move the checkpoint ``path`` to ``checkpoints/quarantine/<name>[-N]/`` with REASON.txt.

    Never deletes anything. Returns the new location.
    """
    qdir = path.parent / QUARANTINE
    qdir.mkdir(exist_ok=True)
    n = 0
    while True:
        dest = qdir / (path.name if n == 0 else f"{path.name}-{n}")
        try:
            # rename onto an existing empty directory would succeed: make the name ours first.
            dest.mkdir()
        except FileExistsError:
            n += 1
            continue
        dest.rmdir()
        path.rename(dest)
        break
    # Renamed over whatever the checkpoint held under that name: a FIFO there is never opened.
    fsio.replace_small_file(dest / REASON_FILE, f"{reason}\nquarantined_at: {time.time():.3f}\n")
    fsio.fsync_dir(qdir)
    fsio.fsync_dir(path.parent)
    return dest


def _writer_alive(host: str, pid: int) -> bool:
    # Another host's process cannot be checked from here: assume it lives (never delete its work).
    if host != this_host():
        return True
    return psutil.pid_exists(pid)


def remove_stale_work_dirs(
    ckpt_dir: Path, on_event: EventSink | None = None, *, all_but_self: bool = False
) -> list[Path]:
    """Remove ``.tmp-``/``.del-`` directories whose writer is dead; return what was removed.

    Rule: a directory is removed when its name matches our own pattern and the pid in it is not
    alive on this host. With ``all_but_self`` (used by the writer that holds the writer lock, so no
    other writer can exist) every such directory not made by this process is removed.
    """
    removed: list[Path] = []
    if not ckpt_dir.is_dir():
        return removed
    me = os.getpid()
    for entry in sorted(ckpt_dir.iterdir()):
        work = parse_work_name(entry.name)
        if work is None or not entry.is_dir():
            continue
        if work.host == this_host() and work.pid == me:
            continue
        if not all_but_self and _writer_alive(work.host, work.pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            emit(on_event, {"type": EventType.CHECKPOINT_TMP_REMOVED, "path": str(entry)})
    return removed


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Committed-looking ``step-XXXXXXXX`` directories, newest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for entry in ckpt_dir.iterdir():
        step = parse_step(entry.name)
        if step is not None and entry.is_dir():
            out.append((step, entry))
    return sorted(out, reverse=True)


def find_latest_valid(
    run_dir: str | os.PathLike[str], on_event: EventSink | None = None
) -> Path | None:
    """The newest checkpoint under ``RUN_DIR/checkpoints`` that verifies, or None.

    On the way, each invalid checkpoint newer than it is quarantined (event
    ``checkpoint_quarantined`` with ``path``, ``to`` and ``reason``, plus a line on stderr), and
    temp directories of dead writers are removed. A checkpoint in a newer format is skipped, not
    quarantined (event ``checkpoint_skipped``), and so is an invalid one that cannot be moved.
    Never raises for a bad checkpoint; OSError from the file system itself (``checkpoints/``
    unreadable, the process out of file descriptors) propagates.
    """
    ckpt_dir = checkpoints_dir(run_dir)
    remove_stale_work_dirs(ckpt_dir, on_event)
    for _, path in step_dirs(ckpt_dir):
        try:
            verify(path)
            return path
        except CheckpointIncompatible as e:
            skip(on_event, path, str(e))
        except CheckpointInvalid as e:
            if not path.exists():  # pruned by a live writer while we looked: not a fault
                continue
            try:
                dest = quarantine(path, e.reason)
            except FileNotFoundError:
                continue
            except OSError as q:  # e.g. quarantine/ is not a directory: never crash the search
                skip(on_event, path, f"{e.reason}; and it cannot be quarantined: {describe(q)}")
                continue
            warn(
                on_event,
                f"checkpoint {path} is invalid ({e.reason}); moved to {dest}",
                {
                    "type": EventType.CHECKPOINT_QUARANTINED,
                    "path": str(path),
                    "to": str(dest),
                    "reason": e.reason,
                },
            )
    return None


def skip(on_event: EventSink | None, path: Path, reason: str) -> None:
    """Report a checkpoint passed over without being moved (event ``checkpoint_skipped``)."""
    warn(
        on_event,
        f"skipping checkpoint {path}: {reason}",
        {"type": EventType.CHECKPOINT_SKIPPED, "path": str(path), "reason": reason},
    )


@dataclass(frozen=True)
class CheckpointInfo:
    """One row of :func:`list_checkpoints`."""

    step: int
    path: Path
    size: int
    valid: bool
    reason: str | None


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every ``step-XXXXXXXX`` directory under ``RUN_DIR/checkpoints``, newest first, verified.

    Read-only: nothing is quarantined or removed.
    """
    rows = []
    for step, path in step_dirs(checkpoints_dir(run_dir)):
        try:
            verify(path)
            valid, reason = True, None
        except (CheckpointInvalid, CheckpointIncompatible) as e:
            valid, reason = False, getattr(e, "reason", None) or str(e)
        try:
            size = fsio.dir_size(path)
        except FileNotFoundError:
            continue  # pruned while we looked
        except OSError:
            size = 0
        rows.append(CheckpointInfo(step, path, size, valid, reason))
    return rows
