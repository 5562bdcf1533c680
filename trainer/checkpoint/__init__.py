"""The checkpoint store: atomic commit, verification, quarantine, retention, async save, safe load.

See docs/checkpoints.md for the layout, the manifest, the CLI and the failure behaviour.

Names are imported lazily, so reading and verifying checkpoints (the CLI, a supervisor between
attempts) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import load_checkpoint, save_checkpoint, wait_checkpoints
    from .errors import (
        CheckpointError,
        CheckpointIncompatible,
        CheckpointInvalid,
        CheckpointLocked,
        CheckpointUnloadable,
        CheckpointWriteFailed,
    )
    from .integrity import CheckpointInfo, find_latest_valid, list_checkpoints, verify
    from .layout import FORMAT_VERSION
    from .loader import load
    from .retention import RetentionPolicy
    from .state import params_sha256
    from .store import CheckpointStore

_WHERE = {
    "load_checkpoint": "api",
    "save_checkpoint": "api",
    "wait_checkpoints": "api",
    "CheckpointError": "errors",
    "CheckpointIncompatible": "errors",
    "CheckpointInvalid": "errors",
    "CheckpointLocked": "errors",
    "CheckpointUnloadable": "errors",
    "CheckpointWriteFailed": "errors",
    "FORMAT_VERSION": "layout",
    "load": "loader",
    "RetentionPolicy": "retention",
    "params_sha256": "state",
    "CheckpointStore": "store",
    "CheckpointInfo": "integrity",
    "find_latest_valid": "integrity",
    "list_checkpoints": "integrity",
    "verify": "integrity",
}

__all__ = [
    "CheckpointError",
    "CheckpointIncompatible",
    "CheckpointInfo",
    "CheckpointInvalid",
    "CheckpointLocked",
    "CheckpointStore",
    "CheckpointUnloadable",
    "CheckpointWriteFailed",
    "FORMAT_VERSION",
    "RetentionPolicy",
    "find_latest_valid",
    "list_checkpoints",
    "load",
    "load_checkpoint",
    "params_sha256",
    "save_checkpoint",
    "verify",
    "wait_checkpoints",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
