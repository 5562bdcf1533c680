"""Turn model / optimizer / scaler state into flat tensors plus JSON, and back.

Nothing here touches the disk. A :class:`Snapshot` is a host-memory copy of everything one
checkpoint holds, taken while the training loop waits; everything after it (serialising, hashing,
writing) can run in the background because the live tensors are no longer referenced.

Non-tensor state is JSON: tensors are replaced by ``{"__tensor__": name}``, tuples by
``{"__tuple__": [...]}`` and dicts with non-string keys (optimizer state is keyed by int) by
``{"__dict__": [[key, value], ...]}``, so decoding gives back the same Python types.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import hashing

_DDP_PREFIX = "module."


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP / FSDP-style wrapper (anything with ``.module``), else ``model``."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def params_sha256(model: nn.Module) -> str:
    """sha256 over every parameter's raw bytes, in ``named_parameters()`` order.

    A DDP wrapper is looked through, so a wrapped and an unwrapped model give the same digest.
    Parameters on an accelerator are copied to the host to be hashed.
    """
    return params_digest(model, hashing.SHA256)


def params_digest(model: nn.Module, algo: str) -> str:
    """:func:`params_sha256` under the file hash ``algo`` (xxh3 for memory snapshots)."""
    return tensors_digest([p.detach() for _, p in unwrap(model).named_parameters()], algo)


def tensors_digest(tensors: list[torch.Tensor], algo: str = hashing.SHA256) -> str:
    """The ``algo`` digest of the raw bytes of ``tensors`` in order (a snapshot's
    :func:`params_digest`)."""
    h = hashing.new(algo)
    for t in tensors:
        h.update(_raw_bytes(t))
    return h.hexdigest()


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors of ``named`` that hold a NaN or an infinity, in
    order. One fused norm per device and dtype screens them all (a tensor holding NaN or
    infinity has no finite norm), and only a tensor whose norm is not finite is checked exactly
    (a finite one may overflow its norm); each device's verdicts are read together: one read per
    device, whatever the number of tensors, and one call, not one per tensor."""
    floats = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]
    suspects: list[tuple[str, torch.Tensor]] = []
    for key in {(t.device, t.dtype) for _, t in floats}:
        here = [(name, t) for name, t in floats if (t.device, t.dtype) == key]
        norms = torch._foreach_norm([t for _, t in here])
        verdicts = torch.isfinite(torch.stack(list(norms))).tolist()
        suspects += [item for item, ok in zip(here, verdicts, strict=True) if not ok]
    finite: dict[str, bool] = {}
    for device in {t.device for _, t in suspects}:
        here = [(name, t) for name, t in suspects if t.device == device]
        verdicts = torch.stack([torch.isfinite(t).all() for _, t in here]).tolist()
        finite.update(zip([name for name, _ in here], verdicts, strict=True))
    return [name for name, _ in floats if not finite.get(name, True)]


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # uint8 view: numpy has no bfloat16, and the bytes are what we hash anyway.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


#: How a tensor of the live state is taken into a snapshot.
Take = Callable[[torch.Tensor], torch.Tensor]


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy that shares nothing with ``t`` (the loop may change ``t`` next)."""
    t = t.detach()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    out.copy_(t)
    return out


@dataclass
class Snapshot:
    """Host-memory copy of one checkpoint's state; safe to serialise from another thread."""

    step: int
    model_tensors: dict[str, torch.Tensor]
    #: name -> name it shares storage with (tied weights are stored once)
    model_aliases: dict[str, str]
    param_names: list[str]
    optim_tensors: dict[str, torch.Tensor]
    optim_skeleton: Any
    scaler_state: Any
    train_state: dict[str, Any]
    meta: dict[str, Any]
    nbytes: int = field(default=0)

    def params(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters' host copies by name, in ``named_parameters()`` order."""
        return [(n, self.model_tensors[self.model_aliases.get(n, n)]) for n in self.param_names]

    def params_digest(self, algo: str = hashing.SHA256) -> str:
        """Same digest as :func:`params_digest` of the model at capture time."""
        return tensors_digest([t for _, t in self.params()], algo)

    @functools.cached_property
    def nonfinite(self) -> list[str]:
        """The parameters and optimizer (and grad-scaler) tensors that hold a NaN or an
        infinity; computed once, on the host copies. Buffers are not judged: a mask may hold
        -inf by design, and a buffer is not what training updates."""
        return nonfinite_names([*self.params(), *self.optim_tensors.items()])


def host_copy(snap: Snapshot) -> Snapshot:
    """``snap`` with every tensor copied to the host (one collected from the live tensors)."""
    return dataclasses.replace(
        snap,
        model_tensors={k: _host_copy(t) for k, t in snap.model_tensors.items()},
        optim_tensors={k: _host_copy(t) for k, t in snap.optim_tensors.items()},
    )


def strip_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` with a DDP `module.` prefix removed from every key (when all keys carry it)."""
    if sd and all(k.startswith(_DDP_PREFIX) for k in sd):
        return {k[len(_DDP_PREFIX) :]: v for k, v in sd.items()}
    return sd


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict()`` of the unwrapped model, ``module.`` prefixes removed."""
    return strip_prefix(dict(unwrap(model).state_dict()))


def check_json(value: Any, what: str) -> None:
    """Raise ValueError naming ``what`` when ``value`` is not plain JSON."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} must be JSON-serialisable (dict/list/str/number/bool/None): {e}"
        ) from e


def encode(
    value: Any, tensors: dict[str, torch.Tensor], prefix: str, take: Take = _host_copy
) -> Any:
    """JSON skeleton of ``value``; each tensor goes into ``tensors`` under a path name, as
    ``take`` gives it (a host copy, unless told otherwise)."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = take(value)
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: encode(v, tensors, f"{prefix}.{k}", take) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise ValueError(
                    f"cannot store dict key {k!r} of type {type(k).__name__} at {prefix}"
                )
            items.append([k, encode(v, tensors, f"{prefix}.{k}", take)])
        return {"__dict__": items}
    if isinstance(value, tuple):
        return {
            "__tuple__": [encode(v, tensors, f"{prefix}.{i}", take) for i, v in enumerate(value)]
        }
    if isinstance(value, list):
        return [encode(v, tensors, f"{prefix}.{i}", take) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    raise ValueError(
        f"cannot store a value of type {type(value).__name__} at {prefix}: "
        "only tensors, dicts, lists, tuples, str, int, float, bool and None are saved"
    )


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; raises KeyError when a referenced tensor is missing."""
    if isinstance(value, dict):
        if "__tensor__" in value and len(value) == 1:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value and len(value) == 1:
            return tuple(decode(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value and len(value) == 1:
            return {k: decode(v, tensors) for k, v in value["__dict__"]}
        if "__float__" in value and len(value) == 1:
            return float(value["__float__"])
        return {k: decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    return value


def _model_tensors(
    sd: dict[str, Any], take: Take = _host_copy
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A model state dict's tensors as ``take`` gives them (host copies), and the names that
    alias another: tied weights (e.g. embedding and output head) share storage and are stored
    once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[object, ...], str] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"model state {name!r} is a {type(t).__name__}, not a tensor")
        key = (
            t.untyped_storage().data_ptr() if t.numel() else id(t),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            str(t.device),
        )
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = take(t)
    return tensors, aliases


def scaler_enabled(scaler: Any) -> bool:
    """Whether ``scaler`` (a ``torch.amp.GradScaler`` or an object like it) is enabled."""
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def capture(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: Any,
    train_state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    take: Take = _host_copy,
) -> Snapshot:
    """Everything a checkpoint holds, each tensor as ``take`` gives it: by default a host copy,
    so the caller may train on at once; the memory tier takes the live tensors (detached) and
    copies them itself.

    Raises ValueError when ``train_state``/``meta`` are not JSON or state holds an unsupported type.
    """
    train_state = dict(train_state or {})
    meta = dict(meta or {})
    check_json(train_state, "train_state")
    check_json(meta, "meta")
    with torch.no_grad():
        tensors, aliases = _model_tensors(model_state(model), take)
        param_names = [n for n, _ in unwrap(model).named_parameters()]
        param_names = list(strip_prefix(dict.fromkeys(param_names)).keys())
        optim_tensors: dict[str, torch.Tensor] = {}
        optim_skeleton = (
            encode(optimizer.state_dict(), optim_tensors, "optim", take)
            if optimizer is not None
            else None
        )
        scaler_state = None
        # A disabled scaler has no state: stored as none (null), as a run without one stores it.
        if scaler is not None and scaler_enabled(scaler):
            scaler_state = encode(scaler.state_dict(), optim_tensors, "scaler", take)
    nbytes = sum(t.nbytes for t in tensors.values()) + sum(t.nbytes for t in optim_tensors.values())
    return Snapshot(
        step=step,
        model_tensors=tensors,
        model_aliases=aliases,
        param_names=param_names,
        optim_tensors=optim_tensors,
        optim_skeleton=optim_skeleton,
        scaler_state=scaler_state,
        train_state=train_state,
        meta=meta,
        nbytes=nbytes,
    )
