"""The memory tier's cheap snapshots: the live state is walked once and reused while nothing
moved, and the checks run on the mapped copies. Each test changes the live state the way a user
or the trainer can, and compares what the tier committed with a full walk, bitwise."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from runcontract.env import MEM_ROOT
from tests.scripts.ckpt_model import assert_same_state, fresh, train, trained
from trainer.checkpoint import load, memstore
from trainer.checkpoint.layout import STATE_FILE
from trainer.checkpoint.liveplan import LivePlan
from trainer.checkpoint.memstore import MemoryStore
from trainer.checkpoint.memtier import memory_slots
from trainer.checkpoint.state import capture


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv(MEM_ROOT, str(shm))
    (tmp_path / "run").mkdir()
    return MemoryStore(tmp_path / "run", enabled=True)


def _same_as_a_full_walk(snap, model, opt) -> None:
    full = capture(
        snap.step, model, opt, None, snap.train_state, snap.meta, take=torch.Tensor.detach
    )
    assert snap.model_tensors.keys() == full.model_tensors.keys()
    assert snap.optim_tensors.keys() == full.optim_tensors.keys()
    for name, t in [*full.model_tensors.items(), *full.optim_tensors.items()]:
        mine = snap.model_tensors.get(name, snap.optim_tensors.get(name))
        assert mine.dtype == t.dtype and torch.equal(mine, t), name
    assert snap.optim_skeleton == full.optim_skeleton
    assert (snap.model_aliases, snap.param_names) == (full.model_aliases, full.param_names)


def _loads_back(store: MemoryStore, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    again, opt_again = fresh()
    load(memory_slots(store.run_dir)[0][1], again, opt_again)
    assert_same_state(model, again, opt, opt_again)


def test_a_snapshot_reuses_the_walk_while_training_updates_in_place() -> None:
    model, opt = trained(2)
    plan = LivePlan()
    first = plan.capture(2, model, opt, None, {"step": 2}, {})
    train(model, opt, 2, 3)
    opt.param_groups[0]["lr"] = 0.005  # a scheduler's step: encoded afresh
    second = plan.capture(3, model, opt, None, {"step": 3}, {"note": "x"})
    assert second.model_tensors is first.model_tensors  # the walk was reused
    assert second.optim_skeleton["param_groups"][0]["lr"] == 0.005
    assert (second.step, second.train_state, second.meta) == (3, {"step": 3}, {"note": "x"})
    _same_as_a_full_walk(second, model, opt)


def _replace_parameter(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.down = nn.Linear(32, 16)  # a new module: the old one's parameters are gone


def _swap_storage(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.up.weight.data = model.up.weight.data.clone() + 1  # same object, new storage


def _reload_optimizer(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # every state tensor a new one


def _new_buffer(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.norm.register_buffer("extra", torch.ones(3))


@pytest.mark.parametrize(
    "change", [_replace_parameter, _swap_storage, _reload_optimizer, _new_buffer]
)
def test_anything_that_moved_makes_a_new_walk(change) -> None:
    model, opt = trained(2)
    plan = LivePlan()
    first = plan.capture(2, model, opt, None, {}, {})
    change(model, opt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # new values, wherever they now live
    second = plan.capture(3, model, opt, None, {}, {})
    assert second.model_tensors is not first.model_tensors
    _same_as_a_full_walk(second, model, opt)


def test_an_optimizer_state_that_is_not_a_plain_value_is_walked_every_time() -> None:
    model, opt = trained(2)
    next(iter(opt.state.values()))["history"] = [1.0]  # a list may change in place, unseen
    plan = LivePlan()
    first = plan.capture(2, model, opt, None, {}, {})
    second = plan.capture(3, model, opt, None, {}, {})
    assert second.model_tensors is not first.model_tensors


def _new_param_group(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    extra = nn.Parameter(torch.zeros(3))
    model.register_parameter("extra", extra)
    opt.add_param_group({"params": [extra], "lr": 0.5})


def _state_dict_hook(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": len(o.state)})


def test_a_new_param_group_makes_a_new_walk() -> None:
    model, opt = trained(2)
    plan = LivePlan()
    first = plan.capture(2, model, opt, None, {}, {})
    _new_param_group(model, opt)
    second = plan.capture(3, model, opt, None, {}, {})
    assert second.model_tensors is not first.model_tensors
    assert len(second.optim_skeleton["param_groups"]) == 2
    _same_as_a_full_walk(second, model, opt)


def test_a_parameter_moved_between_groups_makes_a_new_walk() -> None:
    """Nothing but the groups' membership changes; yet every state entry's index in
    state_dict() moves with it, so the cached skeleton must not be reused."""
    model, opt = trained(2)
    params = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = params[:-2]
    opt.add_param_group({"params": params[-2:], "lr": 0.5})
    plan = LivePlan()
    first = plan.capture(2, model, opt, None, {}, {})
    moved = opt.param_groups[0]["params"].pop(0)
    opt.param_groups[1]["params"].append(moved)
    second = plan.capture(3, model, opt, None, {}, {})
    assert second.model_tensors is not first.model_tensors
    _same_as_a_full_walk(second, model, opt)


def test_an_optimizer_whose_state_dict_adds_to_its_state_is_walked_every_time() -> None:
    """The walk reads the optimizer directly; a state_dict() that is not what that reading
    gives (here a hook adds a key) must never be stood in for by it."""
    model, opt = trained(2)
    _state_dict_hook(model, opt)
    plan = LivePlan()
    first = plan.capture(2, model, opt, None, {}, {})
    train(model, opt, 2, 3)
    second = plan.capture(3, model, opt, None, {}, {})
    assert second.model_tensors is not first.model_tensors
    assert second.optim_skeleton["note"] == len(opt.state)
    _same_as_a_full_walk(second, model, opt)


def test_committed_snapshots_of_a_reused_walk_load_back_bitwise(store: MemoryStore) -> None:
    model, opt = trained(2)
    for step in (3, 4, 5):
        train(model, opt, step - 1, step)
        opt.param_groups[0]["lr"] *= 0.5
        assert store.save(step, model, opt, None, {"step": step}, {})
    _loads_back(store, model, opt)
    # state.json, written in pieces, is the JSON a full walk gives.
    full = capture(5, model, opt, None, {}, {}, take=torch.Tensor.detach)
    state = json.loads((memory_slots(store.run_dir)[0][1] / STATE_FILE).read_text())
    assert state == json.loads(
        json.dumps(
            {"model_aliases": full.model_aliases, "optimizer": full.optim_skeleton, "scaler": None}
        )
    )


@pytest.mark.parametrize("where", ["parameter", "optimizer"])
def test_a_nonfinite_value_found_on_the_copy_is_not_committed(
    store: MemoryStore, where: str
) -> None:
    model, opt = trained(2)
    assert store.save(2, model, opt, None, {}, {})
    assert store.save(3, model, opt, None, {}, {})
    with torch.no_grad():
        if where == "parameter":
            model.up.weight[3, 4] = float("nan")
        else:
            next(iter(opt.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
    assert not store.save(4, model, opt, None, {}, {})
    assert [s for s, _ in memory_slots(store.run_dir)] == [3]  # the newest is untouched
    assert store.enabled  # refused, not failed: the tier stays on


def test_values_whose_sum_overflows_are_finite_and_committed(store: MemoryStore) -> None:
    model, opt = trained(2)
    with torch.no_grad():
        model.up.weight[0, :2] = 3e38  # each finite; their float32 sum is not
    assert store.save(2, model, opt, None, {}, {})
    _loads_back(store, model, opt)


def test_a_buffer_may_hold_infinity_in_a_snapshot(store: MemoryStore) -> None:
    model, opt = trained(2)
    model.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
    assert store.save(2, model, opt, None, {}, {})
    assert store.save(3, model, opt, None, {}, {})
    assert [s for s, _ in memory_slots(store.run_dir)] == [3, 2]


def test_memory_saved_events_come_at_most_every_interval_with_a_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MEM_ROOT, str(tmp_path))
    (tmp_path / "run").mkdir()
    now = [1000.0]
    monkeypatch.setattr(memstore.time, "monotonic", lambda: now[0])
    events: list[dict] = []
    store = MemoryStore(tmp_path / "run", enabled=True, on_event=events.append, event_every=10.0)
    model, opt = trained(2)
    for step in (2, 3, 4):
        assert store.save(step, model, opt, None, {}, {})
        now[0] += 4.0
    assert store.save(5, model, opt, None, {}, {})  # 12 s after the first event
    assert [(e["step"], e["snapshots"]) for e in events] == [(2, 1), (5, 3)]


def test_a_tensor_that_is_not_contiguous_is_committed_bitwise(store: MemoryStore) -> None:
    # Contiguous tensors are copied as bytes; one that is not takes torch's copy, for all.
    from safetensors.torch import load_file

    model, opt = trained(2)
    model.norm.register_buffer("odd", torch.arange(12.0).reshape(3, 4).t())
    assert not model.norm.odd.is_contiguous()
    for step in (3, 4):
        train(model, opt, step - 1, step)
        with torch.no_grad():
            model.norm.odd.add_(step)  # in place: the walk is reused
        assert store.save(step, model, opt, None, {"step": step}, {})
    slot = memory_slots(store.run_dir)[0][1]
    stored = load_file(str(slot / "model.safetensors"))
    assert torch.equal(stored["norm.odd"], model.norm.odd)
    assert torch.equal(stored["up.weight"], model.up.weight.detach())


def test_a_plain_optimizer_value_that_changes_type_makes_a_new_walk() -> None:
    model, opt = trained(2)
    entry = next(iter(opt.state.values()))
    entry["count"] = 1
    plan = LivePlan()
    first = plan.capture(2, model, opt, None, {}, {})
    entry["count"] = 1.0  # equal to 1, but not the same JSON
    second = plan.capture(3, model, opt, None, {}, {})
    assert second.model_tensors is not first.model_tensors
    _same_as_a_full_walk(second, model, opt)
