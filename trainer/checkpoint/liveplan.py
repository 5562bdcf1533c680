"""The live state of a run, collected once for the memory tier and checked at each snapshot.

``state.capture`` walks the model's state dict, the optimizer's nested state and the scaler's
to find every tensor: for the tiny preset's 112 tensors that took longer than copying them. Between
two snapshots training updates the same tensors in place, so a snapshot can reuse what the last
walk found, once a cheap check says nothing moved: the same parameter, buffer and optimizer
state objects, each with its storage, shape and dtype, the same non-tensor optimizer state, and
the same parameters in each optimizer group. Anything else (a parameter replaced, a new optimizer
state entry, a load, a changed dtype, a parameter moved to another group) fails the check and
the state is walked anew. The optimizer's ``param_groups`` (the learning rate moves every step)
and the scaler's state are encoded afresh each time.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .state import Snapshot, capture, check_json, encode, scaler_enabled, unwrap

#: Optimizer state values compared by value; any other kind makes every snapshot a full walk.
_PLAIN = (int, float, bool, str, type(None))
#: Each tensor's shape and dtype, read in one call.
_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")


@dataclass
class _Walk:
    """What one walk of the live objects finds: enough to tell whether anything moved."""

    held: list[Any]
    """The tensors and state values themselves: kept alive, so no id in ``marks`` is reused."""
    marks: list[Any]
    groups: list[dict[str, Any]]
    """The optimizer's ``param_groups``, each without its ``params``."""


def _walk(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, modules: list[nn.Module]
) -> _Walk:
    """The tensors and state of ``modules`` (the model's, as the last walk found them) and of
    ``optimizer``. A submodule added or replaced shows as a changed child of its parent.

    The optimizer is read directly, not through ``state_dict()``, which packs every group and
    state entry anew: what it would give is checked once per plan (:meth:`LivePlan.capture`).
    It runs at every snapshot, so it reads in bulk (one call per kind of mark, not one per
    tensor): a tensor is the same object at the same storage, with the same shape and dtype."""
    held: list[Any] = [
        t
        for own in [m._parameters for m in modules] + [m._buffers for m in modules]
        for t in own.values()
    ]
    others: list[Any] = [unwrap(model), [c for m in modules for c in m._modules.values()]]
    groups: list[dict[str, Any]] = []
    plain: list[Any] = []
    if optimizer is not None:
        entries = list(optimizer.state.values())
        values = [v for entry in entries for v in entry.values()]
        plain = [v for v in values if not isinstance(v, torch.Tensor)]
        held += [v for v in values if isinstance(v, torch.Tensor)]
        # Which parameters hold state, under which names: the places of the values. A plain
        # value is compared with its type too (1, 1.0 and True are equal, not the same JSON).
        others += [list(map(id, optimizer.state)), list(map(len, entries))]
        others += [[k for entry in entries for k in entry], plain, list(map(type, plain))]
        if not all(isinstance(v, _PLAIN) for v in plain):
            others.append(object())  # a container may change in place, unseen: never reuse
        for group in optimizer.param_groups:
            others.append(list(map(id, group["params"])))
            groups.append({k: v for k, v in group.items() if k != "params"})
    tensors = [t for t in held if t is not None]
    marks = [
        list(map(id, held)),
        list(map(torch.Tensor.data_ptr, tensors)),
        list(map(_SHAPE_DTYPE, tensors)),
        *others,
    ]
    return _Walk([*held, *plain], marks, groups)


@dataclass
class _Plan:
    snap: Snapshot
    """The full capture it came from; its tensors are views of the live ones."""
    modules: list[nn.Module]
    walk: _Walk
    reusable: bool
    """False when the optimizer's ``state_dict()`` is not what a direct read gives (a subclass
    that adds to it, a hook): every snapshot then walks the state anew."""


class LivePlan:
    """Snapshots of one model, optimizer and scaler for the memory tier (``take=detach``: the
    tensors are the live ones, which the slot writer copies)."""

    def __init__(self) -> None:
        self._plan: _Plan | None = None

    def capture(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: Any,
        train_state: dict[str, Any] | None,
        meta: dict[str, Any] | None,
    ) -> Snapshot:
        """The snapshot :func:`state.capture` would give, from the last walk when nothing
        moved. Raises ValueError as it does."""
        plan = self._plan
        if plan is not None and plan.reusable:
            walk = _walk(model, optimizer, plan.modules)
            if walk.marks == plan.walk.marks:
                snap = self._reuse(plan, walk, step, scaler, train_state, meta)
                if snap is not None:
                    return snap
        self._plan = None
        snap = capture(step, model, optimizer, scaler, train_state, meta, take=torch.Tensor.detach)
        modules = list(unwrap(model).modules())
        plan = _Plan(snap, modules, _walk(model, optimizer, modules), reusable=True)
        again = self._reuse(plan, plan.walk, step, scaler, train_state, meta)
        plan.reusable = again is not None and again.optim_skeleton == snap.optim_skeleton
        self._plan = plan
        return snap

    @staticmethod
    def _reuse(
        plan: _Plan,
        walk: _Walk,
        step: int,
        scaler: Any,
        train_state: dict[str, Any] | None,
        meta: dict[str, Any] | None,
    ) -> Snapshot | None:
        """The plan's snapshot with this step's non-tensor state; None when that state holds a
        tensor (the plan's files would not have it)."""
        train_state = dict(train_state or {})
        meta = dict(meta or {})
        check_json(train_state, "train_state")
        check_json(meta, "meta")
        extra: dict[str, torch.Tensor] = {}
        skeleton = plan.snap.optim_skeleton
        if skeleton is not None:
            packed = skeleton["param_groups"]
            if len(packed) != len(walk.groups):
                return None
            groups = []
            for i, group in enumerate(walk.groups):
                at = f"optim.param_groups.{i}"
                encoded = {k: encode(v, extra, f"{at}.{k}", _no_take) for k, v in group.items()}
                encoded["params"] = packed[i]["params"]  # the same parameters: the marks say so
                groups.append(encoded)
            skeleton = {"state": skeleton["state"], "param_groups": groups}
        scaler_state = None
        if scaler is not None and scaler_enabled(scaler):
            scaler_state = encode(scaler.state_dict(), extra, "scaler", _no_take)
        if extra:
            return None
        return dataclasses.replace(
            plan.snap,
            step=step,
            optim_skeleton=skeleton,
            scaler_state=scaler_state,
            train_state=train_state,
            meta=meta,
        )


def _no_take(t: torch.Tensor) -> torch.Tensor:
    return t
