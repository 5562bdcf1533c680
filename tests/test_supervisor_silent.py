"""Scripts that write no heartbeats, under the real supervisor: hangs seen in the process table,
a finish that a teardown abort does not undo, and progress that the crash-loop guard sees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runcontract import exit_codes
from tests.scripts.harness import FAST, LAUNCH, WORKER, Launched

pytestmark = pytest.mark.distributed

SILENT = Path(__file__).resolve().parent / "scripts" / "silent_worker.py"
ATTEMPT_TIMEOUT = 60.0


def _run(tmp_path: Path, *args: str) -> Launched:
    return Launched(tmp_path / "run", ["--nproc", "2", *FAST, *args])


def test_a_stopped_rank_is_a_hang_without_heartbeats(tmp_path: Path) -> None:
    # Attempt 1: rank 1 stops itself while rank 0 keeps computing; attempt 2 works and ends.
    run = _run(tmp_path, "--hang-timeout", "3", str(SILENT), "stop,work", "--seconds", "1")
    try:
        assert run.wait(3 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        said = [e for e in events if e["type"] == "hang_detection"]
        assert said and said[0]["detector"] == "process" and said[0]["timeout"] == 3.0
        assert run.types().index("hang_detection") < run.types().index("workers_started")
        hangs = [e for e in events if e["type"] == "hang_detected"]
        assert [(e["attempt"], e["rank"], e["phase"]) for e in hangs] == [(1, 1, "stopped")]
        assert hangs[0]["stalled_for"] >= 3.0
        assert "rank 1 stopped" in hangs[0]["reason"]
        assert run.types()[-1] == "done"
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_ranks_idle_in_a_collective_are_a_hang_without_heartbeats(tmp_path: Path) -> None:
    # Attempt 1: rank 1 never reaches the barrier that rank 0 waits in: both sleep.
    run = _run(tmp_path, "--hang-timeout", "4", str(SILENT), "stuck,work", "--seconds", "1")
    try:
        assert run.wait(3 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        hangs = [e for e in run.events() if e["type"] == "hang_detected"]
        assert [(e["attempt"], e["phase"]) for e in hangs] == [(1, "idle")]
        assert "every rank idle" in hangs[0]["reason"]
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_a_rank_left_idle_after_its_peers_exited_0_is_a_hang_that_says_so(tmp_path: Path) -> None:
    # Attempt 1: rank 0 finishes and exits 0; rank 1 never ends (as in a teardown stuck after its
    # peer left). The hang names the finished rank, so the user looks at the teardown.
    run = _run(tmp_path, "--hang-timeout", "3", str(SILENT), "behind,work", "--seconds", "1")
    try:
        assert run.wait(3 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        hangs = [e for e in run.events() if e["type"] == "hang_detected"]
        assert [(e["attempt"], e["phase"]) for e in hangs] == [(1, "idle")]
        assert "every rank idle" in hangs[0]["reason"]
        assert "rank(s) 0 had already exited 0" in hangs[0]["reason"], hangs[0]["reason"]
        assert "teardown" in hangs[0]["reason"]
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_busy_or_talking_ranks_are_not_hung(tmp_path: Path) -> None:
    # Work longer than the timeout, then sleep while printing: neither is a hang.
    run = _run(tmp_path, "--hang-timeout", "1", str(SILENT), "work", "--seconds", "3")
    try:
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        assert "hang_detected" not in run.types()
    finally:
        run.kill_all()
    talk = Launched(
        tmp_path / "talk",
        ["--nproc", "2", *FAST, "--hang-timeout", "1", str(SILENT), "talk", "--seconds", "3"],
    )
    try:
        assert talk.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, talk.stderr[-3000:]
        assert "hang_detected" not in talk.types()
    finally:
        talk.kill_all()


def test_process_hang_no_leaves_a_silent_script_to_its_crashes(tmp_path: Path) -> None:
    # Silent sleep past the timeout: with the process check off, only a crash would count.
    run = _run(
        tmp_path, "--process-hang", "no", "--hang-timeout", "1", str(SILENT), "sleep",
        "--seconds", "3",
    )  # fmt: skip
    try:
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        said = next(e for e in run.events() if e["type"] == "hang_detection")
        assert said["detector"] == "heartbeats" and "--process-hang no" in said["reason"]
        assert "hang_detected" not in run.types()
    finally:
        run.kill_all()


def _kill_rank_1_after(run: Launched, attempt: int, saved: Path | None) -> None:
    """Wait for attempt ``attempt``'s workers (and, when given, for ``saved`` to be written in
    it), then SIGKILL rank 1."""
    started = run.wait_event("workers_started", ATTEMPT_TIMEOUT, count=attempt)
    if saved is not None:
        deadline = time.monotonic() + ATTEMPT_TIMEOUT
        while not (saved.exists() and saved.read_text().strip() == f"attempt {attempt}"):
            assert time.monotonic() < deadline, f"attempt {attempt} never wrote {saved}"
            time.sleep(0.05)
    os.kill(int(started["workers"]["1"]), signal.SIGKILL)


def test_a_script_that_writes_its_own_checkpoints_is_not_a_crash_loop(tmp_path: Path) -> None:
    # Three kills, each after the script rewrote its snapshot; the guard allows only two
    # failures without progress, and each attempt is far shorter than --healthy-after.
    snapshot = tmp_path / "run" / "snapshot.pt"  # found in the run dir with no flag
    run = _run(
        tmp_path, "--crash-loop", "2", "--healthy-after", "600", "--max-restarts", "5",
        str(SILENT), "save,save,save,work", "--seconds", "0.5", "--save-to", str(snapshot),
    )  # fmt: skip
    try:
        for attempt in (1, 2, 3):
            _kill_rank_1_after(run, attempt, snapshot)
        assert run.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        backoffs = [e for e in events if e["type"] == "backoff"]
        assert len(backoffs) == 3 and all(e["progressed"] for e in backoffs)
        assert all(str(snapshot) in e["progress"] for e in backoffs)
        # Not a claim of a restart from step 0: the script resumes from its own state.
        selected = [e for e in events if e["type"] == "checkpoint_selected"]
        assert len(selected) == 4 and all(e["step"] is None for e in selected)
        assert all(e["resume_step"] is None for e in events if e["type"] == "launch")
        state = json.loads((run.run_dir / "supervisor.json").read_text())
        assert state["failures_without_progress"] == 0 and state["restarts_left"] == 2
    finally:
        run.kill_all()


def test_failures_without_anything_written_are_a_crash_loop(tmp_path: Path) -> None:
    run = _run(
        tmp_path, "--crash-loop", "2", "--healthy-after", "600", "--max-restarts", "5",
        str(SILENT), "save", "--seconds", "0.5",
    )  # fmt: skip
    try:
        for attempt in (1, 2):
            _kill_rank_1_after(run, attempt, None)
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.CRASH_LOOP, run.stderr[-3000:]
        backoff = next(e for e in run.events() if e["type"] == "backoff")
        assert not backoff["progressed"] and backoff["progress"].startswith("none")
        assert "without progress" in run.wait_event("crash_loop", 5)["reason"]
    finally:
        run.kill_all()


def test_an_abort_after_the_done_marker_is_a_finish(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    marker.write_text("from an earlier run\n")  # older than the attempt: not evidence
    os.utime(marker, (0, 0))
    run = _run(
        tmp_path, "--max-restarts", "1", "--done-marker", str(marker),
        str(SILENT), "talk,work", "--seconds", "0.3", "--abort", "--done-marker", str(marker),
    )  # fmt: skip
    try:
        assert run.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        accepted = [e for e in events if e["type"] == "exit_after_done"]
        assert len(accepted) == 1 and "done marker" in accepted[0]["reason"]
        assert accepted[0]["exit_code"] == -signal.SIGABRT
        assert run.types()[-1] == "done"
    finally:
        run.kill_all()


def test_an_abort_without_evidence_of_a_finish_is_a_failure(tmp_path: Path) -> None:
    run = _run(tmp_path, "--max-restarts", "0", str(SILENT), "work", "--seconds", "0.3", "--abort")
    try:
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.BUDGET_EXHAUSTED, run.stderr[-3000:]
        assert "exit_after_done" not in run.types()
    finally:
        run.kill_all()


def test_an_abort_after_every_rank_reported_done_is_a_finish(tmp_path: Path) -> None:
    run = _run(tmp_path, "--max-restarts", "0", str(WORKER), "finish", "--abort-at-exit", "1")
    try:
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        accepted = run.wait_event("exit_after_done", 5)
        assert "every rank reported done" in accepted["reason"]
        assert accepted["rank"] == 1 and accepted["exit_code"] == -signal.SIGABRT
    finally:
        run.kill_all()


def _chaos(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LAUNCH), "chaos", str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=2 * ATTEMPT_TIMEOUT,
    )


def _launch_py(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(LAUNCH), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_chaos_tool_works_on_a_script_without_heartbeats(tmp_path: Path) -> None:
    run = _run(
        tmp_path, "--hang-timeout", "3", str(SILENT), "save,save,work", "--seconds", "0.5",
    )  # fmt: skip
    try:
        run.wait_event("workers_started", ATTEMPT_TIMEOUT)
        killed = _chaos(run.run_dir, "--fault", "kill-worker", "--count", "1", "--seed", "1")
        assert killed.returncode == 0, killed.stderr
        run.wait_event("workers_started", ATTEMPT_TIMEOUT, count=2)
        # Attempt 2 saves until stopped. With no checkpoint of the store to damage: one line
        # and exit 2, not a wait until the timeout.
        corrupt = _chaos(run.run_dir, "--fault", "corrupt", "--count", "1")
        assert corrupt.returncode == 2 and "needs the checkpoints" in corrupt.stderr
        assert len(corrupt.stderr.strip().splitlines()) == 1
        at_steps = _chaos(run.run_dir, "--at-steps", "5")
        assert at_steps.returncode == 2 and "use --every" in at_steps.stderr
        stopped = _chaos(run.run_dir, "--fault", "hang", "--count", "1", "--seed", "1")
        assert stopped.returncode == 0, stopped.stderr
        assert run.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        events = run.events()
        injected = [e for e in events if e["type"] == "fault_injected"]
        assert [(e["kind"], e["attempt"], e["step"]) for e in injected] == [
            ("kill-worker", 1, None),
            ("hang", 2, None),
        ]
        assert [e["attempt"] for e in events if e["type"] == "worker_failed"] == [1]
        hangs = [e for e in events if e["type"] == "hang_detected"]
        assert [(e["attempt"], e["phase"]) for e in hangs] == [(2, "stopped")]
        # status and report say what they know, and "unknown" for the rest, never 0.
        status = _launch_py("status", str(run.run_dir))
        assert "step:         unknown" in status and "process table" in status
        report = _launch_py("report", str(run.run_dir), "--no-png")
        assert "3 attempt(s), 2 failure(s), 2 fault(s) injected" in report
        assert "steps:       unknown" in report and "goodput:     unknown" in report
    finally:
        run.kill_all()
