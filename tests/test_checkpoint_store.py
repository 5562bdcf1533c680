"""CheckpointStore, verify, find_latest_valid and load: the contract the trainer relies on."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from tests.scripts.ckpt_model import TinyLM, assert_same_state, fresh, train, trained
from trainer.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointIncompatible,
    CheckpointStore,
    find_latest_valid,
    list_checkpoints,
    load,
    params_sha256,
    verify,
)
from trainer.checkpoint.layout import MODEL_FILE, STATE_FILE
from trainer.checkpoint.loader import _load_optimizer

META = {"tokens_seen": 96, "config": {"model": {"dim": 16}, "train": {"lr": 0.01}}, "world_size": 1}


@pytest.mark.parametrize("async_save", [True, False])
def test_save_then_load_restores_bitwise(tmp_path, async_save):
    model, opt = trained(3)
    events = []
    with CheckpointStore(
        tmp_path, is_writer=True, async_save=async_save, on_event=events.append
    ) as store:
        store.save(3, model, opt, None, {"sampler": {"pos": 12}, "cursor": 3}, META)
    path = find_latest_valid(tmp_path)
    assert path == tmp_path / "checkpoints" / "step-00000003"
    assert [e["type"] for e in events] == ["checkpoint_saved"]
    assert events[0]["path"] == str(path) and events[0]["bytes"] > 0

    model2, opt2 = fresh(seed=1)
    manifest = load(path, model2, opt2)
    assert_same_state(model, model2, opt, opt2)
    assert model2.head.weight is model2.emb.weight  # tying survives the load
    assert manifest["train_state"] == {"sampler": {"pos": 12}, "cursor": 3}
    for key in ("tokens_seen", "config", "world_size"):
        assert manifest[key] == META[key]
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["torch_version"] == torch.__version__
    assert manifest["params_sha256"] == params_sha256(model)
    assert set(manifest["files"]) >= {MODEL_FILE, "state.json", "optimizer.safetensors"}


def test_async_save_copies_state_before_returning(tmp_path):
    """Training on right after save() must not leak into the checkpoint being written."""
    model, opt = trained(2)
    expected_model, expected_opt = trained(2)
    with CheckpointStore(tmp_path, is_writer=True) as store:
        store.save(2, model, opt, None, {}, {})
        train(model, opt, 2, 5)  # mutates parameters and optimizer state in place
    model2, opt2 = fresh(seed=3)
    load(find_latest_valid(tmp_path), model2, opt2)
    assert_same_state(expected_model, model2, expected_opt, opt2)


def test_ddp_prefix_is_stripped_and_sha_matches(tmp_path):
    model, opt = trained(1)

    class Wrapper(torch.nn.Module):  # same shape as DDP: the real module under `.module`
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = Wrapper(model)
    assert params_sha256(wrapped) == params_sha256(model)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(1, wrapped, opt, None, {}, {})
    path = find_latest_valid(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path / MODEL_FILE), "pt") as f:
        assert not any(k.startswith("module.") for k in f.keys())
    model2, opt2 = fresh(seed=5)
    load(path, Wrapper(model2), opt2)
    assert_same_state(model, model2, opt, opt2)


def test_grad_scaler_state_round_trips(tmp_path):
    model, opt = trained(1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(1, model, opt, scaler, {}, {})
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    load(find_latest_valid(tmp_path), fresh()[0], None, scaler2)
    assert scaler2.state_dict() == scaler.state_dict()


def test_disabled_grad_scaler_passes_through_and_stores_nothing(tmp_path):
    # The trainer always steps through a scaler, enabled only under --amp fp16.
    model, opt = trained(1)
    plain_model, plain_opt = trained(1)
    train(plain_model, plain_opt, 1, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1002))  # train()'s
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    scaled = scaler.scale(loss)
    assert scaled is loss
    scaled.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    scaler.step(opt)
    scaler.update()
    model.seen += 1
    assert_same_state(model, plain_model, opt, plain_opt)  # bitwise a plain optimizer step

    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(2, model, opt, scaler, {}, {})
    path = find_latest_valid(tmp_path)
    # Stored as no scaler at all: the same state.json as a checkpoint saved without one.
    assert json.loads((path / STATE_FILE).read_text())["scaler"] is None
    model2, opt2 = fresh(seed=5)
    load(path, model2, opt2, torch.amp.GradScaler("cpu", enabled=False))
    assert_same_state(model, model2, opt2, opt)
    # Such a checkpoint leaves an enabled scaler as it was, and an enabled scaler's checkpoint
    # leaves a disabled one disabled.
    enabled = torch.amp.GradScaler("cpu", init_scale=8.0)
    load(path, fresh()[0], None, enabled)
    assert enabled.state_dict()["scale"] == 8.0
    with CheckpointStore(tmp_path / "fp16", is_writer=True, async_save=False) as store:
        store.save(2, model, opt, enabled, {}, {})
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load(find_latest_valid(tmp_path / "fp16"), fresh()[0], None, disabled)
    assert not disabled.is_enabled() and disabled.state_dict() == {}


def test_optimizer_state_is_read_to_the_host_and_placed_by_the_optimizer(tmp_path):
    model, opt = trained(2)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(2, model, opt, None, {}, {})
    path = find_latest_valid(tmp_path)
    # Parameters on a device other than the host. The meta device holds no data, so only the
    # optimizer half of the loader can run there; on CUDA this is a resumed run's whole load.
    with torch.device("meta"):
        meta_model = TinyLM()
    meta_opt = torch.optim.AdamW(meta_model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    saved_state = json.loads((path / STATE_FILE).read_text())
    _load_optimizer(path, verify(path), saved_state, meta_opt, None)
    params = list(meta_model.parameters())
    assert len(meta_opt.state) == len(params)
    for p in params:
        state = meta_opt.state[p]
        assert state["exp_avg"].device == state["exp_avg_sq"].device == p.device
        # As in a fresh AdamW: a host tensor, read every step without waiting for the device.
        assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32
        assert state["step"].item() == 2.0


def test_non_writer_touches_nothing(tmp_path):
    model, opt = trained(1)
    store = CheckpointStore(tmp_path / "run", is_writer=False)
    store.save(1, model, opt, None, {}, {})
    store.wait()
    store.close()
    assert not (tmp_path / "run").exists()


def test_at_most_one_save_in_flight(tmp_path, monkeypatch):
    """The second save() waits until the first has committed."""
    from trainer.checkpoint import store as store_mod

    release = threading.Event()
    real_write = store_mod.write_checkpoint
    order = []

    def slow_write(ckpt_dir, snap):
        order.append(("start", snap.step))
        if snap.step == 1:
            release.wait(10)
        out = real_write(ckpt_dir, snap)
        order.append(("end", snap.step))
        return out

    monkeypatch.setattr(store_mod, "write_checkpoint", slow_write)
    model, opt = trained(1)
    store = CheckpointStore(tmp_path, is_writer=True)
    store.save(1, model, opt, None, {}, {})
    assert store.in_flight
    t = threading.Thread(target=store.save, args=(2, model, opt, None, {}, {}))
    t.start()
    t.join(0.3)
    assert t.is_alive(), "second save() returned while the first was still writing"
    release.set()
    t.join(10)
    store.close()
    assert order == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]


def test_json_state_is_required(tmp_path):
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True) as store:
        with pytest.raises(ValueError, match="train_state"):
            store.save(1, model, opt, None, {"bad": object()}, {})
        with pytest.raises(ValueError, match="manifest's own fields"):
            store.save(1, model, opt, None, {}, {"files": 1})
    assert find_latest_valid(tmp_path) is None


def test_save_after_close_is_an_error(tmp_path):
    model, opt = trained(1)
    store = CheckpointStore(tmp_path, is_writer=True)
    store.close()
    store.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        store.save(1, model, opt, None, {}, {})


def test_shape_mismatch_names_the_tensors(tmp_path):
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(1, model, opt, None, {}, {})
    bigger, bigger_opt = fresh(dim=16, hidden=48)
    with pytest.raises(CheckpointIncompatible) as err:
        load(find_latest_valid(tmp_path), bigger, bigger_opt)
    msg = str(err.value)
    assert "up.weight" in msg and "down.weight" in msg and "(32, 16)" in msg and "(48, 16)" in msg


def test_newer_format_version_says_which_is_needed(tmp_path):
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(1, model, opt, None, {}, {})
    path = find_latest_valid(tmp_path)
    _rewrite_manifest(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointIncompatible, match=f"format {FORMAT_VERSION + 1} is needed"):
        verify(path)
    with pytest.raises(CheckpointIncompatible):
        load(path, fresh()[0])
    events = []
    assert find_latest_valid(tmp_path, on_event=events.append) is None
    assert path.exists(), "a newer-format checkpoint is skipped, never quarantined"
    assert events[0]["type"] == "checkpoint_skipped"


def test_same_step_twice_keeps_the_valid_one(tmp_path):
    model, opt = trained(1)
    events = []
    with CheckpointStore(
        tmp_path, is_writer=True, async_save=False, on_event=events.append
    ) as store:
        store.save(1, model, opt, None, {"n": 1}, {})
        store.save(1, model, opt, None, {"n": 2}, {})
    assert [e["type"] for e in events] == ["checkpoint_saved", "checkpoint_exists"]
    assert verify(find_latest_valid(tmp_path))["train_state"] == {"n": 1}


def test_list_checkpoints_reports_validity_without_side_effects(tmp_path):
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        for step in (1, 2):
            store.save(step, model, opt, None, {}, {})
    (tmp_path / "checkpoints" / "step-00000002" / MODEL_FILE).unlink()
    rows = list_checkpoints(tmp_path)
    assert [(r.step, r.valid) for r in rows] == [(2, False), (1, True)]
    assert rows[0].reason == f"missing file {MODEL_FILE}"
    assert rows[1].size > 0
    assert (tmp_path / "checkpoints" / "step-00000002").exists()


def _rewrite_manifest(path, **changes):
    """Edit manifest fields and re-seal its self-hash, as a newer writer would have written it."""
    from trainer.checkpoint import manifest as mf

    man = json.loads((path / "manifest.json").read_text())
    man.update(changes)
    man.pop("manifest_sha256")
    import hashlib

    man["manifest_sha256"] = hashlib.sha256(mf._canonical(man)).hexdigest()
    (path / "manifest.json").write_bytes(mf.to_bytes(man))


def test_a_periodic_save_is_skipped_not_waited_for_while_the_previous_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer is held inside its first write (a slow disk); the next save with
    # skip_if_busy returns at once, says so, and commits nothing; the held write still lands.
    events: list[dict] = []
    model, opt = fresh()
    store = CheckpointStore(tmp_path, is_writer=True, async_save=True, on_event=events.append)
    release = threading.Event()
    real_write = store._write

    def slow_write(snap):  # type: ignore[no-untyped-def]
        release.wait(30)
        real_write(snap)

    monkeypatch.setattr(store, "_write", slow_write)
    try:
        assert store.save(1, model, opt, None, {"step": 1}, {}) is True
        assert store.save(2, model, opt, None, {"step": 2}, {}, skip_if_busy=True) is False
        (skipped,) = [e for e in events if e["type"] == "checkpoint_save_skipped"]
        assert (skipped["step"], skipped["writing"]) == (2, 1)
        release.set()
        store.wait()
        assert [c.step for c in list_checkpoints(tmp_path)] == [1]
        assert store.save(3, model, opt, None, {"step": 3}, {}, skip_if_busy=True) is True
        store.wait()
        assert [c.step for c in list_checkpoints(tmp_path)] == [3, 1]
    finally:
        release.set()
        store.close()
