"""Names and places inside ``RUN_DIR/checkpoints`` — the on-disk contract in one module.

```
checkpoints/step-00000040/            committed: payload files + manifest.json
checkpoints/.tmp-step-00000040-<host>-<pid>-<token>/   being written by <pid> on <host>
checkpoints/.del-step-00000010-<host>-<pid>-<token>/   being pruned by <pid> on <host>
checkpoints/quarantine/step-00000030[-N]/              found invalid, with REASON.txt
checkpoints/step-00000050/UNLOADABLE.txt               verified, but a trainer could not load it
checkpoints/.writer.lock              held by the one writer
```

Temporary names carry the host and pid of the process that made them, so a reader can tell a
directory whose writer still lives (leave it) from one whose writer is dead (remove it).
"""

from __future__ import annotations

import os
from pathlib import Path

from runcontract.layout import (
    CHECKPOINTS,
    DEL_PREFIX,
    QUARANTINE,
    TMP_PREFIX,
    WRITER_LOCK,
    WRITER_OWNER,
    WorkDir,
    parse_step,
    parse_work_name,
    step_name,
    this_host,
    work_name,
)

#: The on-disk format this code writes; it reads this version and every older one.
FORMAT_VERSION = 1

LOCK_FILE = WRITER_LOCK
OWNER_FILE = WRITER_OWNER
MANIFEST = "manifest.json"
REASON_FILE = "REASON.txt"
#: Written into a checkpoint that verifies but could not be loaded; makes it invalid from then on.
UNLOADABLE_FILE = "UNLOADABLE.txt"

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"

# Names shared with the supervisor and the tools (which must not import torch) live in the
# run-directory contract; they are re-exported here for the store's modules.
__all__ = [
    "CHECKPOINTS", "DEL_PREFIX", "FORMAT_VERSION", "LOCK_FILE", "MANIFEST", "MODEL_FILE",
    "OPTIM_FILE", "OWNER_FILE", "QUARANTINE", "REASON_FILE", "STATE_FILE", "TMP_PREFIX",
    "UNLOADABLE_FILE", "WorkDir", "checkpoints_dir", "parse_step", "parse_work_name", "step_name",
    "this_host", "work_name",
]  # fmt: skip


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS
