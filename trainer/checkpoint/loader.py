"""Load a verified checkpoint into a model, optimizer and grad scaler without running its code.

Tensors come from safetensors files (a header of JSON plus raw bytes: there is nothing to execute);
everything else is JSON. A payload that is not a safetensors file — a pickle, say — is refused
before any of it is interpreted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import fsio, manifest
from . import state as st
from .errors import CheckpointIncompatible, CheckpointUnloadable, invalid_on_error
from .integrity import verify
from .layout import MODEL_FILE, OPTIM_FILE, STATE_FILE


def _device(map_location: Any) -> str:
    if map_location is None:
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    raise TypeError(f"map_location must be a device string or torch.device, got {map_location!r}")


def _read_tensors(ckpt: Path, name: str, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(ckpt / name, device=device)
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointUnloadable(f"{name} is not a readable safetensors file ({e})", ckpt) from e


def _check_model(
    expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], ckpt: Path
) -> None:
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    both = set(expected) & set(saved)
    shapes = sorted(
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in both
        if tuple(saved[k].shape) != tuple(expected[k].shape)
    )
    # load_state_dict would cast silently; a checkpoint holds the model's own dtypes.
    dtypes = sorted(
        f"{k}: checkpoint {saved[k].dtype} vs model {expected[k].dtype}"
        for k in both
        if saved[k].dtype != expected[k].dtype
    )
    problems = []
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    if dtypes:
        problems.append("dtype mismatch: " + "; ".join(dtypes))
    if missing:
        problems.append("missing from checkpoint: " + ", ".join(missing))
    if unexpected:
        problems.append("not in model: " + ", ".join(unexpected))
    if problems:
        raise CheckpointIncompatible(f"{ckpt} does not fit this model — " + " | ".join(problems))


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    map_location: Any = "cpu",
    verified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Verify checkpoint directory ``path``, load it into the objects given, return its manifest.

    ``verified``: the manifest ``verify(path)`` returned, in this process or another (a peer
    rank that verified for every rank): the files are then not read and hashed again; the loaded
    parameters are still checked against its ``params_sha256`` (``params_xxh3_128`` in memory).

    ``model`` may be DDP-wrapped; its tensors are read onto ``map_location``. The optimizer's are
    read into host memory whatever ``map_location`` says: ``optimizer.load_state_dict`` moves
    each state tensor to its parameter's device and dtype, and keeps step counters (AdamW's
    ``step``) on the host, where a fresh optimizer has them; one on an accelerator would cost a
    device-to-host read per parameter at every step. The loaded parameters are checked against
    the manifest's ``params_sha256``. Raises CheckpointInvalid (fails verification),
    CheckpointUnloadable (a CheckpointInvalid: verifies, but a payload is not safetensors, its
    state does not decode, a parameter or optimizer tensor holds NaN or infinity, or the loaded
    parameters do not hash to ``params_sha256``),
    CheckpointIncompatible (tensor names, shapes or dtypes differ from the model or optimizer —
    the message names them — or a newer format version).
    """
    ckpt = Path(path)
    man = verify(ckpt) if verified is None else verified
    with invalid_on_error(ckpt, STATE_FILE), fsio.open_dir(ckpt) as dir_fd:
        size = man["files"][STATE_FILE]["size"]
        saved_state = json.loads(fsio.read_regular(STATE_FILE, dir_fd, size))
    tensors = _read_tensors(ckpt, MODEL_FILE, _device(map_location))
    for name, target in (saved_state.get("model_aliases") or {}).items():
        if target not in tensors:
            raise CheckpointUnloadable(
                f"{STATE_FILE} aliases {name} to missing tensor {target}", ckpt
            )
        tensors[name] = tensors[target]
    inner = st.unwrap(model)
    _check_model(st.model_state(inner), tensors, ckpt)
    _check_finite(ckpt, [(n, tensors[n]) for n, _ in inner.named_parameters() if n in tensors])
    inner.load_state_dict(tensors, strict=True)
    algo = manifest.file_hash(man)
    if st.params_digest(inner, algo) != man[manifest.params_key(algo)]:
        raise CheckpointUnloadable(
            f"loaded parameters do not match {manifest.params_key(algo)}", ckpt
        )
    _load_optimizer(ckpt, man, saved_state, optimizer, scaler)
    return man


def _load_optimizer(
    ckpt: Path,
    man: dict[str, Any],
    saved_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    scaler: Any,
) -> None:
    """Load the optimizer and grad-scaler state of the verified checkpoint ``ckpt`` (manifest
    ``man``, ``state.json`` ``saved_state``); tensors are read into host memory (see load)."""
    need_extra = (optimizer is not None and saved_state.get("optimizer") is not None) or (
        scaler is not None and saved_state.get("scaler") is not None
    )
    extra = (
        _read_tensors(ckpt, OPTIM_FILE, "cpu") if need_extra and OPTIM_FILE in man["files"] else {}
    )
    _check_finite(ckpt, list(extra.items()))
    if optimizer is not None:
        skeleton = saved_state.get("optimizer")
        if skeleton is None:
            raise CheckpointIncompatible(
                f"{ckpt} holds no optimizer state, but an optimizer was given"
            )
        osd = _decode(skeleton, extra, ckpt)
        _check_optimizer(optimizer, osd, ckpt)
        try:
            optimizer.load_state_dict(osd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointIncompatible(
                f"{ckpt}: optimizer state does not fit this optimizer: {e}"
            ) from e
    # A checkpoint without scaler state (saved with none, or a disabled one) leaves the scaler as
    # it is; a disabled scaler ignores what it is given.
    if scaler is not None and saved_state.get("scaler"):
        scaler.load_state_dict(_decode(saved_state["scaler"], extra, ckpt))


def _check_finite(ckpt: Path, named: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse parameters or optimizer state holding NaN or infinity, whatever the manifest says
    (one written before it recorded ``finite``, or resealed): training could only go on in
    NaN from them."""
    bad = st.nonfinite_names(named)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointUnloadable(f"{', '.join(bad[:3])}{more} hold NaN or infinity", ckpt)


def _decode(skeleton: Any, tensors: dict[str, torch.Tensor], ckpt: Path) -> Any:
    try:
        return st.decode(skeleton, tensors)
    except KeyError as e:
        raise CheckpointUnloadable(f"{STATE_FILE} refers to missing tensor {e}", ckpt) from e


def _check_optimizer(optimizer: torch.optim.Optimizer, osd: dict[str, Any], ckpt: Path) -> None:
    """Name optimizer state tensors whose shapes differ from the parameter they belong to."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in osd.get("param_groups", []) for i in g.get("params", [])]
    if len(saved_ids) != len(params):
        raise CheckpointIncompatible(
            f"{ckpt}: optimizer has {len(params)} parameters, checkpoint has {len(saved_ids)}"
        )
    by_id = dict(zip(saved_ids, params, strict=True))
    bad = []
    for pid, pstate in (osd.get("state") or {}).items():
        p = by_id.get(pid)
        if p is None or not isinstance(pstate, dict):
            continue
        for key, v in pstate.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                bad.append(
                    f"state[{pid}].{key}: checkpoint {tuple(v.shape)} vs parameter {tuple(p.shape)}"
                )
    if bad:
        raise CheckpointIncompatible(f"{ckpt}: optimizer state does not fit — " + "; ".join(bad))
