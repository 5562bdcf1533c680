"""The real supervisor (``launch.py``) with real torchrun and tiny worker scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runcontract import exit_codes
from tests.scripts.harness import FAST, LAUNCH, WORKER, Launched, alive, failure_signal

pytestmark = pytest.mark.distributed

# Start-up on a loaded 2-core machine can take several seconds per attempt.
ATTEMPT_TIMEOUT = 60.0


def _run(tmp_path: Path, *args: str, name: str = "run") -> Launched:
    return Launched(tmp_path / name, ["--nproc", "2", *FAST, *args])


def test_worker_failures_are_explained_and_recovered(tmp_path: Path) -> None:
    # Attempt 1: rank 1 exits 3; attempt 2: rank 1 dies by SIGSEGV; attempt 3 finishes.
    run = _run(
        tmp_path,
        str(WORKER),
        "exit,signal,finish",
        "--rank",
        "1",
        "--code",
        "3",
        "--signal",
        "SIGSEGV",
    )
    try:
        assert run.wait(3 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        types = [e["type"] for e in events]
        assert types.count("launch") == 3
        failed = [e for e in events if e["type"] == "worker_failed"]
        assert [(e["rank"], e["exit_code"], e["signal"]) for e in failed] == [
            (1, 3, None),
            (1, -11, "SIGSEGV"),
        ]
        # The failing rank's own last words.
        assert "exit at step 3" in failed[0]["log_tail"]
        assert "signal at step 3" in failed[1]["log_tail"]
        assert all(e["leftovers"] == 0 for e in events if e["type"] == "stopped")
        # Each recovery splits into phases, in order.
        order = ["worker_failed", "stopping", "stopped", "backoff", "launch", "first_step"]
        first = types.index("worker_failed")
        positions = [types.index(t, first) for t in order]
        assert positions == sorted(positions)
        assert types[-1] == "done"
        for attempt in (1, 2, 3):
            assert (run.run_dir / "logs" / f"attempt-{attempt}" / "torchrun.log").is_file()
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_the_rank_killed_first_is_blamed_not_the_peers_failing_after_it(tmp_path: Path) -> None:
    # Rank 0 is SIGKILLed; rank 1 exits 1 a few milliseconds later, as a peer does when a
    # collective breaks. Both are usually seen gone in the same look: the kill is the cause.
    run = _run(
        tmp_path, str(WORKER), "signal", "--rank", "0", "--peers-exit", "1", "--until-attempt", "2"
    )
    try:
        assert run.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        failed = next(e for e in events if e["type"] == "worker_failed")
        assert failed["rank"] == 0, failed
        assert failure_signal(events, failed) == "SIGKILL"
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_a_rank_that_exits_0_without_done_is_blamed_not_its_failing_peers(tmp_path: Path) -> None:
    # Rank 0 leaves with exit 0 but never reports "done"; rank 1 fails (exit 1) a few
    # milliseconds later, as a peer does when its collective loses a partner.
    run = _run(
        tmp_path, "--require-heartbeats", "yes", str(WORKER), "exit", "--code", "0",
        "--rank", "0", "--peers-exit", "1", "--until-attempt", "2",
    )  # fmt: skip
    try:
        assert run.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        failed = next(e for e in run.events() if e["type"] == "worker_failed")
        assert (failed["rank"], failed["exit_code"]) == (0, 0), failed
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_budget_exhausted_after_exactly_n_plus_one_attempts(tmp_path: Path) -> None:
    run = _run(
        tmp_path, "--max-restarts", "1", "--crash-loop", "0", str(WORKER), "exit", "--code", "1"
    )
    try:
        assert run.wait(3 * ATTEMPT_TIMEOUT) == exit_codes.BUDGET_EXHAUSTED
        types = run.types()
        assert types.count("launch") == 2  # --max-restarts 1: exactly N+1 attempts
        assert types.count("worker_failed") == 2
        assert types[-1] == "budget_exhausted"
        assert "restart budget exhausted" in run.stderr
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_hangs_are_detected_and_recovered(tmp_path: Path) -> None:
    # Attempt 1: rank 1 stops beating (a stuck loop); attempt 2: rank 1 is SIGSTOPped.
    run = _run(
        tmp_path, "--hang-timeout", "2", str(WORKER), "hang-sleep,hang-stop,finish", "--rank", "1"
    )
    try:
        assert run.wait(3 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        hangs = [e for e in events if e["type"] == "hang_detected"]
        assert [(e["attempt"], e["rank"], e["step"]) for e in hangs] == [(1, 1, 3), (2, 1, 3)]
        assert all(e["timeout"] == 2.0 and e["stalled_for"] >= 2.0 for e in hangs)
        logged = next(e for e in events if e["type"] == "hang_timeout")
        assert logged["timeout"] == 2.0 and logged["derived"] is False
        stopped = [e for e in events if e["type"] == "stopped"]
        assert stopped[1]["killed"] >= 1  # a stopped process ignores SIGTERM: it took SIGKILL
        assert run.types()[-1] == "done"
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_workers_ignoring_sigterm_are_killed_after_grace(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        "--max-restarts",
        "0",
        "--stop-grace",
        "0.5",
        str(WORKER),
        "exit",
        "--rank",
        "1",
        "--ignore-sigterm",
    )
    try:
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.BUDGET_EXHAUSTED
        stopped = next(e for e in run.events() if e["type"] == "stopped")
        assert stopped["killed"] >= 1  # rank 0 ignored SIGTERM
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_second_supervisor_refuses_and_sigterm_interrupts(tmp_path: Path) -> None:
    first = _run(tmp_path, str(WORKER), "forever")
    second = None
    try:
        started = first.wait_event("workers_started", ATTEMPT_TIMEOUT)
        second = _run(tmp_path, str(WORKER), "forever")
        assert second.wait(30) == exit_codes.RUN_DIR_LOCKED
        assert "owned by another supervisor" in second.stderr
        assert f"pid {first.proc.pid}" in second.stderr
        assert first.proc.poll() is None  # the owner is untouched
        worker_pids = [int(p) for p in started["workers"].values()]
        assert len(worker_pids) == 2 and all(alive(p) for p in worker_pids)
        status = subprocess.run(
            [sys.executable, str(LAUNCH), "status", str(first.run_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "state:        running" in status.stdout
        assert f"rank 0: {worker_pids[0]}, rank 1: {worker_pids[1]}" in status.stdout

        first.proc.send_signal(signal.SIGTERM)
        assert first.wait(30) == exit_codes.INTERRUPTED
        events = first.events()
        interrupted = next(e for e in events if e["type"] == "interrupted")
        assert interrupted["signal"] == "SIGTERM"
        stopped = [e for e in events if e["type"] == "stopped"][-1]
        assert stopped["killed"] == 0  # the workers exited on SIGTERM by themselves
        assert first.leftovers(timeout=5.0) == []
    finally:
        first.kill_all()
        if second is not None:
            second.kill_all()


def test_sigkill_of_supervisor_leaves_no_process(tmp_path: Path) -> None:
    run = _run(tmp_path, str(WORKER), "forever")
    try:
        started = run.wait_event("workers_started", ATTEMPT_TIMEOUT)
        pids = [int(started["torchrun_pid"]), *(int(p) for p in started["workers"].values())]
        assert all(alive(p) for p in pids)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        t0 = time.monotonic()
        assert run.leftovers(timeout=10.0) == []
        assert time.monotonic() - t0 < 10.0
    finally:
        run.kill_all()


def test_sigkill_of_torchrun_is_a_lost_node_and_recovers(tmp_path: Path) -> None:
    run = _run(tmp_path, str(WORKER), "forever", "--until-attempt", "2", "--steps", "20")
    try:
        started = run.wait_event("workers_started", ATTEMPT_TIMEOUT)
        os.kill(int(started["torchrun_pid"]), signal.SIGKILL)
        assert run.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        failed = next(e for e in run.events() if e["type"] == "worker_failed")
        # Its workers died with it; torchrun is the root cause.
        assert failed["source"] == "torchrun"
        assert failed["signal"] == "SIGKILL"
        assert run.types()[-1] == "done"
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_every_worker_rank_is_known_with_four_ranks(tmp_path: Path) -> None:
    # Six attempts of four fresh workers each: a worker seen between torchrun's fork and its
    # exec has no RANK yet, and must be read again until it has, never left as "?<pid>".
    run = Launched(
        tmp_path / "run",
        ["--nproc", "4", *FAST, "--max-restarts", "5", "--crash-loop", "0", str(WORKER),
         "exit,exit,exit,exit,exit,finish", "--rank", "3", "--code", "1"],
    )  # fmt: skip
    try:
        assert run.wait(6 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        started = [e for e in run.events() if e["type"] == "workers_started"]
        assert len(started) == 6
        assert all(sorted(e["workers"]) == ["0", "1", "2", "3"] for e in started), started
        assert "rank ?" not in run.stderr
        failed = [e for e in run.events() if e["type"] == "worker_failed"]
        assert [e["rank"] for e in failed] == [3] * 5
    finally:
        run.kill_all()
