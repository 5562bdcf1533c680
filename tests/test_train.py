"""The trainer end to end, as real processes: training, exact resume, preemption, exit codes."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import free_port
from runcontract.events import read_jsonl
from runcontract.exit_codes import TrainerExit
from tests.conftest import (
    REPO_ROOT,
    TINY_ARGS,
    final_sha,
    kill_tree,
    read_metrics,
    train_command,
    wait_for_step,
)
from tests.scripts.ckpt_tamper import replace_tensors
from trainer.checkpoint import (
    CheckpointUnloadable,
    find_latest_valid,
    list_checkpoints,
)
from trainer.checkpoint.lock import WriterLock
from trainer.train import Trainer

PER_RANK_ARGS = REPO_ROOT / "tests" / "scripts" / "per_rank_args.py"

STEPS = 40
# One rank: dropout and bf16 autocast on CPU, so exactness covers both.
ARGS_1 = [*TINY_ARGS, "--steps", str(STEPS), "--dropout", "0.1", "--amp", "bf16"]
# Two ranks: dropout and gradient accumulation (no_sync on the first micro-step).
ARGS_2 = [*TINY_ARGS, "--steps", str(STEPS), "--dropout", "0.1", "--grad-accum", "2"]


def run_args(base: list[str], run_dir: Path, *extra: str) -> list[str]:
    return [*base, "--run-dir", str(run_dir), "--sample-log", str(run_dir / "samples"), *extra]


def sample_log(run_dir: Path) -> dict[tuple[int, int, int], list[int]]:
    """(rank, step, micro) -> sample ids. A step logged twice (redone after a crash) keeps its
    last record: that is the one whose gradients reached the final parameters."""
    consumed: dict[tuple[int, int, int], list[int]] = {}
    for path in sorted((run_dir / "samples").glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            consumed[(rank, rec["step"], rec["micro"])] = rec["ids"]
    return consumed


def raw_sample_records(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((run_dir / "samples").glob("rank-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


class Baseline:
    def __init__(self, run_dir: Path, proc: subprocess.CompletedProcess) -> None:
        assert proc.returncode == 0, proc.stderr
        self.run_dir = run_dir
        self.stdout = proc.stdout
        self.sha = final_sha(proc.stdout)
        self.samples = sample_log(run_dir)


@pytest.fixture(scope="module")
def baseline_1(tmp_path_factory: pytest.TempPathFactory, run_train: Callable) -> Baseline:
    """The uninterrupted single-process run every resumed one must reproduce."""
    run_dir = tmp_path_factory.mktemp("baseline-1")
    args = run_args(ARGS_1, run_dir, "--ckpt-every", "10", "--eval-every", "20")
    return Baseline(run_dir, run_train(args))


@pytest.fixture(scope="module")
def baseline_2(tmp_path_factory: pytest.TempPathFactory, run_train: Callable) -> Baseline:
    """The uninterrupted 2-rank run every resumed one must reproduce."""
    run_dir = tmp_path_factory.mktemp("baseline-2")
    return Baseline(run_dir, run_train(run_args(ARGS_2, run_dir, "--ckpt-every", "10"), nproc=2))


def assert_same_samples_as(baseline: Baseline, run_dir: Path, world_size: int, accum: int) -> None:
    """Every (rank, step, micro-step) of the run consumed exactly the baseline's samples: none
    skipped, none repeated, none out of order."""
    got = sample_log(run_dir)
    expected_keys = {
        (r, s, m) for r in range(world_size) for s in range(STEPS) for m in range(accum)
    }
    assert set(got) == expected_keys
    assert got == baseline.samples
    ids = [i for key in sorted(got) for i in got[key]]
    assert len(ids) == len(set(ids)), "a sample was consumed twice"


def assert_metrics_once_per_step(run_dir: Path) -> None:
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


# -- training --------------------------------------------------------------------------------


def test_single_process_trains_and_loss_falls(baseline_1: Baseline) -> None:
    records = read_metrics(baseline_1.run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "time"):
        assert all(isinstance(r[key], float) for r in train), key
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert [r["step"] for r in records if "eval_loss" in r] == [20, 40]
    assert list_checkpoints(baseline_1.run_dir)[0].step == STEPS  # newest first
    # Not supervised: no heartbeats are written.
    assert not (baseline_1.run_dir / "heartbeats").exists()
    # One device-to-host read per optimizer step and one per eval.
    assert f"done step=40 loss={train[-1]['loss']:.4f} host_reads=42 " in baseline_1.stdout


@pytest.mark.timeout(900)
def test_deterministic_flag_changes_no_bit_on_cpu(tmp_path: Path, run_train: Callable) -> None:
    # --deterministic pins CUDA kernels; on CPU the run must stay the one it always was, so
    # checkpoints of either kind resume each other. No dropout: with it CPU attention takes the
    # math kernel anyway, and the fused kernel the flag must leave alone would go untested.
    args = [*TINY_ARGS, "--steps", "10", "--amp", "bf16", "--ckpt-every", "0"]
    plain = run_train([*args, "--run-dir", str(tmp_path / "plain")])
    pinned = run_train([*args, "--run-dir", str(tmp_path / "pinned"), "--deterministic"])
    assert plain.returncode == pinned.returncode == 0, plain.stderr + pinned.stderr
    assert final_sha(pinned.stdout) == final_sha(plain.stdout)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_ranks_train_on_disjoint_samples(baseline_2: Baseline) -> None:
    train = [r for r in read_metrics(baseline_2.run_dir) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    ids = [i for ids in baseline_2.samples.values() for i in ids]
    assert len(ids) == len(set(ids)) == STEPS * 2 * 2 * 4  # steps x ranks x accum x micro-batch
    manifest = json.loads((find_latest_valid(baseline_2.run_dir) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["params_sha256"] == baseline_2.sha
    # Loss, gradient norm and the preemption vote of a step: one all-reduce, one host read.
    assert f" host_reads={STEPS} " in baseline_2.stdout


# -- exact resume after a crash ----------------------------------------------------------------


def crash_and_resume(
    base: list[str], nproc: int, tmp_path: Path, start_train: Callable, run_train: Callable
) -> tuple[Path, int, subprocess.CompletedProcess]:
    """Kill the whole run (SIGKILL, no warning) at a random step, then resume it."""
    run_dir = tmp_path / "run"
    kill_at = random.randint(3, STEPS // 2)
    proc = start_train(run_args(base, run_dir, "--ckpt-every", "3"), nproc=nproc)
    wait_for_step(run_dir, kill_at, proc)
    # A crash before the first commit would only test a fresh start: wait for one checkpoint.
    while not any(c.valid for c in list_checkpoints(run_dir)):
        assert proc.poll() is None, "the run ended before its first checkpoint was committed"
        time.sleep(0.01)
    kill_tree(proc, signal.SIGKILL)
    reached = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert reached < STEPS, f"the run finished before it could be killed at step {kill_at}"
    resumed = run_train(run_args(base, run_dir, "--ckpt-every", "3", "--resume", "auto"), nproc)
    assert resumed.returncode == 0, resumed.stderr
    return run_dir, reached, resumed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_kill_is_bitwise_exact_single_process(
    baseline_1: Baseline, tmp_path: Path, start_train: Callable, run_train: Callable
) -> None:
    run_dir, killed_at, resumed = crash_and_resume(ARGS_1, 1, tmp_path, start_train, run_train)
    assert "resumed from" in resumed.stdout, resumed.stdout
    assert final_sha(resumed.stdout) == baseline_1.sha, f"killed at step {killed_at}"
    assert_same_samples_as(baseline_1, run_dir, world_size=1, accum=1)
    assert_metrics_once_per_step(run_dir)


# -- preemption ----------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(
    baseline_1: Baseline, tmp_path: Path, start_train: Callable, run_train: Callable
) -> None:
    run_dir = tmp_path / "run"
    proc = start_train(run_args(ARGS_1, run_dir, "--ckpt-every", "0"))
    wait_for_step(run_dir, random.randint(3, STEPS // 2), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) == 1  # --ckpt-every 0: only the preemption checkpoint
    stopped = ckpts[0].step
    assert f"preempted: checkpoint at step {stopped} written" in out
    # The checkpoint holds every step that was logged, and nothing after it ran.
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps[-1] == stopped

    resumed = run_train(run_args(ARGS_1, run_dir, "--ckpt-every", "0", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert final_sha(resumed.stdout) == baseline_1.sha, f"preempted at step {stopped}"
    # A preempted step is never redone: every step was logged exactly once.
    records = raw_sample_records(run_dir)
    assert sorted(r["step"] for r in records) == list(range(STEPS))
    assert_same_samples_as(baseline_1, run_dir, world_size=1, accum=1)


def test_second_signal_exits_at_once(tmp_path: Path, start_train: Callable) -> None:
    run_dir = tmp_path / "run"
    proc = start_train([*TINY_ARGS, "--steps", "100000", "--run-dir", str(run_dir)])
    wait_for_step(run_dir, 2, proc)
    # Two different signals, so the kernel cannot merge them into one.
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode in (-signal.SIGTERM, -signal.SIGUSR1)


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_second_signal_waits_for_a_blocked_collective(
    tmp_path: Path, start_train: Callable
) -> None:
    # Python runs signal handlers between bytecodes: a rank blocked in a collective whose peer is
    # frozen acts on no signal, not even a second one, until the collective returns.
    import psutil

    run_dir = tmp_path / "run"
    proc = start_train([*TINY_ARGS, "--steps", "100000", "--run-dir", str(run_dir)], nproc=2)
    wait_for_step(run_dir, 2, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    rank = {p.environ().get("RANK"): p for p in workers}
    rank["1"].suspend()
    try:
        time.sleep(1.0)  # rank 0 now waits for rank 1 in the step's collectives
        rank["0"].send_signal(signal.SIGUSR1)
        rank["0"].send_signal(signal.SIGTERM)
        with pytest.raises(psutil.TimeoutExpired):
            rank["0"].wait(timeout=5)
    finally:
        rank["1"].resume()
    # The collective returns, the handlers run, and the second signal ends rank 0 by itself.
    rank["0"].wait(timeout=60)
    _, err = proc.communicate(timeout=120)
    assert re.search(r"rank\s*:\s*0\b.*?exitcode\s*:\s*-(10|15)\b", err, re.DOTALL), err


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_one_rank_stops_both_after_the_same_step(
    baseline_2: Baseline, tmp_path: Path, start_train: Callable, run_train: Callable
) -> None:
    import psutil

    run_dir = tmp_path / "run"
    proc = start_train(run_args(ARGS_2, run_dir, "--ckpt-every", "0"), nproc=2)
    wait_for_step(run_dir, random.randint(3, STEPS // 2), proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGTERM)  # only rank 1 hears it; rank 0 must stop with it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun reports its workers' non-zero exit
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", err)
    assert codes and set(codes) == {"75"}, err
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) == 1
    stopped = ckpts[0].step
    assert f"preempted: checkpoint at step {stopped} written" in out
    per_rank_last = {}
    for rec in raw_sample_records(run_dir):
        per_rank_last[rec["pid"]] = max(per_rank_last.get(rec["pid"], -1), rec["step"])
    assert sorted(per_rank_last.values()) == [stopped - 1, stopped - 1]  # same last step

    resumed = run_train(run_args(ARGS_2, run_dir, "--ckpt-every", "0", "--resume", "auto"), nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert final_sha(resumed.stdout) == baseline_2.sha, f"preempted at step {stopped}"
    assert_same_samples_as(baseline_2, run_dir, world_size=2, accum=2)


# -- exit codes of the checkpoint contract ---------------------------------------------------


def test_run_dir_locked_by_another_writer_exits_77(tmp_path: Path, run_train: Callable) -> None:
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    lock = WriterLock(ckpt_dir)  # stands in for another trainer writing into the same run
    lock.acquire()
    try:
        proc = run_train([*TINY_ARGS, "--steps", "3", "--run-dir", str(tmp_path / "run")])
    finally:
        lock.release()
    assert proc.returncode == 77, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "writing checkpoints" in proc.stderr


def run_without_large_files(
    args: list[str], env: dict[str, str], nproc: int = 1
) -> subprocess.CompletedProcess:
    """Run the trainer where files above 64 KiB cannot be written (EFBIG: Python ignores
    SIGXFSZ): the tiny model's checkpoint is larger, the metrics and the read-only corpus are
    not affected."""

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    return subprocess.run(
        train_command(args, nproc),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )


def torchrun_exit_codes(stderr: str) -> dict[int, int]:
    """Each failed rank's exit code, from torchrun's failure summary."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}


def test_failed_checkpoint_write_with_fail_fatal_exits_76(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    args = [*TINY_ARGS, "--steps", "6", "--ckpt-every", "3", "--run-dir", str(tmp_path)]
    proc = run_without_large_files([*args, "--ckpt-fail-fatal"], train_env)
    assert proc.returncode == 76, proc.stderr
    assert "checkpoint write failed" in proc.stderr.splitlines()[-1]
    assert "was not written" in proc.stderr  # the store's report of the first failure
    assert list_checkpoints(tmp_path) == []


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_failing_rank_exits_with_its_code_while_its_peer_waits_in_a_collective(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    """Rank 0's checkpoint write fails (only rank 0 writes files, and none above 64 KiB can be
    written) while rank 1 has gone on to the next step and waits for rank 0 in its gradient
    all-reduce. Rank 0 leaves at once with 76: an error path does not tear down a process
    group that a peer is still using (with NCCL that can block for good)."""
    args = [*TINY_ARGS, "--steps", "100000", "--ckpt-every", "3", "--ckpt-sync",
            "--ckpt-fail-fatal", "--run-dir", str(tmp_path)]  # fmt: skip
    proc = run_without_large_files(args, train_env, nproc=2)
    assert proc.returncode != 0
    assert torchrun_exit_codes(proc.stderr).get(0) == 76, proc.stderr
    assert "train.py: error: checkpoint write failed" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert list_checkpoints(tmp_path) == []


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_ranks_that_loaded_different_corpora_are_refused_with_exit_2(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    rng = random.Random(7)
    for rank in (0, 1):  # the same size: only the bytes differ
        (tmp_path / f"corpus-{rank}.txt").write_bytes(rng.randbytes(40_000))
    args = [*TINY_ARGS, "--data", str(tmp_path / "corpus-{rank}.txt"),
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(PER_RANK_ARGS), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=train_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert set(torchrun_exit_codes(proc.stderr).values()) == {2}, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert len(errors) == 2, proc.stderr  # one line from each rank
    assert all("rank(s) 1 loaded a different corpus from rank 0's" in ln for ln in errors)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- under a supervisor ------------------------------------------------------------------------


def supervised_env(train_env: dict[str, str], run_dir: Path, **extra: str) -> dict[str, str]:
    """The environment a supervisor gives a worker of ``run_dir`` (this process stands in for the
    supervisor), plus ``extra`` (``ROSE_ATTEMPT``, ``ROSE_RESUME_FROM``, ...)."""
    return {
        **train_env,
        "ROSE_RUN_DIR": str(run_dir),
        "ROSE_ATTEMPT": "1",
        "ROSE_HEARTBEAT_DIR": str(run_dir / "heartbeats"),
        "ROSE_SUPERVISOR_PID": str(os.getpid()),
        **extra,
    }


def run_supervised(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(args), env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(900)
def test_supervisor_environment_wins_over_flags(tmp_path: Path, train_env: dict[str, str]) -> None:
    run_dir = tmp_path / "supervised"
    env = supervised_env(train_env, run_dir)
    ignored = tmp_path / "ignored"
    args = [*TINY_ARGS, "--steps", "8", "--ckpt-every", "4", "--run-dir", str(ignored)]
    first = run_supervised(args, env)
    assert first.returncode == 0, first.stderr
    assert not ignored.exists()
    beat = json.loads((run_dir / "heartbeats" / "rank-0.json").read_text())
    assert (beat["rank"], beat["step"], beat["phase"], beat["attempt"]) == (0, 8, "done", 1)

    # The supervisor names the checkpoint; --resume-from and --resume auto are overruled.
    chosen = run_dir / "checkpoints" / "step-00000004"
    env.update(ROSE_ATTEMPT="2", ROSE_RESUME_FROM=str(chosen))
    second = run_supervised(
        [*args, "--resume-from", str(tmp_path / "nowhere"), "--resume", "auto"], env
    )
    assert second.returncode == 0, second.stderr
    assert f"resumed from {chosen} at step 4" in second.stdout
    assert final_sha(second.stdout) == final_sha(first.stdout)
    beat = json.loads((run_dir / "heartbeats" / "rank-0.json").read_text())
    assert (beat["step"], beat["phase"], beat["attempt"]) == (8, "done", 2)


# -- checkpoints that verify but do not load -----------------------------------------------------


def _wider_tensor(tensors: dict) -> None:
    """One weight one row wider: the file is resealed, so only a load can tell."""
    name = next(k for k, t in sorted(tensors.items()) if t.dim() == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])


def _float64_tensor(tensors: dict) -> None:
    name = next(k for k, t in sorted(tensors.items()) if t.dim() == 2)
    tensors[name] = tensors[name].double()


@pytest.mark.timeout(900)
def test_unloadable_checkpoint_under_a_supervisor_exits_78_marked_and_reported(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    events_file = run_dir / "events.jsonl"
    run_dir.mkdir()
    events_file.write_text("")  # a one-node supervisor makes it before it launches workers
    env = supervised_env(train_env, run_dir)
    args = [*TINY_ARGS, "--steps", "8", "--ckpt-every", "4"]
    first = run_supervised(args, env)
    assert first.returncode == 0, first.stderr
    saved = [e for e in read_jsonl(events_file) if e["type"] == "checkpoint_saved"]
    assert [(e["step"], e["source"]) for e in saved] == [(4, "trainer"), (8, "trainer")]

    newest = run_dir / "checkpoints" / "step-00000008"
    replace_tensors(newest, "model.safetensors", _wider_tensor)
    env.update(ROSE_ATTEMPT="2", ROSE_RESUME_FROM=str(newest))
    second = run_supervised(args, env)
    assert second.returncode == TrainerExit.CKPT_UNLOADABLE == 78, second.stderr
    (line,) = second.stderr.splitlines()
    assert line.startswith(f"train.py: error: checkpoint {newest} cannot be used")
    assert "shape mismatch" in line and "this run's model config" in line
    mark = (newest / "UNLOADABLE.txt").read_text()
    assert "shape mismatch" in mark
    (event,) = [e for e in read_jsonl(events_file) if e["type"] == "checkpoint_unloadable"]
    assert event["source"] == "trainer" and event["path"] == str(newest)
    assert "shape mismatch" in event["reason"]
    # What the supervisor does next: its search quarantines the marked checkpoint, with the
    # trainer's reason, and picks the older one.
    assert find_latest_valid(run_dir).name == "step-00000004"
    reason = (run_dir / "checkpoints" / "quarantine" / newest.name / "REASON.txt").read_text()
    assert reason.startswith("unloadable: ") and "shape mismatch" in reason


@pytest.mark.timeout(900)
def test_resume_auto_quarantines_an_unloadable_checkpoint_and_resumes_exactly_from_an_older(
    baseline_1: Baseline, tmp_path: Path, run_train: Callable
) -> None:
    run_dir = tmp_path / "run"
    first = run_train(run_args(ARGS_1, run_dir, "--ckpt-every", "10"))
    assert first.returncode == 0, first.stderr
    assert [c.step for c in list_checkpoints(run_dir)] == [40, 30, 20]
    newest = run_dir / "checkpoints" / "step-00000040"
    replace_tensors(newest, "model.safetensors", _float64_tensor)
    resumed = run_train(run_args(ARGS_1, run_dir, "--ckpt-every", "10", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume auto: {newest} cannot be used" in resumed.stderr
    assert "dtype mismatch" in resumed.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000030'} at step 30" in resumed.stdout
    assert final_sha(resumed.stdout) == baseline_1.sha
    reason = (run_dir / "checkpoints" / "quarantine" / newest.name / "REASON.txt").read_text()
    assert "unloadable: " in reason and "dtype mismatch" in reason
    assert [c.step for c in list_checkpoints(run_dir)] == [40, 30, 20]  # 40 written anew
    assert_metrics_once_per_step(run_dir)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_ranks_pass_over_an_unloadable_checkpoint_together(
    tmp_path: Path, run_train: Callable
) -> None:
    """Both ranks give up on the checkpoint and both resume from the same older one: the run
    ends with the parameters of the run that wrote them."""
    args = [*TINY_ARGS, "--steps", "8", "--ckpt-every", "4", "--run-dir", str(tmp_path)]
    first = run_train(args, nproc=2)
    assert first.returncode == 0, first.stderr
    newest = tmp_path / "checkpoints" / "step-00000008"
    replace_tensors(newest, "model.safetensors", _wider_tensor)
    resumed = run_train([*args, "--resume", "auto"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-00000004'} at step 4" in resumed.stdout
    assert final_sha(resumed.stdout) == final_sha(first.stdout)
    assert (tmp_path / "checkpoints" / "quarantine" / newest.name / "UNLOADABLE.txt").is_file()


@pytest.mark.timeout(900)
def test_resume_auto_with_no_loadable_checkpoint_stops_rather_than_start_over(
    tmp_path: Path, run_train: Callable
) -> None:
    args = [*TINY_ARGS, "--steps", "6", "--ckpt-every", "3", "--run-dir", str(tmp_path)]
    assert run_train(args).returncode == 0
    for step in (3, 6):
        replace_tensors(
            tmp_path / "checkpoints" / f"step-{step:08d}", "model.safetensors", _wider_tensor
        )
    proc = run_train([*args, "--resume", "auto"])
    assert proc.returncode == 78, proc.stderr
    assert "not starting from scratch" in proc.stderr.splitlines()[-1]
    assert list_checkpoints(tmp_path) == []
    moved = sorted(p.name for p in (tmp_path / "checkpoints" / "quarantine").iterdir())
    assert moved == ["step-00000003", "step-00000006"]


@pytest.mark.timeout(900)
def test_another_model_config_is_bad_input_and_leaves_the_checkpoint_alone(
    tmp_path: Path, run_train: Callable
) -> None:
    args = [*TINY_ARGS, "--steps", "3", "--ckpt-every", "3", "--run-dir", str(tmp_path)]
    assert run_train(args).returncode == 0
    proc = run_train([*args, "--model", "small", "--resume", "auto"])
    assert proc.returncode == TrainerExit.USAGE, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "does not fit this model" in line and "n_embd=64 where this run has 256" in line
    (ckpt,) = list_checkpoints(tmp_path)
    assert ckpt.valid and not (ckpt.path / "UNLOADABLE.txt").exists()


# -- failed saves, reported to the supervisor ----------------------------------------------------


@pytest.mark.timeout(900)
def test_failed_saves_are_events_in_the_supervisors_file(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    events_file = tmp_path / "events-node0.jsonl"
    env = supervised_env(train_env, tmp_path, ROSE_EVENTS_FILE=str(events_file))
    proc = subprocess.run(
        # The memory tier off: its snapshots would fail on the same limit, with a line of their own.
        train_command([*TINY_ARGS, "--steps", "6", "--ckpt-every", "3", "--mem-every", "0"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    assert proc.returncode == 0, proc.stderr  # not --ckpt-fail-fatal: training went on
    failed = [e for e in read_jsonl(events_file) if e["type"] == "checkpoint_write_failed"]
    assert [(e["step"], e["errno"], e["source"]) for e in failed] == [
        (3, "EFBIG", "trainer"),
        (6, "EFBIG", "trainer"),
    ]
    assert proc.stderr.count("was not written") == 2
    assert not (tmp_path / "events.jsonl").exists()


@pytest.mark.timeout(900)
def test_a_memory_tier_that_cannot_write_leaves_every_failure_to_the_disk_interval(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    # Two earlier failures in 100 s, both resumed from memory. This attempt's memory root does not
    # exist: its first snapshot fails, and the disk alone protects the run from then on, so its
    # interval must count both failures (M about 50 s), not none (the 3600 s prior).
    events_file = tmp_path / "events-node0.jsonl"
    env = supervised_env(
        train_env,
        tmp_path / "run",
        ROSE_EVENTS_FILE=str(events_file),
        ROSE_MEM_ROOT=str(tmp_path / "no-such-root"),
        ROSE_FAILURES="2",
        ROSE_RUN_SECONDS="100.0",
        ROSE_MEMORY_RECOVERIES="2",
    )
    # Steps enough for the 2 s of training before the first disk save on any machine; the run
    # is stopped (SIGTERM: a checkpoint, exit 75) once the disk interval has been announced.
    args = [*TINY_ARGS, "--steps", "100000", "--ckpt-every", "auto", "--ckpt-mode", "sync"]
    proc = subprocess.Popen(
        train_command([*args, "--mem-every", "auto"]),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(
            e["type"] == "checkpoint_interval" and e["tier"] == "disk"
            for e in read_jsonl(events_file)
        ):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no disk interval announced within 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == TrainerExit.PREEMPTED, err
    finally:
        kill_tree(proc)
    events = read_jsonl(events_file)
    assert [e["type"] for e in events if e["type"].startswith("memory_")] == ["memory_save_failed"]
    disk = [e for e in events if e["type"] == "checkpoint_interval" and e["tier"] == "disk"]
    assert disk, [e["type"] for e in events]
    assert all(
        e["mtbf_of"] == "all failures" and e["failures"] == 2 and 50.0 <= e["mtbf"] < 3600.0
        for e in disk
    ), disk


@pytest.mark.timeout(900)
def test_checkpoints_dir_deleted_mid_run_is_made_again(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    events_file = tmp_path / "events.jsonl"
    events_file.write_text("")
    env = supervised_env(train_env, tmp_path)
    proc = subprocess.Popen(
        train_command([*TINY_ARGS, "--steps", "30", "--ckpt-every", "5"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_step(tmp_path, 10, proc)
        while not any(c.valid for c in list_checkpoints(tmp_path)):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.01)
        gone = tmp_path / "deleted"
        (tmp_path / "checkpoints").rename(gone)  # at once, even with a save in flight
        shutil.rmtree(gone)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0, err
    assert list_checkpoints(tmp_path)[0].step == 30
    assert find_latest_valid(tmp_path).name == "step-00000030"
    events = read_jsonl(events_file)
    (made,) = [e for e in events if e["type"] == "checkpoint_dir_recreated"]
    assert made["source"] == "trainer" and made["path"] == str(tmp_path / "checkpoints")
    saved = [e["step"] for e in events if e["type"] == "checkpoint_saved"]
    assert saved[-1] == 30 and events.index(made) < len(events) - 1


# -- pieces of the loop ----------------------------------------------------------------------


def test_lr_warms_up_then_decays_to_min_lr() -> None:
    from trainer.config import TrainConfig
    from trainer.train import lr_at

    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(cfg, 100) == pytest.approx(1e-4)


def test_threads_default_to_omp_num_threads_else_all_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trainer.config import TrainConfig
    from trainer.train import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads(TrainConfig()) == 1
    assert default_threads(TrainConfig(threads=3)) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(TrainConfig()) == (os.cpu_count() or 1)


def in_process_trainer(
    data_cache: Path, run_dir: Path, *flags: str, resume: Path | None = None
) -> Trainer:
    """A one-rank CPU Trainer in this process (the test-sized run, plus ``flags``)."""
    from trainer.config import parse_args
    from trainer.data import load_corpus
    from trainer.preemption import Preemption
    from trainer.train import Dist

    cfg = parse_args(
        [*TINY_ARGS, "--data-cache", str(data_cache), "--run-dir", str(run_dir), *flags]
    )
    corpus = load_corpus(cfg.data, cache_dir=cfg.data_cache_dir(), vocab_size=cfg.vocab_size,
                         val_fraction=cfg.val_fraction, seq_len=cfg.seq_len)  # fmt: skip
    return Trainer(cfg, corpus, run_dir, resume, Dist(), torch.device("cpu"), Preemption())


class ScalarReads(TorchDispatchMode):
    """Records every scalar read (``item()``, ``float()``, ``bool()`` of a tensor) except those
    of the optimizer's step counters, which live on the host by design."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.reads: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            counters = [s.get("step") for s in self.optimizer.state.values()]
            if not any(args[0] is c for c in counters):
                self.reads.append("".join(traceback.format_stack(limit=4)[:-1]))
        return func(*args, **(kwargs or {}))


def test_at_most_one_host_read_per_optimizer_step(tmp_path: Path, data_cache: Path) -> None:
    # Each device-to-host read waits for the device; the loop is allowed one per step (and one
    # per eval). Gradient accumulation: the loss of every micro-step is summed on the device.
    trainer = in_process_trainer(
        data_cache, tmp_path, "--steps", "4", "--grad-accum", "2", "--eval-every", "2"
    )
    try:
        with ScalarReads(trainer.optimizer) as scalar_reads:
            assert trainer.run() == 0
    finally:
        trainer.close()
    assert scalar_reads.reads == [], "\n".join(scalar_reads.reads)
    assert trainer.host_reads.count == 4 + 2  # steps + evals
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 4 and all(isinstance(v, float) and v > 0 for v in losses)


def test_resume_places_optimizer_state_like_a_fresh_optimizer(
    tmp_path: Path, data_cache: Path
) -> None:
    first = in_process_trainer(data_cache, tmp_path / "run", "--steps", "2")
    try:
        assert first.run() == 0
    finally:
        first.close()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    resumed = in_process_trainer(data_cache, tmp_path / "run", "--steps", "4", resume=checkpoint)
    try:
        assert (resumed.step, resumed.position) == (2, 2 * 4)
        for p in resumed.model.parameters():
            state = resumed.optimizer.state[p]
            assert state["exp_avg"].device == state["exp_avg_sq"].device == p.device
            assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32
            assert state["step"].item() == 2.0
    finally:
        resumed.close()


def test_resume_reads_older_train_states_and_refuses_invalid_ones(
    tmp_path: Path, data_cache: Path
) -> None:
    from trainer.checkpoint import CheckpointStore

    source = in_process_trainer(data_cache, tmp_path / "source", "--steps", "2")
    try:
        assert source.run() == 0
        num_samples = source.sampler.num_samples
        # As trainers wrote it before the elastic resume: no global_batch, no metrics_offset.
        older = {"step": 2, "position": 8, "seq_len": 32, "num_samples": num_samples}
        broken = {**older, "position": -8}
        for name, state in (("older", older), ("broken", broken)):
            with CheckpointStore(tmp_path / name, is_writer=True, async_save=False) as store:
                store.save(2, source.model, source.optimizer, None, state, {})
    finally:
        source.close()

    older_path = tmp_path / "older" / "checkpoints" / "step-00000002"
    resumed = in_process_trainer(data_cache, tmp_path / "run", "--steps", "3", resume=older_path)
    try:
        assert (resumed.step, resumed.position, resumed.sampler.global_batch) == (2, 8, 4)
        assert resumed.run() == 0
    finally:
        resumed.close()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [3]
    # Refused by verify already (trainer/checkpoint/schema.py): unusable, not just incompatible.
    with pytest.raises(CheckpointUnloadable, match=r"train_state position is -8"):
        broken_path = tmp_path / "broken" / "checkpoints" / "step-00000002"
        in_process_trainer(data_cache, tmp_path / "bad", "--steps", "3", resume=broken_path)


def test_the_benchmark_stretches_take_snapshots_every_other_stretch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from runcontract.env import MEM_ALTERNATE
    from trainer import train as train_module

    monkeypatch.delenv(MEM_ALTERNATE, raising=False)
    assert train_module._snapshot_stretch() == 0
    monkeypatch.setenv(MEM_ALTERNATE, "3")
    assert train_module._snapshot_stretch() == 3

    def on(stretch: int, step: int) -> bool:
        fake = SimpleNamespace(_snapshot_stretch=stretch, step=step)
        return train_module.Trainer._snapshots_on(fake)  # type: ignore[arg-type]

    # Steps 1-2 on, 3-5 off, 6-8 on, 9-11 off, 12 on: the snapshot of step s is taken or not.
    pattern = "110001110001"
    assert [on(3, step) for step in range(1, 13)] == [c == "1" for c in pattern]
    assert all(on(0, step) for step in range(1, 13))
    for bad in ("x", "-1"):
        monkeypatch.setenv(MEM_ALTERNATE, bad)
        with pytest.raises(train_module.UsageError, match=MEM_ALTERNATE):
            train_module._snapshot_stretch()
