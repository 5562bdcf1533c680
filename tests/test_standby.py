"""The standby attempt, with the real supervisor, torchrun and trainer: it serves a recovery
(bitwise equal to an uninterrupted run), and a standby that died leaves a cold start behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from runcontract import exit_codes
from runcontract.layout import CHECKPOINTS, step_name
from tests.scripts.harness import FAST, LAUNCH, Launched

pytestmark = [pytest.mark.distributed, pytest.mark.chaos]

HELD_TRAINER = Path(__file__).parent / "scripts" / "held_trainer.py"
TRAIN_ARGS = [
    "--model", "tiny", "--steps", "40", "--ckpt-every", "10", "--no-ckpt-skip-busy",
    "--dropout", "0.1",
]  # fmt: skip
# Rank 0 holds itself at step 25 of attempt 1, so that the test acts while the run is mid-way;
# a long hang timeout, so that the held rank is not called hung while the standby gets ready.
FLAGS = ["--nproc", "2", *FAST, "--require-heartbeats", "yes", "--hang-timeout", "300"]
TIMEOUT = 240.0


def _params(run_dir: Path) -> str:
    manifest = run_dir / CHECKPOINTS / step_name(40) / "manifest.json"
    return str(json.loads(manifest.read_text())["params_sha256"])


def _launch(run_dir: Path, train_env: dict[str, str], *flags: str, hold: str = "") -> Launched:
    env = {**train_env, "HOLD_AT": hold}
    return Launched(run_dir, [*FLAGS, *flags, str(HELD_TRAINER), *TRAIN_ARGS], env=env)


def _held_rank0(run: Launched) -> psutil.Process:
    """Rank 0 of attempt 1 once it has stopped itself at its held step."""
    worker = psutil.Process(int(run.wait_event("workers_started", TIMEOUT)["workers"]["0"]))
    _wait(run, lambda: worker.status() == psutil.STATUS_STOPPED, "rank 0 held at step 25")
    return worker


def _wait(run: Launched, done: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert run.proc.poll() is None, f"supervisor exited before {what}: {run.types()}"
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s: {run.types()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, train_env: dict[str, str]) -> str:
    """params_sha256 of an uninterrupted run, started cold with the standby off."""
    run = _launch(tmp_path_factory.mktemp("reference") / "run", train_env, "--standby", "off")
    try:
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        assert not [e for e in events if e["type"].startswith("standby")]
        assert [e["standby"] for e in events if e["type"] == "launch"] == [False]
        return _params(run.run_dir)
    finally:
        run.kill_all()


def test_a_killed_worker_is_recovered_through_the_standby(
    tmp_path: Path, train_env: dict[str, str], reference: str
) -> None:
    run = _launch(tmp_path / "run", train_env, hold="1:25")
    try:
        held = _held_rank0(run)
        ready = run.wait_event("standby_ready", TIMEOUT)
        assert ready["for_attempt"] == 2 and sorted(ready["workers"]) == ["0", "1"]
        assert all(mb > 0 for mb in ready["rss_mb"].values())
        state_file = run.run_dir / "supervisor.json"
        _wait(run, lambda: json.loads(state_file.read_text())["standby"]["ready"], "ready state")
        assert json.loads(state_file.read_text())["standby"]["rss_mb"] == ready["rss_mb"]
        status = subprocess.run(
            [sys.executable, str(LAUNCH), "status", str(run.run_dir)],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        assert "standby:      ready for attempt 2" in status and " MB" in status
        victim = int(run.wait_event("workers_started", TIMEOUT)["workers"]["1"])
        os.kill(victim, signal.SIGKILL)
        held.send_signal(signal.SIGCONT)  # a no-op when the stop already killed it
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        launches = [e for e in events if e["type"] == "launch"]
        assert [e["standby"] for e in launches] == [False, True]
        # The standby's workers became attempt 2's: the same pids, from the checkpoint chosen.
        started = [e for e in events if e["type"] == "workers_started"]
        assert started[1]["workers"] == ready["workers"]
        # Disk's step 20, or a newer memory snapshot: the memory tier's budget places them at
        # any step, up to 25 where rank 0 holds (it may go on after the kill before the stop).
        assert 20 <= launches[1]["resume_step"] <= 25 and launches[1]["standby_ready"]
        assert [e["attempt"] for e in events if e["type"] == "first_step"] == [1, 2]
        assert _params(run.run_dir) == reference  # bitwise equal to the uninterrupted run
        # Attempt 2 gets a standby of its own only after 5 s of training, which this short run
        # may not reach; whatever waited went with the run.
        assert [e["for_attempt"] for e in events if e["type"] == "standby_started"][0] == 2
        assert not (run.run_dir / "standby").exists()
        assert not (run.run_dir / "logs" / "attempt-3").exists()
        assert run.leftovers(timeout=10.0) == []
    finally:
        run.kill_all()


def test_a_dead_standby_leaves_a_cold_start_that_still_recovers(
    tmp_path: Path, train_env: dict[str, str], reference: str
) -> None:
    run = _launch(tmp_path / "run", train_env, hold="1:25")
    try:
        held = _held_rank0(run)
        ready = run.wait_event("standby_ready", TIMEOUT)
        os.kill(int(ready["workers"]["1"]), signal.SIGKILL)  # the standby itself
        lost = run.wait_event("standby_lost", TIMEOUT)
        assert "exited" in lost["reason"]
        victim = int(run.wait_event("workers_started", TIMEOUT)["workers"]["1"])
        os.kill(victim, signal.SIGKILL)
        held.send_signal(signal.SIGCONT)
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        launches = [e for e in run.events() if e["type"] == "launch"]
        assert [e["standby"] for e in launches] == [False, False]
        assert "the standby died while waiting" in launches[1]["standby_reason"]
        assert _params(run.run_dir) == reference
        assert run.leftovers(timeout=10.0) == []
    finally:
        run.kill_all()
