"""The checkpoint store: atomic commit, verification, quarantine, retention, async save, safe load.

See docs/checkpoints.md for the layout, the manifest, the CLI and the failure behaviour.
"""

from .api import load_checkpoint, save_checkpoint, wait_checkpoints
from .errors import (
    CheckpointError,
    CheckpointIncompatible,
    CheckpointInvalid,
    CheckpointLocked,
    CheckpointWriteFailed,
)
from .layout import FORMAT_VERSION
from .loader import load
from .retention import RetentionPolicy
from .state import params_sha256
from .store import CheckpointStore
from .verify import CheckpointInfo, find_latest_valid, list_checkpoints, verify

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointIncompatible",
    "CheckpointInfo",
    "CheckpointInvalid",
    "CheckpointLocked",
    "CheckpointStore",
    "CheckpointWriteFailed",
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
