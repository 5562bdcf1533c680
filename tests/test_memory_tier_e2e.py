"""End to end: the memory tier under the real supervisor and trainer (tiny preset, CPU, 2 ranks,
gloo). A kill after a memory snapshot newer than the newest disk checkpoint resumes from memory
and loses at most ``--mem-every`` steps; a flipped byte in the newest snapshot falls back to the
other one; the snapshots outlive a SIGKILLed supervisor, and whichever supervisor finishes the
run leaves nothing in shared memory. Each run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from runcontract import exit_codes
from runcontract.env import MEM_ROOT
from runcontract.layout import memory_dir
from tests.scripts.harness import FAST, Launched

pytestmark = [pytest.mark.distributed, pytest.mark.chaos, pytest.mark.slow]

HELD_TRAINER = Path(__file__).parent / "scripts" / "held_trainer.py"
STEPS, CKPT_EVERY, MEM_EVERY, HOLD = 24, 10, 2, 15
TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(STEPS),
    "--warmup-steps", "5", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--ckpt-every", str(CKPT_EVERY), "--mem-every", str(MEM_EVERY), "--dropout", "0.1",
    "--no-ckpt-skip-busy",
]  # fmt: skip
# A long hang timeout: rank 0 holds itself (SIGSTOP) while the test acts.
FLAGS = ["--nproc", "2", *FAST, "--require-heartbeats", "yes", "--hang-timeout", "300"]
TIMEOUT = 240.0


def _launch(
    run_dir: Path, env: dict[str, str], *args: str, hold: str = "", tag: str = ""
) -> Launched:
    script = [str(HELD_TRAINER), *TRAIN_ARGS, *args]
    return Launched(run_dir, [*FLAGS, *script], env={**env, "HOLD_AT": hold}, tag=tag)


def _params(run_dir: Path) -> str:
    manifest = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json"
    return str(json.loads(manifest.read_text())["params_sha256"])


def _wait(run: Launched, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert run.proc.poll() is None, f"supervisor exited before {what}: {run.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s: {run.types()}"
        time.sleep(0.05)


def _held_rank0(run: Launched) -> psutil.Process:
    """Rank 0 of attempt 1, stopped by itself right after step HOLD."""
    worker = psutil.Process(int(run.wait_event("workers_started", TIMEOUT)["workers"]["0"]))
    _wait(run, lambda: worker.status() == psutil.STATUS_STOPPED, f"rank 0 held at step {HOLD}")
    return worker


def _disk_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


def _mem_steps(run_dir: Path, root: Path | None = None) -> list[int]:
    return sorted(int(p.name[5:]) for p in memory_dir(run_dir, root).glob("step-*"))


@pytest.fixture
def shm_env(tmp_path: Path, train_env: dict[str, str]) -> Iterator[tuple[dict[str, str], Path]]:
    """The trainer's environment with the memory tier's root in this test's directory."""
    root = tmp_path / "shm"
    root.mkdir()
    yield {**train_env, MEM_ROOT: str(root)}, root


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, train_env: dict[str, str]) -> str:
    """params_sha256 of an uninterrupted run with the memory tier off (--mem-every 0)."""
    base = tmp_path_factory.mktemp("reference")
    (base / "shm").mkdir()
    run = _launch(base / "run", {**train_env, MEM_ROOT: str(base / "shm")}, "--mem-every", "0")
    try:
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        assert "memory_saved" not in run.types()
        assert list((base / "shm").iterdir()) == []
        return _params(run.run_dir)
    finally:
        run.kill_all()


@pytest.mark.timeout(900)
def test_a_killed_worker_resumes_from_memory_on_the_real_dev_shm(
    tmp_path: Path, train_env: dict[str, str], reference: str
) -> None:
    """The real /dev/shm: the tier is there mid-run, and gone once the run finished."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    env = {k: v for k, v in train_env.items() if k != MEM_ROOT}
    run_dir = tmp_path / "run"
    run = _launch(run_dir, env, hold=f"1:{HOLD}")
    mem = memory_dir(run_dir, Path("/dev/shm"))

    try:
        held = _held_rank0(run)
        assert _mem_steps(run_dir, mem.parent) == [HOLD - 3, HOLD - 1]  # the newest two
        assert max(_disk_steps(run_dir)) == CKPT_EVERY
        victim = int(run.wait_event("workers_started", TIMEOUT)["workers"]["1"])
        os.kill(victim, signal.SIGKILL)
        held.send_signal(signal.SIGCONT)
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]

        events = run.events()
        chosen = [e for e in events if e["type"] == "checkpoint_selected"]
        assert [c["tier"] for c in chosen] == [None, "memory"]
        assert chosen[1]["path"] == str(mem / f"step-{HOLD - 1:08d}")
        assert chosen[1]["step"] == HOLD - 1 > CKPT_EVERY
        assert "newer than the newest valid disk checkpoint (step 10)" in chosen[1]["reason"]
        assert HOLD - chosen[1]["step"] <= MEM_EVERY  # the steps this kill lost
        assert _params(run_dir) == reference  # bitwise equal to the uninterrupted run
        removed = [e for e in events if e["type"] == "memory_removed"]
        assert len(removed) == 1 and removed[0]["reason"] == "the run finished"
        assert events[-1]["type"] == "done"  # the verdict stays the last line
        assert not mem.exists()
        assert run.leftovers(timeout=10.0) == []
    finally:
        run.kill_all()
        shutil.rmtree(mem, ignore_errors=True)


@pytest.mark.timeout(900)
def test_a_flipped_byte_and_a_killed_supervisor_still_end_bitwise_equal(
    tmp_path: Path, shm_env: tuple[dict[str, str], Path], reference: str
) -> None:
    """The newest snapshot corrupted, the supervisor and its workers SIGKILLed: a relaunched
    supervisor drops the bad snapshot, resumes from the other one, finishes, and leaves the
    root empty."""
    env, root = shm_env
    run_dir = tmp_path / "run"
    run = _launch(run_dir, env, hold=f"1:{HOLD}")
    try:
        _held_rank0(run)
        newest = memory_dir(run_dir, root) / f"step-{HOLD - 1:08d}"
        model = newest / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
        # Every process of the run SIGKILLed at once, the supervisor first (as the OOM killer
        # or a lost login shell would): no emergency checkpoint, nothing cleaned up.
        run.kill_all()
        assert run.leftovers(timeout=30.0) == []
        assert _mem_steps(run_dir, root) == [HOLD - 3, HOLD - 1]  # the node's memory outlived them
    finally:
        run.kill_all()

    again = _launch(run_dir, env, tag="-relaunch")
    try:
        assert again.wait(TIMEOUT) == exit_codes.SUCCESS, again.stderr[-3000:]
        events = again.events()
        starts = [i for i, e in enumerate(events) if e["type"] == "supervisor_started"]
        mine = events[starts[-1] :]
        dropped = [e for e in mine if e["type"] == "memory_snapshot_dropped"]
        assert [d["step"] for d in dropped] == [HOLD - 1]
        assert "xxh3_128 does not match" in dropped[0]["reason"]
        chosen = [e for e in mine if e["type"] == "checkpoint_selected"]
        assert chosen[0]["tier"] == "memory" and chosen[0]["step"] == HOLD - 3 > CKPT_EVERY
        assert _params(run_dir) == reference
        assert list(root.iterdir()) == []  # nothing left in shared memory
        assert again.leftovers(timeout=10.0) == []
    finally:
        again.kill_all()
