"""Names and places inside ``RUN_DIR/checkpoints`` — the on-disk contract in one module.

```
checkpoints/step-00000040/            committed: payload files + manifest.json
checkpoints/.tmp-step-00000040-<host>-<pid>-<token>/   being written by <pid> on <host>
checkpoints/.del-step-00000010-<host>-<pid>-<token>/   being pruned by <pid> on <host>
checkpoints/quarantine/step-00000030[-N]/              found invalid, with REASON.txt
checkpoints/.writer.lock              held by the one writer
```

Temporary names carry the host and pid of the process that made them, so a reader can tell a
directory whose writer still lives (leave it) from one whose writer is dead (remove it).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

#: The on-disk format this code writes; it reads this version and every older one.
FORMAT_VERSION = 1

CHECKPOINTS = "checkpoints"
QUARANTINE = "quarantine"
LOCK_FILE = ".writer.lock"
OWNER_FILE = ".writer.owner"
MANIFEST = "manifest.json"
REASON_FILE = "REASON.txt"

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"

TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"

_STEP_RE = re.compile(r"^step-(\d{8,})$")
# host names may contain '-', so the pid and token are taken from the right.
_WORK_RE = re.compile(r"^(\.tmp-|\.del-)step-(\d{8,})-(.+)-(\d+)-([0-9a-f]{8})$")


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    """The committed directory name of ``step``: ``step-00000040``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed directory name, or None when ``name`` is not one."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def _hostname() -> str:
    # '-' is kept (parsing is right-anchored); anything odd becomes '_' so the name stays simple.
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def work_name(prefix: str, step: int) -> str:
    """A fresh temp (``.tmp-``) or prune (``.del-``) name owned by this process."""
    return f"{prefix}{step_name(step)}-{_hostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class WorkDir:
    """A parsed ``.tmp-``/``.del-`` directory name."""

    prefix: str
    step: int
    host: str
    pid: int


def parse_work_name(name: str) -> WorkDir | None:
    """Parse a name made by :func:`work_name`; None for anything else (never ours to touch)."""
    m = _WORK_RE.match(name)
    if not m:
        return None
    return WorkDir(m.group(1), int(m.group(2)), m.group(3), int(m.group(4)))


def this_host() -> str:
    """The host part this process writes into temp names."""
    return _hostname()
