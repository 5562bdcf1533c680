"""Two functions for users' own training scripts, with the whole store behind them.

``path`` in both is a **run directory**: checkpoints go to ``path/checkpoints/step-XXXXXXXX/``
exactly as the trainer's do, so the supervisor, the CLI and ``find_latest_valid`` work on them.
``load_checkpoint`` also takes one checkpoint directory, or a single ``torch.save`` file from an
older script (read with ``weights_only=True``: a pickle that would run code is refused).
"""

from __future__ import annotations

import atexit
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointInvalid
from .integrity import find_latest_valid
from .layout import MANIFEST
from .loader import load
from .state import check_json, strip_prefix, unwrap
from .store import CheckpointStore

_stores: dict[Path, CheckpointStore] = {}
_guard = threading.Lock()


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def save_checkpoint(
    path: str | os.PathLike[str],
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
    """Commit a verified checkpoint of ``step`` under the run directory ``path``.

    Call it on every rank: only global rank 0 writes (DDP replicas are identical). ``extra`` is
    your own JSON-able state, given back by :func:`load_checkpoint`. Synchronous by default and
    returns the committed checkpoint directory; with ``async_save=True`` it returns None once the
    state is copied, and the write finishes in the background (awaited by the next call,
    :func:`wait_checkpoints`, or at exit). Retention keeps the newest ``keep_last``.

    Raises CheckpointWriteFailed when the write fails (disk full…; older checkpoints stay intact),
    CheckpointLocked when another process writes into ``path``, ValueError when ``extra`` is not
    JSON-able.
    """
    if not _is_rank0():
        return None
    check_json(extra, "extra")
    key = Path(path).resolve()
    with _guard:
        store = _stores.get(key)
        if store is None:
            store = CheckpointStore(
                key, is_writer=True, keep_last=keep_last, keep_every=keep_every, fail_fatal=True
            )
            _stores[key] = store
    store.async_save = async_save
    store.save(step, model, optimizer, scaler, {"extra": extra}, {})
    if async_save:
        return None
    return store.last_path


def wait_checkpoints() -> None:
    """Wait for every background save started by :func:`save_checkpoint` in this process.

    Raises CheckpointWriteFailed when one of them failed.
    """
    with _guard:
        stores = list(_stores.values())
    for store in stores:
        store.wait()


def _close_all() -> None:
    with _guard:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


atexit.register(_close_all)


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    map_location: Any = None,
) -> tuple[int, Any]:
    """Load into ``model`` (and ``optimizer``/``scaler``) and return ``(step, extra)``.

    ``path`` is a run directory (its newest valid checkpoint is used, broken ones are quarantined),
    a checkpoint directory, or a legacy single-file ``torch.save`` checkpoint. Raises
    FileNotFoundError when there is no valid checkpoint, CheckpointInvalid / CheckpointIncompatible
    as :func:`trainer.checkpoint.load` does.
    """
    p = Path(path)
    with _guard:
        own = _stores.get(p.resolve())
    if own is not None:
        own.wait()  # our own background save of this run must land before we read it
    if p.is_file():
        return _load_legacy(p, model, optimizer, scaler, map_location)
    if not (p / MANIFEST).exists():
        found = find_latest_valid(p)
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint under {p}/checkpoints")
        p = found
    manifest = load(p, model, optimizer, scaler, map_location=map_location or "cpu")
    return int(manifest["step"]), manifest["train_state"].get("extra")


def _load_legacy(
    path: Path, model: nn.Module, optimizer: Any, scaler: Any, map_location: Any
) -> tuple[int, Any]:
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointInvalid(
            "refused to load: not a plain tensors-and-containers torch file "
            f"({e.__class__.__name__})",
            path,
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointInvalid("legacy checkpoint file has no 'model' entry", path)
    unwrap(model).load_state_dict(strip_prefix(dict(ckpt["model"])))
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt.get("step", 0)), ckpt.get("extra")
