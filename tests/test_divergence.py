"""Divergence, with real trainer processes: a step whose loss or gradient norm is not finite is
not applied and stops the run (trainer exit 74, launcher exit 12, a ``diverged`` event naming the
step) with every checkpoint before it intact and none after it; ``--on-divergence
rollback-skip:N`` goes back to the newest valid checkpoint, skips data, records exactly which,
and ends where a second run of the same configuration ends."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from runcontract import exit_codes
from runcontract.env import DIVERGE_AT_STEP
from runcontract.events import read_jsonl
from runcontract.exit_codes import TrainerExit
from tests.conftest import REPO_ROOT, TINY_ARGS, final_sha, read_metrics, train_command
from tests.scripts.harness import FAST, Launched
from tests.test_train import in_process_trainer, sample_log
from trainer.checkpoint import params_sha256, verify
from trainer.sampler import ResumableSampler

# Two ranks of four sequences: a global batch of 8 sampler positions.
GLOBAL_BATCH = 8
LAUNCH_TIMEOUT = 300.0


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(p.name[5:]): p for p in (run_dir / "checkpoints").glob("step-*")}


def _trainer_events(run_dir: Path, type_: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == type_]


def _supervised(run_dir: Path, env: dict[str, str], args: list[str], expect: int) -> Launched:
    """launch.py with two ranks of the built-in trainer, to its end; fails unless it exits
    ``expect``."""
    run = Launched(run_dir, ["--nproc", "2", *FAST, "--", *args], env=env)
    try:
        assert run.wait(LAUNCH_TIMEOUT) == expect, run.stderr[-3000:]
    finally:
        run.kill_all()
    return run


def test_a_diverged_step_is_not_applied_and_the_trainer_stops_with_74(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DIVERGE_AT_STEP, "7")
    trainer = in_process_trainer(data_cache, tmp_path, "--steps", "10", "--ckpt-every", "3")
    try:
        assert trainer.run() == TrainerExit.DIVERGED
        assert trainer.step == 6 and trainer.host_reads.count == 7  # one read per step, still
        # Step 7's update never reached the weights: they are those of the checkpoint of step 6.
        manifest = verify(_checkpoints(tmp_path)[6])
        assert params_sha256(trainer.model) == manifest["params_sha256"]
    finally:
        trainer.close()
    assert sorted(_checkpoints(tmp_path)) == [3, 6]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))


def test_rollbacks_without_a_checkpoint_restart_from_the_initial_weights_and_give_up(
    tmp_path: Path, data_cache: Path
) -> None:
    # With --lr 1e30 step 2 diverges whatever the data: each rollback goes back to the initial
    # weights (no checkpoint yet) and skips one batch more; the fourth divergence stops the run.
    trainer = in_process_trainer(
        data_cache, tmp_path, "--lr", "1e30", "--ckpt-every", "0", "--on-divergence",
        "rollback-skip:1",
    )  # fmt: skip
    initial = params_sha256(trainer.model)
    try:
        assert trainer.run() == TrainerExit.DIVERGED
        assert trainer.rollbacks == {0: 3} and trainer.step == 1
        assert trainer.skipped == ((0, 3 * 4),)  # the third rollback skipped 3 batches of 4
        assert trainer.position == 3 * 4 + 4
        trainer._reset_to_start()
        assert params_sha256(trainer.model) == initial
    finally:
        trainer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # cut back at every rollback
    assert not _checkpoints(tmp_path)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_lr_1e30_under_launch_exits_12_and_keeps_the_finite_checkpoint(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    train_args = [*TINY_ARGS, "--steps", "40", "--lr", "1e30"]
    train_args += ["--ckpt-every", "1", "--keep-last", "1"]
    run = _supervised(run_dir, train_env, train_args, exit_codes.DIVERGED)
    assert "the training diverged" in run.stderr and "diverged at step 2" in run.stderr
    (diverged,) = _trainer_events(run_dir, "diverged")
    assert diverged["source"] == "trainer" and diverged["step"] == 2
    assert diverged["loss"] == "nan" and diverged["action"] == "stop"
    fatal = _trainer_events(run_dir, "fatal")[-1]
    assert fatal["exit_code"] == TrainerExit.DIVERGED and fatal["step"] == 2
    assert len(_trainer_events(run_dir, "launch")) == 1  # no restart
    # Step 1 (huge, finite weights) is the newest finite state: committed, kept by retention.
    assert sorted(_checkpoints(run_dir)) == [1]
    assert [e["step"] for e in _trainer_events(run_dir, "checkpoint_saved")] == [1]
    manifest = verify(_checkpoints(run_dir)[1])
    assert manifest["finite"] is True
    weights = load_file(_checkpoints(run_dir)[1] / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values())
    assert max(t.abs().max().item() for t in weights.values()) > 1e20  # the lr was applied
    assert "diverged:    1 time(s): step 2 (stop)" in (run_dir / "report.txt").read_text()


ROLLBACK_ARGS = [*TINY_ARGS, "--steps", "20", "--ckpt-every", "5"]
ROLLBACK_ARGS += ["--on-divergence", "rollback-skip:2", "--keep-last", "10"]


def _expected_samples(num_samples: int, skipped: tuple[int, int]) -> dict:
    """(rank, step, micro) -> sample ids of a 20-step run that skipped positions ``skipped``."""
    start, end = skipped
    expected = {}
    for rank in range(2):
        sampler = ResumableSampler(num_samples, seed=1337, world_size=2, rank=rank, micro_batch=4)
        for step in range(20):
            position = step * GLOBAL_BATCH
            if position >= start:
                position += end - start
            expected[(rank, step, 0)] = sampler.micro_batch_ids(position, 0)
    return expected


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rollback_skips_data_records_it_and_is_reproducible(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    # Rank 1's loss is NaN on the data of step 13 (positions 96..103). The newest checkpoint is
    # step 10 (position 80): skipping 2 batches (80..95) still reaches that data, at step 11; the
    # second rollback to step 10 skips 4 (80..111), and the run goes on past it.
    env = {**train_env, DIVERGE_AT_STEP: "13:1"}
    run_dir = tmp_path / "supervised"
    args = [*ROLLBACK_ARGS, "--sample-log", str(run_dir / "samples")]
    _supervised(run_dir, env, args, exit_codes.SUCCESS)
    diverged = _trainer_events(run_dir, "diverged")
    assert [(e["step"], e["rank"], e["action"]) for e in diverged] == [
        (13, 1, "rollback"),
        (11, 1, "rollback"),
    ]
    skips = _trainer_events(run_dir, "data_skipped")
    assert [(e["step"], e["ranges"], e["batches"]) for e in skips] == [
        (10, [[80, 96]], 2),
        (10, [[80, 112]], 4),
    ]
    assert len(_trainer_events(run_dir, "launch")) == 1  # the trainer rolled back by itself
    final = verify(_checkpoints(run_dir)[20])
    state = final["train_state"]
    assert state["skipped"] == [[80, 112]] and state["position"] == 20 * GLOBAL_BATCH + 32
    assert final["tokens_seen"] == 20 * GLOBAL_BATCH * 32  # skipped samples are not seen
    # Every step trained on exactly the samples of its shifted position, once.
    expected = _expected_samples(state["num_samples"], (80, 112))
    assert sample_log(run_dir) == expected
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 21))
    report = (run_dir / "report.txt").read_text()
    assert "diverged:    2 time(s): step 13 (rollback), step 11 (rollback)" in report
    assert "skipped:     32 sample(s) never trained on: positions [80, 112)" in report

    # The same configuration again, unsupervised: the same rollbacks, the same parameters.
    again_dir = tmp_path / "again"
    proc = subprocess.run(
        train_command([*ROLLBACK_ARGS, "--run-dir", str(again_dir)], nproc=2),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert final_sha(proc.stdout) == final["params_sha256"]
    assert json.loads((_checkpoints(again_dir)[20] / "manifest.json").read_text())["train_state"][
        "skipped"
    ] == [[80, 112]]
