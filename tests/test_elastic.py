"""Elastic world size: a 2-rank run's checkpoint resumed on 1 rank keeps the global batch
(gradient accumulation doubles), continues the same global data order with no sample skipped or
repeated, and the loss continues without a jump. A global batch that the new world cannot make
evenly is refused with a clear error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_ARGS

STEPS = 8
CKPT = 4
# Dropout off: the resumed step then sees the same parameters and samples as the 2-rank run,
# so its loss differs only by the order of the floating-point reduction.
ARGS = [*TINY_ARGS, "--steps", str(STEPS), "--ckpt-every", str(CKPT), "--ckpt-sync",
        "--dropout", "0", "--seed", "3"]  # fmt: skip


def _samples(log_dir: Path) -> dict[int, list[int]]:
    """Sample ids consumed at each step, all ranks and micro-steps in global position order."""
    records = []
    for path in log_dir.glob("rank-*.jsonl"):
        rank = int(path.stem[5:])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            records.append((rec["step"], rec["micro"], rank, rec["ids"]))
    per_step: dict[int, list[int]] = {}
    for step, _micro, _rank, ids in sorted(records):
        per_step.setdefault(step, []).extend(ids)
    return per_step


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_rank_checkpoint_resumed_on_one_rank_keeps_batch_and_order(
    tmp_path: Path, run_train: Callable, data_cache: Path
) -> None:
    two = tmp_path / "two"
    done = run_train([*ARGS, "--run-dir", str(two), "--sample-log", str(tmp_path / "s2")], 2)
    assert done.returncode == 0, done.stderr
    checkpoint = two / "checkpoints" / f"step-{CKPT:08d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    global_batch = manifest["train_state"]["global_batch"]
    assert global_batch == 2 * 4  # 2 ranks x --micro-batch 4 x --grad-accum 1

    one = tmp_path / "one"
    resumed = run_train(
        [
            *ARGS,
            "--run-dir",
            str(one),
            "--resume-from",
            str(checkpoint),
            "--sample-log",
            str(tmp_path / "s1"),
        ]  # fmt: skip
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "grad_accum 2" in resumed.stdout, resumed.stdout

    # The same global batch: one rank now takes two micro-steps of 4 per optimizer step.
    final = json.loads((one / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json").read_text())
    assert final["world_size"] == 1
    assert final["train_state"]["global_batch"] == global_batch
    assert final["train_state"]["position"] == STEPS * global_batch

    # The same global order: the 2-rank run's first CKPT steps, then the 1-rank run's steps,
    # consume exactly what the uninterrupted 2-rank run consumed, step by step.
    reference, after = _samples(tmp_path / "s2"), _samples(tmp_path / "s1")
    assert sorted(after) == list(range(CKPT, STEPS)), "the 1-rank run redid or skipped a step"
    elastic = {**{s: ids for s, ids in reference.items() if s < CKPT}, **after}
    assert all(len(ids) == global_batch for ids in elastic.values())
    assert elastic == reference
    consumed = [i for s in sorted(elastic) for i in elastic[s]]
    assert len(consumed) == len(set(consumed)), "a sample was consumed twice"

    # The loss continues without a jump: the first resumed step sees the same parameters and
    # samples; later steps drift only by floating-point reduction order.
    loss_two, loss_one = _losses(two), _losses(one)
    assert sorted(loss_one) == list(range(CKPT + 1, STEPS + 1))
    assert loss_one[CKPT + 1] == pytest.approx(loss_two[CKPT + 1], rel=1e-4)
    for step in range(CKPT + 1, STEPS + 1):
        assert loss_one[step] == pytest.approx(loss_two[step], rel=1e-2), step

    # A global batch of 8 cannot be made from micro-batches of 3: refused with a clear error
    # (the entry point turns it into one line and exit 2). In-process: no third start-up.
    from trainer.config import parse_args
    from trainer.data import load_corpus
    from trainer.preemption import Preemption
    from trainer.train import Dist, Trainer, UsageError

    cfg = parse_args([*ARGS, "--micro-batch", "3", "--data-cache", str(data_cache)])
    corpus = load_corpus(cfg.data, cache_dir=cfg.data_cache_dir(), vocab_size=cfg.vocab_size,
                         val_fraction=cfg.val_fraction, seq_len=cfg.seq_len)  # fmt: skip
    with pytest.raises(UsageError, match=r"global batch of 8 .* --micro-batch 3"):
        Trainer(cfg, corpus, tmp_path / "bad", checkpoint, Dist(), torch.device("cpu"),
                Preemption())  # fmt: skip
