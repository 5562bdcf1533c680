"""The memory tier's read side: where a run's snapshots live, which one is the newest valid, and
removing them. Torch-free, like the rest of the read side (the supervisor and the CLI use it).

A run's memory directory is ``<root>/rose-<id>/`` (``runcontract.layout.memory_dir``): in shared
memory on the node, so it outlives every worker and torchrun. Each snapshot in it is laid out
as a checkpoint (``step-XXXXXXXX/`` with a manifest), checksummed with xxh3 instead of sha256,
and verified by the same ``verify``. ``RUN.json`` records the run directory's token (a random
``checkpoints/memory.id``): a snapshot left by an earlier run directory at the same path is
never taken for this one's.

The root is shared by every user of the node, so a memory directory is trusted only when it is
a real directory (not a link) owned by this user and writable by no one else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path

from runcontract.events import EventType
from runcontract.layout import CHECKPOINTS, MEMORY_OWNER, MEMORY_TOKEN, memory_dir

from . import fsio
from .errors import CheckpointIncompatible, CheckpointInvalid
from .integrity import CheckpointInfo, EventSink, emit, step_dirs, verify, warn

__all__ = [
    "claim",
    "find_latest_valid_memory",
    "list_memory",
    "memory_dir",
    "memory_slots",
    "remove_memory",
    "stale_reason",
    "untrusted_reason",
]


def _token(run_dir: str | os.PathLike[str], create: bool) -> str | None:
    """The run directory's memory token (``checkpoints/memory.id``), made when ``create``."""
    path = Path(run_dir) / CHECKPOINTS / MEMORY_TOKEN
    try:
        with fsio.open_dir(path.parent) as fd:
            return fsio.read_regular(MEMORY_TOKEN, fd, 64).decode().strip() or None
    except FileNotFoundError:
        if not create:
            return None
    token = secrets.token_hex(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.replace_small_file(path, token + "\n")
    return token


def untrusted_reason(mem: Path) -> str | None:
    """Why the memory directory ``mem`` must not be used (None: it may, or it does not exist)."""
    try:
        st = os.lstat(mem)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot look at {mem}: {e.strerror or e}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{mem} is not a directory"
    if st.st_uid != os.getuid():
        return f"{mem} belongs to another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{mem} is writable by other users"
    return None


def claim(run_dir: str | os.PathLike[str], mem: Path) -> None:
    """Make ``mem`` this run directory's (mode 0700; ``RUN.json`` names the run directory and
    its token). Raises OSError."""
    token = _token(run_dir, create=True)
    mem.mkdir(mode=0o700, exist_ok=True)
    owner = {"run_dir": os.path.realpath(os.fspath(run_dir)), "token": token}
    fsio.replace_small_file(mem / MEMORY_OWNER, json.dumps(owner) + "\n")


def stale_reason(run_dir: str | os.PathLike[str], mem: Path) -> str | None:
    """Why ``mem`` is not this run directory's memory (None: it is). The token, not the path,
    decides: a run directory made anew at the same path has another one, or none yet."""
    try:
        with fsio.open_dir(mem) as fd:
            recorded = json.loads(fsio.read_regular(MEMORY_OWNER, fd, 64 << 10))
    except FileNotFoundError:
        return f"it has no {MEMORY_OWNER}"
    except (OSError, ValueError) as e:
        return f"its {MEMORY_OWNER} cannot be read ({e})"
    try:
        token = _token(run_dir, create=False)
    except (OSError, ValueError) as e:
        return f"the run directory's {MEMORY_TOKEN} cannot be read ({e})"
    if token is None or not isinstance(recorded, dict) or recorded.get("token") != token:
        return "it belongs to another run directory (or an earlier one at this path)"
    return None


def memory_slots(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The ``step-XXXXXXXX`` snapshots of ``run_dir``'s memory tier, newest first (names only:
    nothing is verified); empty when it has none or cannot be trusted."""
    mem = memory_dir(run_dir)
    if untrusted_reason(mem) is not None:
        return []
    try:
        return step_dirs(mem)
    except OSError:
        return []


def find_latest_valid_memory(
    run_dir: str | os.PathLike[str], on_event: EventSink | None = None, newer_than: int = -1
) -> Path | None:
    """The newest snapshot of ``run_dir``'s memory tier that verifies and holds a step above
    ``newer_than``, or None. Older ones are not looked at.

    Each invalid snapshot on the way is removed (memory is scarce, and a snapshot is a copy, not
    the only one) and reported as ``memory_snapshot_dropped`` (``path``, ``step``, ``reason``);
    a directory that belongs to another run directory is removed whole the same way, and one
    that cannot be trusted is left alone with the same event. Never raises for a bad snapshot.
    """
    mem = memory_dir(run_dir)
    if not mem.exists() and not mem.is_symlink():
        return None
    untrusted = untrusted_reason(mem)
    if untrusted is not None:
        _dropped(on_event, mem, None, f"not used: {untrusted}")
        return None
    stale = stale_reason(run_dir, mem)
    if stale is not None:
        shutil.rmtree(mem, ignore_errors=True)
        _dropped(on_event, mem, None, f"removed: {stale}")
        return None
    for step, path in memory_slots(run_dir):
        if step <= newer_than:
            return None
        try:
            verify(path)
            return path
        except (CheckpointInvalid, CheckpointIncompatible) as e:
            reason = getattr(e, "reason", None) or str(e)
            shutil.rmtree(path, ignore_errors=True)
            _dropped(on_event, path, step, reason)
    return None


def _dropped(on_event: EventSink | None, path: Path, step: int | None, reason: str) -> None:
    warn(
        on_event,
        f"memory snapshot {path} is not used ({reason})",
        {
            "type": EventType.MEMORY_SNAPSHOT_DROPPED,
            "path": str(path),
            "step": step,
            "reason": reason,
        },
    )


def remove_memory(
    run_dir: str | os.PathLike[str], on_event: EventSink | None = None, reason: str = ""
) -> bool:
    """Remove ``run_dir``'s memory tier (event ``memory_removed``: ``path``, ``steps``,
    ``reason``); True when there was one. A directory that cannot be trusted (another user's, a
    link) is never touched."""
    mem = memory_dir(run_dir)
    if not mem.exists() or untrusted_reason(mem) is not None:
        return False
    steps = [step for step, _ in memory_slots(run_dir)]
    shutil.rmtree(mem, ignore_errors=True)
    emit(
        on_event,
        {
            "type": EventType.MEMORY_REMOVED,
            "path": str(mem),
            "steps": steps,
            "reason": reason,
        },
    )
    return not mem.exists()


def list_memory(run_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every snapshot of ``run_dir``'s memory tier, newest first, verified. Read-only."""
    rows = []
    for step, path in memory_slots(run_dir):
        try:
            verify(path)
            valid, reason = True, None
        except (CheckpointInvalid, CheckpointIncompatible) as e:
            valid, reason = False, getattr(e, "reason", None) or str(e)
        try:
            size = fsio.dir_size(path)
        except OSError:
            continue  # replaced while we looked
        rows.append(CheckpointInfo(step, path, size, valid, reason))
    return rows
