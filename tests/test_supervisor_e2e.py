"""End to end: the supervisor and the real trainer (tiny preset, CPU, 2 ranks, gloo) under faults.

Every faulted run must end with parameters bitwise equal to an uninterrupted run of the same
configuration: recovery resumes exactly, losing and repeating nothing.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from supervisor import exit_codes
from tests.scripts.harness import FAST, Launched, wait_heartbeat

pytestmark = [pytest.mark.distributed, pytest.mark.chaos, pytest.mark.slow]

STEPS = 24
TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(STEPS),
    "--warmup-steps", "5", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--ckpt-every", "4", "--dropout", "0.1", "--seed", "11",
]  # fmt: skip
ATTEMPT_TIMEOUT = 120.0


def _launch(run_dir: Path, env: dict[str, str], *flags: str, tag: str = "") -> Launched:
    return Launched(run_dir, ["--nproc", "2", *FAST, *flags, "--", *TRAIN_ARGS], env=env, tag=tag)


def _final_params(run_dir: Path) -> str:
    manifest = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json"
    return json.loads(manifest.read_text())["params_sha256"]


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, train_env: dict[str, str]) -> str:
    """params_sha256 of an uninterrupted supervised run."""
    run = _launch(tmp_path_factory.mktemp("reference") / "run", train_env)
    try:
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        assert run.types().count("launch") == 1
        return _final_params(run.run_dir)
    finally:
        run.kill_all()


def test_worker_sigkill_then_sigstop_recovers_bitwise(
    tmp_path: Path, train_env: dict[str, str], reference: str
) -> None:
    run = _launch(tmp_path / "run", train_env, "--hang-timeout", "3")
    try:
        # Attempt 1: SIGKILL rank 1 after the step-4 checkpoint.
        beat = wait_heartbeat(run, rank=1, attempt=1, min_step=6, timeout=ATTEMPT_TIMEOUT)
        os.kill(beat["pid"], signal.SIGKILL)
        # Attempt 2: freeze rank 0 (a hang: it stops beating, rank 1 blocks in a collective).
        beat = wait_heartbeat(run, rank=0, attempt=2, min_step=14, timeout=ATTEMPT_TIMEOUT)
        os.kill(beat["pid"], signal.SIGSTOP)
        assert run.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]

        events = run.events()
        failed = next(e for e in events if e["type"] == "worker_failed")
        assert failed["attempt"] == 1 and failed["rank"] == 1 and failed["signal"] == "SIGKILL"
        hang = next(e for e in events if e["type"] == "hang_detected")
        assert hang["attempt"] == 2 and hang["rank"] == 0 and hang["step"] >= 14
        chosen = [e["step"] for e in events if e["type"] == "checkpoint_selected"]
        assert chosen[0] == 0 and chosen[1] >= 4 and chosen[2] >= 12
        assert [e["type"] for e in events].count("launch") == 3
        assert events[-1]["type"] == "done" and events[-1]["step"] == STEPS
        assert _final_params(run.run_dir) == reference
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_sigterm_to_supervisor_checkpoints_and_relaunch_resumes(
    tmp_path: Path, train_env: dict[str, str], reference: str
) -> None:
    run_dir = tmp_path / "run"
    run = _launch(run_dir, train_env)
    try:
        wait_heartbeat(run, rank=0, attempt=1, min_step=6, timeout=ATTEMPT_TIMEOUT)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(60) == exit_codes.INTERRUPTED, run.stderr[-3000:]
        events = run.events()
        assert any(e["type"] == "interrupted" and e["signal"] == "SIGTERM" for e in events)
        assert run.leftovers(timeout=5.0) == []
        log = (run_dir / "logs" / "attempt-1" / "torchrun.log").read_text()
        preempted = [line for line in log.splitlines() if "preempted: checkpoint at step" in line]
        assert preempted, log[-3000:]
        emergency = int(preempted[0].split("at step")[1].split()[0])
        assert 6 <= emergency < STEPS
        assert _steps(run_dir)[-1] == emergency
    finally:
        run.kill_all()

    again = _launch(run_dir, train_env, tag="-relaunch")
    try:
        assert again.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, again.stderr[-3000:]
        selected = [e for e in again.events() if e["type"] == "checkpoint_selected"]
        assert selected[-1]["step"] == emergency  # no step lost
        assert selected[-1]["attempt"] == 2  # numbering goes on; attempt 1's logs are kept
        assert (run_dir / "logs" / "attempt-1" / "torchrun.log").read_text() == log
        assert _final_params(run_dir) == reference
    finally:
        again.kill_all()
