"""save_checkpoint / load_checkpoint: the seed article's two functions, the store behind them."""

from __future__ import annotations

import pytest
import torch

from tests.scripts.ckpt_model import assert_same_state, fresh, train, trained
from trainer.checkpoint import (
    CheckpointLocked,
    CheckpointStore,
    api,
    find_latest_valid,
    load_checkpoint,
    save_checkpoint,
    verify,
    wait_checkpoints,
)


@pytest.fixture(autouse=True)
def _close_stores():
    yield
    api._close_all()  # release writer locks between tests, as process exit would


def test_round_trip_through_a_run_directory(tmp_path):
    model, opt = fresh()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for step in (1, 2, 3):
        train(model, opt, step - 1, step)
        path = save_checkpoint(tmp_path, model, opt, step, scaler, extra={"epoch": 0, "seen": step})
        assert path == tmp_path / "checkpoints" / f"step-{step:08d}"
        verify(path)
    model2, opt2 = fresh(seed=4)
    scaler2 = torch.amp.GradScaler("cpu")
    step, extra = load_checkpoint(tmp_path, model2, opt2, scaler2)
    assert (step, extra) == (3, {"epoch": 0, "seen": 3})
    assert_same_state(model, model2, opt, opt2)
    assert scaler2.state_dict() == scaler.state_dict()
    # One checkpoint directory works too.
    step, extra = load_checkpoint(tmp_path / "checkpoints" / "step-00000002", fresh()[0])
    assert (step, extra) == (2, {"epoch": 0, "seen": 2})


def test_async_save_is_awaited_before_load(tmp_path):
    model, opt = trained(2)
    assert save_checkpoint(tmp_path, model, opt, 2, async_save=True) is None
    model2, opt2 = fresh(seed=4)
    assert load_checkpoint(tmp_path, model2, opt2) == (2, None)
    assert_same_state(model, model2, opt, opt2)
    wait_checkpoints()


def test_keep_last_applies(tmp_path):
    model, opt = trained(1)
    for step in range(1, 5):
        save_checkpoint(tmp_path, model, opt, step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-00000003",
        "step-00000004",
    ]


def test_no_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        load_checkpoint(tmp_path, fresh()[0])


def test_a_second_writer_in_the_same_directory_is_refused(tmp_path):
    model, opt = trained(1)
    save_checkpoint(tmp_path, model, opt, 1)
    with pytest.raises(CheckpointLocked):
        CheckpointStore(tmp_path, is_writer=True)


def test_legacy_torch_save_file_loads_safely(tmp_path):
    """A seed-style single file (torch.save of plain tensors and containers) still loads."""
    model, opt = trained(2)
    old = tmp_path / "minigpt_single.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2, "extra": {"a": 1}},
        old,
    )
    model2, opt2 = fresh(seed=9)
    assert load_checkpoint(old, model2, opt2) == (2, {"a": 1})
    assert_same_state(model, model2, opt, opt2)
    assert find_latest_valid(tmp_path) is None


def test_extra_must_be_json(tmp_path):
    model, opt = trained(1)
    with pytest.raises(ValueError, match="extra must be JSON"):
        save_checkpoint(tmp_path, model, opt, 1, extra={"t": torch.zeros(1)})
