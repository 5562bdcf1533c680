"""Shared fixtures: the embedded corpus cache, and ways to start real trainer processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from bench.common import free_port
from runcontract.env import DATA_CACHE, MEM_ROOT, unsupervised

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO_ROOT / "trainer" / "train.py"

# A test-sized run: tiny model, few short sequences, a small held-out split, quiet console.
# Every --ckpt-every step is saved (no save skipped behind a slow one): tests name the steps.
TINY_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", "30",
    "--warmup-steps", "5", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--no-ckpt-skip-busy",
]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """In-process tensors are tiny: one thread avoids idle OpenMP workers spinning on a machine
    whose cores are busy with the trainer processes other tests start."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded-corpus cache for the whole test session (built once, ~1 s)."""
    from trainer.data import build_stdlib_cache

    cache = tmp_path_factory.mktemp("data-cache")
    build_stdlib_cache(cache)
    return cache


@pytest.fixture(scope="session")
def mem_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The memory tier's root for the whole session: a killed run's snapshots land here, never
    in the node's /dev/shm (the tests of the real /dev/shm unset it)."""
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="session")
def train_env(data_cache: Path, mem_root: Path) -> dict[str, str]:
    """Environment for a trainer process: the shared corpus cache, the memory tier's root, and
    no supervisor variables inherited from whatever runs the tests (a worker would think it is
    supervised)."""
    env = unsupervised(os.environ)
    env[DATA_CACHE] = str(data_cache)
    env[MEM_ROOT] = str(mem_root)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OMP_NUM_THREADS", None)
    return env


def train_command(args: list[str], nproc: int = 1) -> list[str]:
    """The command line that runs the trainer alone (nproc 1) or under torchrun."""
    if nproc == 1:
        return [sys.executable, str(TRAIN_PY), *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(TRAIN_PY), *args,
    ]  # fmt: skip


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to `proc` and every descendant (torchrun's workers live in their own sessions,
    so a process-group kill would miss them), then reap `proc`."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    if sig == signal.SIGKILL:
        psutil.wait_procs(family, timeout=10)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def run_train(train_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """Run the trainer to completion: `run_train(args, nproc=1, timeout=300)`."""

    def run(args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            train_command(args, nproc),
            cwd=REPO_ROOT,
            env=train_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def start_train(train_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start the trainer in the background: `start_train(args, nproc=1)`. Every process tree
    started this way is killed and reaped when the test ends."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], nproc: int = 1) -> subprocess.Popen:
        proc = subprocess.Popen(
            train_command(args, nproc),
            cwd=REPO_ROOT,
            env=train_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            kill_tree(proc)
        proc.communicate()


def final_sha(stdout: str) -> str:
    """The params_sha256 of the trainer's final line; fails the test when it is missing."""
    lines = [ln for ln in stdout.splitlines() if "params_sha256=" in ln]
    assert lines, f"no final params_sha256 line in:\n{stdout}"
    return lines[-1].rsplit("params_sha256=", 1)[1].strip()


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (an empty list while it does not exist)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line the trainer is writing right now
    return records


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Poll metrics.jsonl until a training step >= `step` is recorded; return that step.
    Fails when the process exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        if steps and steps[-1] >= step:
            return steps[-1]
        assert proc.poll() is None, f"trainer exited ({proc.returncode}) before step {step}"
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout} s")
