"""Checkpoint save and load for a user's script: the verified store the supervisor chooses from
(``trainer.checkpoint.api``), with the save reported as this rank's ``checkpoint`` phase."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rosetrainer._ours import trainer_module
from rosetrainer._worker import checkpoint_phase

api = trainer_module("checkpoint.api")
params_sha256 = trainer_module("checkpoint.state").params_sha256
wait_checkpoints = api.wait_checkpoints

__all__ = ["load_checkpoint", "params_sha256", "save_checkpoint", "wait_checkpoints"]


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    scaler: Any = None,
    extra: Any = None,
    *,
    keep_last: int = 3,
    keep_every: int = 0,
    async_save: bool = False,
) -> Path | None:
    """Commit ``model`` and ``optimizer`` at ``step`` as ``run_dir/checkpoints/step-XXXXXXXX``:
    written to a temporary directory, every file fsync'd and hashed, the manifest last, then
    renamed into place, so a kill at any instant leaves the older checkpoints intact.

    ``run_dir`` is :func:`rosetrainer.run_dir`. ``step`` counts completed optimizer steps, as
    :func:`rosetrainer.heartbeat` does. ``extra`` is your own JSON-able state (epoch, sampler
    position, …), given back by :func:`load_checkpoint`. Call it from rank 0 or from every rank:
    only global rank 0 writes. Returns the checkpoint directory (None on other ranks, or with
    ``async_save=True``, where the write finishes in the background). The arguments are those of
    ``trainer.checkpoint.save_checkpoint`` (docs/checkpoints.md), ``keep_every`` included.

    Raises CheckpointWriteFailed (older checkpoints stay intact), CheckpointLocked when another
    process writes into ``run_dir``, ValueError when ``extra`` is not JSON-able.
    """
    with checkpoint_phase(step):
        path: Path | None = api.save_checkpoint(
            run_dir,
            model,
            optimizer,
            step,
            scaler=scaler,
            extra=extra,
            keep_last=keep_last,
            keep_every=keep_every,
            async_save=async_save,
        )
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    map_location: Any = None,
) -> tuple[int, Any]:
    """Load ``path`` into ``model`` (and ``optimizer``) and return ``(step, extra)``.

    ``path`` is the checkpoint :func:`rosetrainer.resume_from` named, any checkpoint directory,
    or a run directory (its newest valid checkpoint). Only tensors and JSON are read, so no code
    in a file runs; the loaded parameters are checked against the manifest's ``params_sha256``.
    A DDP-wrapped model and an unwrapped one load alike. Raises FileNotFoundError when there is
    no valid checkpoint, CheckpointInvalid when it does not verify.
    """
    step, extra = api.load_checkpoint(
        path, model, optimizer, scaler=scaler, map_location=map_location
    )
    return int(step), extra
