"""Names and places in ``RUN_DIR``.

```
RUN_DIR/
  checkpoints/step-00000040/      a committed checkpoint (trainer/checkpoint/layout.py: inside)
  checkpoints/quarantine/         checkpoints found invalid
  heartbeats/rank-<R>.json        per-rank progress
  events.jsonl                    the supervisor's log         (events-<node>.jsonl on a node)
  supervisor.json                 the supervisor's state       (supervisor-<node>.json)
  supervisor.lock                 held by the owning supervisor (supervisor-<node>.lock)
  report.txt                      the run report               (report-<node>.txt)
  metrics.jsonl                   the trainer's metrics
  logs/attempt-<N>/               an attempt's output          (logs/<node>/attempt-<N>/)
```

The memory tier lives outside it, in shared memory on the node (``memory_dir``):

```
/dev/shm/rose-<id>/               <id>: a hash of the absolute run directory ($ROSE_MEM_ROOT)
  step-00000045/                  a snapshot, laid out as a checkpoint (at most two of them)
  RUN.json                        the run directory it belongs to, and its token
                                  (checkpoints/memory.id in the run directory)
```
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
QUARANTINE = "quarantine"
HEARTBEATS = "heartbeats"
LOGS = "logs"
METRICS = "metrics.jsonl"

# Per-node files: (stem, suffix); one node uses stem+suffix, node <tag> stem-<tag>+suffix.
EVENTS = ("events", ".jsonl")
STATE = ("supervisor", ".json")
LOCK = ("supervisor", ".lock")
LOCK_OWNER = ("supervisor", ".owner")
REPORT = ("report", ".txt")
REPORT_PNG = ("report", ".png")

WRITER_LOCK = ".writer.lock"
"""``checkpoints/.writer.lock``: held (flock) by the one process that writes checkpoints."""
WRITER_OWNER = ".writer.owner"
"""``checkpoints/.writer.owner``: JSON ``{pid, host, since}`` of the lock's holder."""

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
"""A checkpoint being written: ``.tmp-step-XXXXXXXX-<host>-<pid>-<token>``."""
DEL_PREFIX = ".del-"
"""A checkpoint being pruned: ``.del-step-XXXXXXXX-<host>-<pid>-<token>``."""

_STEP_RE = re.compile(r"^step-(\d{8,})$")
# Host names may contain '-', so the pid and token are taken from the right.
_WORK_RE = re.compile(r"^(\.tmp-|\.del-)step-(\d{8,})-(.+)-(\d+)-([0-9a-f]{8})$")
_NODE_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def per_node_name(name: tuple[str, str], node: str | None) -> str:
    """A per-node file name: ``supervisor.json`` on one node (``node`` empty or None),
    ``supervisor-node1.json`` for node ``node1``."""
    stem, suffix = name
    return f"{stem}-{node}{suffix}" if node else f"{stem}{suffix}"


def valid_node_tag(tag: str) -> bool:
    """True when ``tag`` can be a node's name in a file name (``node1``, ``node-host.example``)."""
    return bool(_NODE_TAG_RE.match(tag))


def _natural(tag: str) -> tuple[Any, ...]:
    # node2 before node10
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", tag))


def node_tags(run_dir: Path, name: tuple[str, str] = STATE) -> list[str]:
    """The node tags of the per-node files ``<stem>-<tag><suffix>`` of ``name`` in ``run_dir``,
    in node order (empty for a one-node run directory, or one no supervisor has written to)."""
    stem, suffix = name
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    prefix = stem + "-"
    tags = [
        n[len(prefix) : len(n) - len(suffix)]
        for n in names
        if n.startswith(prefix) and n.endswith(suffix)
    ]
    return sorted((t for t in tags if valid_node_tag(t)), key=_natural)


MEMORY_ROOT = "/dev/shm"
"""The default root of the memory tier: shared memory, which outlives any process of the node."""
MEMORY_PREFIX = "rose-"
MEMORY_OWNER = "RUN.json"
"""``RUN.json`` in a memory directory: ``{run_dir, token}`` of the run directory it serves."""
MEMORY_TOKEN = "memory.id"
"""``checkpoints/memory.id``: a random token naming this run directory to its memory tier."""


def memory_root() -> Path:
    """``$ROSE_MEM_ROOT``, else ``/dev/shm``."""
    from runcontract.env import MEM_ROOT

    return Path(os.environ.get(MEM_ROOT) or MEMORY_ROOT)


def memory_dir(run_dir: str | os.PathLike[str], root: Path | None = None) -> Path:
    """``<root>/rose-<id>``: the memory tier of ``run_dir``, ``<id>`` being 16 hex digits of the
    sha256 of its absolute, resolved path (the same on every process of the node)."""
    key = os.path.realpath(os.fspath(run_dir)).encode()
    return (root or memory_root()) / f"{MEMORY_PREFIX}{hashlib.sha256(key).hexdigest()[:16]}"


def heartbeat_name(rank: int) -> str:
    """``rank-<R>.json``: rank R's heartbeat file in ``heartbeats/``."""
    return f"rank-{rank}.json"


HEARTBEAT_GLOB = "rank-*.json"
"""Every rank's heartbeat file in ``heartbeats/``."""


def attempt_dir_name(attempt: int) -> str:
    """``attempt-<N>``: an attempt's log folder."""
    return f"attempt-{attempt}"


def step_name(step: int) -> str:
    """The committed checkpoint directory name of ``step``: ``step-00000040``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint directory name, or None when ``name`` is not one."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_order(path: str | Path | None) -> int:
    """A sort key for checkpoint paths: the step, -1 for None or anything that is not a
    committed checkpoint name."""
    if not path:
        return -1
    step = parse_step(Path(path).name)
    return -1 if step is None else step


def this_host() -> str:
    """The host part this process writes into temp names: ``-`` is kept (parsing is
    right-anchored); anything odd becomes ``_`` so the name stays simple."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def work_name(prefix: str, step: int) -> str:
    """A fresh temp (``.tmp-``) or prune (``.del-``) name owned by this process."""
    return f"{prefix}{step_name(step)}-{this_host()}-{os.getpid()}-{secrets.token_hex(4)}"


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
