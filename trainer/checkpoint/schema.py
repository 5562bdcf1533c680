"""What the JSON of a valid checkpoint must hold: the trainer's fields of the manifest's
``train_state``, and ``state.json``.

A checkpoint whose hashes match but whose state no trainer could resume from (``position: "abc"``,
a negative step, a ``train_state.step`` other than the manifest's) is invalid, found by
``verify`` and quarantined like a corrupt one, rather than failing every relaunch at load time.
Torch-free: the supervisor and the CLI verify without importing torch.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..train_state import INTEGER_MINIMUM, short_repr, skipped_ranges
from . import fsio

#: ``train_state`` fields the built-in trainer records must be integers of at least their
#: ``INTEGER_MINIMUM`` when present; ``skipped`` must be ranges of positions (``skipped_ranges``);
#: any other key is the saver's own and is not judged here.


def check_train_state(manifest: dict[str, Any]) -> None:
    """Raise ValueError when a known ``train_state`` field has the wrong type or range, or its
    ``step`` is not the manifest's."""
    state = manifest["train_state"]
    for key, least in INTEGER_MINIMUM.items():
        if key in state and (type(state[key]) is not int or state[key] < least):
            shown = short_repr(state[key])
            raise ValueError(f"train_state {key} is {shown}, not an integer >= {least}")
    if "skipped" in state:
        skipped_ranges(state["skipped"], state.get("position"))
    if "step" in state and state["step"] != manifest["step"]:
        raise ValueError(
            f"train_state step {state['step']} is not the manifest's step {manifest['step']}"
        )


def check_state(raw: bytes) -> list[str]:
    """Check ``state.json``; return the names of the tensors that hold optimizer steps (their
    values live in the optimizer file: see :func:`check_steps`). Raises ValueError."""
    state = json.loads(raw)
    if not isinstance(state, dict):
        raise ValueError("state.json is not a JSON object")
    aliases = state.get("model_aliases") or {}
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError("state.json model_aliases is not a map of tensor names")
    for key in ("optimizer", "scaler"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise ValueError(f"state.json {key} is not a JSON object")
    optimizer = state.get("optimizer")
    if optimizer is None:
        return []
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise ValueError("state.json optimizer param_groups is not a list of parameter groups")
    refs = []
    for pid, pstate in _items(optimizer.get("state", {})):
        step = pstate.get("step") if isinstance(pstate, dict) else None
        if step is None:
            continue
        if isinstance(step, dict) and isinstance(step.get("__tensor__"), str) and len(step) == 1:
            refs.append(step["__tensor__"])
        else:
            _check_step(step, pid)
    return refs


def check_steps(name: str, dir_fd: int, refs: list[str]) -> None:
    """Raise ValueError when a tensor of ``refs`` is missing from the safetensors file ``name``
    (already verified against its hash) or does not hold one finite step >= 0."""
    if not refs:
        return
    from safetensors import SafetensorError, safe_open  # numpy, never torch

    with fsio.open_regular(name, dir_fd) as (fd, _):
        try:
            # The file this descriptor holds, not whatever the name may point at by now.
            with safe_open(fsio.fd_path(fd), framework="numpy") as f:
                names = set(f.keys())
                for ref in refs:
                    if ref not in names:
                        raise ValueError(f"state.json refers to {ref}, missing from {name}")
                    values = f.get_tensor(ref).reshape(-1)
                    if values.size != 1:
                        raise ValueError(f"optimizer step {ref} holds {values.size} values, not 1")
                    _check_step(values[0].item(), ref)
        except (SafetensorError, TypeError) as e:
            raise ValueError(f"{name} is not a readable safetensors file ({e})") from e


def _items(encoded: Any) -> list[Any]:
    """The ``[key, value]`` pairs of a dict as ``state.encode`` wrote it."""
    if isinstance(encoded, dict) and set(encoded) == {"__dict__"}:
        pairs = encoded["__dict__"]
        if isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs):
            return pairs
    elif isinstance(encoded, dict):
        return [[k, v] for k, v in encoded.items()]
    raise ValueError("state.json optimizer state is not a map of parameter states")


def _check_step(step: Any, where: object) -> None:
    if isinstance(step, dict) and set(step) == {"__float__"}:  # how encode writes inf and nan
        step = math.nan
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not step >= 0:
        raise ValueError(f"optimizer step of {where} is {short_repr(step)}, not a number >= 0")
    if not math.isfinite(step):
        raise ValueError(f"optimizer step of {where} is {step}, not a finite number")
