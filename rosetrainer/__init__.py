"""The public module for your own training script under the supervisor.

Four things, each a no-op or a plain local behaviour when the script runs without the
supervisor::

    import rosetrainer

    path = rosetrainer.resume_from()                  # the checkpoint the supervisor chose, or None
    if path:
        step, extra = rosetrainer.load_checkpoint(path, model, optimizer)
    ...
    rosetrainer.heartbeat(step)                       # every step, from the training loop
    rosetrainer.save_checkpoint(rosetrainer.run_dir(), model, optimizer, step, extra={...})
    ...
    rosetrainer.done(step)                            # the script finished its work

Importing this module does not import torch: the checkpoint functions load it on first use, and
nothing of the built-in trainer's model or data is ever imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rosetrainer._worker import done, heartbeat, is_supervised, resume_from, run_dir

if TYPE_CHECKING:
    from rosetrainer._checkpoint import (
        load_checkpoint,
        params_sha256,
        save_checkpoint,
        wait_checkpoints,
    )

# Names that need torch, imported on first use.
_LAZY = {
    "save_checkpoint": "rosetrainer._checkpoint",
    "load_checkpoint": "rosetrainer._checkpoint",
    "params_sha256": "rosetrainer._checkpoint",
    "wait_checkpoints": "rosetrainer._checkpoint",
}

__all__ = [
    "done",
    "heartbeat",
    "is_supervised",
    "load_checkpoint",
    "params_sha256",
    "resume_from",
    "run_dir",
    "save_checkpoint",
    "wait_checkpoints",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
