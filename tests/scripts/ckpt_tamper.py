"""Real checkpoints, damaged on purpose: committed in-process, then rewritten and resealed so that
sizes, sha256s and the manifest's self-hash all match again (only what a load finds is wrong)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.scripts.ckpt_model import fresh, train
from trainer.checkpoint import CheckpointStore
from trainer.checkpoint import manifest as mf


def two_checkpoints(run_dir: Path) -> Path:
    """Commit steps 1 and 2 of the tiny model (train_state ``{"step": N}``); return step 2's
    directory."""
    model, opt = fresh()
    with CheckpointStore(run_dir, is_writer=True, async_save=False) as store:
        train(model, opt, 0, 1)
        store.save(1, model, opt, None, {"step": 1}, {})
        train(model, opt, 1, 2)
        store.save(2, model, opt, None, {"step": 2}, {})
    return run_dir / "checkpoints" / "step-00000002"


def reseal(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Let ``edit`` change the manifest in place, then write it back with a matching self-hash."""
    path = ckpt / "manifest.json"
    man = json.loads(path.read_bytes())
    edit(man)
    man.pop("manifest_sha256", None)
    man["manifest_sha256"] = hashlib.sha256(mf._canonical(man)).hexdigest()
    path.write_bytes(mf.to_bytes(man))


def replace_file(ckpt: Path, name: str, data: bytes) -> None:
    """Put ``data`` in place of payload file ``name`` and reseal the manifest to match it."""
    (ckpt / name).write_bytes(data)

    def entry(man: dict[str, Any]) -> None:
        man["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    reseal(ckpt, entry)


def replace_tensors(ckpt: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Let ``edit`` change the tensors of safetensors file ``name``; write and reseal them."""
    from safetensors.torch import load_file

    tensors = load_file(ckpt / name)
    edit(tensors)
    tmp = ckpt / f".{name}.new"
    save_file(tensors, tmp, metadata={"format": "pt"})
    data = tmp.read_bytes()
    tmp.unlink()
    replace_file(ckpt, name, data)
