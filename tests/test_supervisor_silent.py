"""Scripts that write no heartbeats, under the real supervisor: hangs seen in the process table,
a finish that a teardown abort does not undo, and progress that the crash-loop guard sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from runcontract import exit_codes
from tests.scripts.harness import FAST, Launched

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
