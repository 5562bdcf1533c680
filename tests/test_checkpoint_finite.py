"""Non-finite weights never become a valid checkpoint: the store records ``finite`` and refuses to
commit a snapshot holding NaN or infinity, ``verify`` refuses ``finite: false``, ``load`` refuses
non-finite tensors whatever the manifest says, and retention keeps the newest finite checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts.ckpt_model import fresh, trained
from tests.scripts.ckpt_tamper import replace_tensors, reseal, two_checkpoints
from trainer.checkpoint import (
    CheckpointStore,
    CheckpointUnloadable,
    RetentionPolicy,
    find_latest_valid,
    load,
    verify,
)
from trainer.checkpoint.layout import MANIFEST, MODEL_FILE, OPTIM_FILE
from trainer.checkpoint.retention import free_space, prune

ROOT = Path(__file__).resolve().parent.parent


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


def _manifest(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / MANIFEST).read_text())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where", ["parameter", "optimizer"])
def test_a_nonfinite_snapshot_is_refused_and_the_finite_one_kept(
    tmp_path: Path, async_save: bool, where: str
) -> None:
    model, opt = trained(2)
    events: list[dict] = []
    with CheckpointStore(
        tmp_path, is_writer=True, keep_last=1, async_save=async_save, on_event=events.append
    ) as store:
        store.save(1, model, opt, None, {"step": 1}, {})
        with torch.no_grad():
            if where == "parameter":
                model.up.weight[3, 4] = float("nan")
            else:
                next(iter(opt.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
        store.save(2, model, opt, None, {"step": 2}, {})
    assert _steps(tmp_path) == [1]  # not committed, and retention (keep_last 1) pruned nothing
    assert _manifest(tmp_path, 1)["finite"] is True
    refused = [e for e in events if e["type"] == "checkpoint_not_finite"]
    assert [e["step"] for e in refused] == [2]
    expected = "up.weight" if where == "parameter" else "optim.state.0.exp_avg_sq"
    assert refused[0]["tensors"] == [expected]
    assert [e["step"] for e in events if e["type"] == "checkpoint_saved"] == [1]
    assert not [e for e in events if e["type"] == "checkpoint_pruned"]
    assert find_latest_valid(tmp_path).name == "step-00000001"


def test_a_buffer_may_hold_infinity(tmp_path: Path) -> None:
    # A causal mask of -inf is a buffer by design, not a diverged weight.
    model, opt = trained(1)
    model.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(1, model, opt, None, {}, {})
    assert _manifest(tmp_path, 1)["finite"] is True
    again, opt_again = fresh()
    again.register_buffer("mask", torch.zeros(2, 2))
    load(tmp_path / "checkpoints" / "step-00000001", again, opt_again)
    assert torch.equal(again.mask, model.mask)


def test_verify_cli_refuses_a_checkpoint_resealed_as_not_finite(tmp_path: Path) -> None:
    newest = two_checkpoints(tmp_path)
    reseal(newest, lambda man: man.update(finite=False))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.checkpoint", "verify", str(newest)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "records tensors holding NaN or infinity" in proc.stdout + proc.stderr


def test_a_manifest_from_before_the_field_stays_valid(tmp_path: Path) -> None:
    newest = two_checkpoints(tmp_path)
    reseal(newest, lambda man: man.pop("finite"))
    assert "finite" not in verify(newest)
    model, opt = fresh()
    load(newest, model, opt)
    assert find_latest_valid(tmp_path) == newest


@pytest.mark.parametrize("manifest_field", ["recorded", "absent"])
@pytest.mark.parametrize("name", [MODEL_FILE, OPTIM_FILE])
def test_load_refuses_nonfinite_tensors_whatever_the_manifest_says(
    tmp_path: Path, name: str, manifest_field: str
) -> None:
    newest = two_checkpoints(tmp_path)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        key = "up.weight" if name == MODEL_FILE else next(k for k in tensors if "exp_avg" in k)
        tensors[key].view(-1)[0] = float("nan")

    replace_tensors(newest, name, poison)
    if manifest_field == "absent":
        reseal(newest, lambda man: man.pop("finite"))
    verify(newest)  # every hash matches, and the manifest does not say otherwise
    with pytest.raises(CheckpointUnloadable, match="hold NaN or infinity"):
        load(newest, *fresh())


def test_retention_never_prunes_the_newest_finite_checkpoint(tmp_path: Path) -> None:
    newest = two_checkpoints(tmp_path)
    reseal(newest, lambda man: man.update(finite=False))
    policy = RetentionPolicy(keep_last=1)
    assert prune(tmp_path / "checkpoints", policy) == []
    assert free_space(tmp_path / "checkpoints", policy, need=1 << 60) == []
    assert _steps(tmp_path) == [1, 2]
    verify(tmp_path / "checkpoints" / "step-00000001")
