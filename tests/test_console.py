"""The console's parts on their own: the bounded file follower, the status line, the failure and
recovery block, --quiet, --tee, and status --watch."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from runcontract.events import EventType
from supervisor.console import Console, ConsoleConfig
from supervisor.follow import Follower
from supervisor.progress import Progress
from supervisor.status import write_state
from supervisor.tee import Tee, parse_ranks
from supervisor.watch import LOST, watch

# -- the follower --------------------------------------------------------------------------------


def test_follower_reads_complete_lines_and_keeps_a_torn_one_for_later(tmp_path: Path) -> None:
    path = tmp_path / "log"
    f = Follower(path)
    assert f.read() == []  # not there yet
    path.write_bytes(b"one\ntw")
    assert f.read() == ["one"]
    with open(path, "ab") as out:
        out.write(b"o\nthree\n")
    assert f.read() == ["two", "three"]
    assert f.read() == []


def test_an_endless_line_is_passed_on_in_pieces_and_never_held_whole(tmp_path: Path) -> None:
    path = tmp_path / "log"
    f = Follower(path, chunk=1000, max_line=100)
    with open(path, "wb") as out:
        out.write(b"x" * 5000)  # no newline, ever
    pieces: list[str] = []
    for _ in range(10):
        pieces += f.read()
        assert len(f._partial) <= 100
    assert "".join(pieces) + f.flush()[0] == "x" * 5000
    assert all(len(p) == 100 for p in pieces)


def test_a_reader_far_behind_jumps_to_the_newest_output_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"".join(b"line %06d\n" % i for i in range(10_000)))  # 120 kB
    f = Follower(path, chunk=4096, max_backlog=8192)
    lines = f.read()
    assert f.skipped > 100_000
    assert lines and lines[0].startswith("line ") and len(lines[0]) == 11  # resynced on a line
    rest = lines
    while lines:
        lines = f.read()
        rest += lines
    assert rest[-1] == "line 009999"


def test_a_log_emptied_by_the_cap_is_followed_on(tmp_path: Path) -> None:
    """supervisor.logcap empties a file while its writer goes on at its own offset: the file
    keeps its size over a hole, which reads as nothing."""
    path = tmp_path / "stdout.log"
    writer = open(path, "wb")  # noqa: SIM115 - torchrun's way: no O_APPEND
    try:
        writer.write(b"before\n" * 10)
        writer.flush()
        f = Follower(path)
        assert f.read() == ["before"] * 10
        writer.write(b"lost\n")
        writer.flush()
        os.truncate(path, 0)  # the cap: emptied under the writer
        assert f.read() == []
        writer.write(b"after\n")
        writer.flush()
        got = f.read()
        assert got == ["after"], got  # no NUL bytes, nothing twice
    finally:
        writer.close()


def test_a_file_cut_back_is_read_again_from_its_start(tmp_path: Path) -> None:
    """A resumed trainer cuts metrics.jsonl back to its checkpoint, then appends."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    f = Follower(path)
    assert len(f.read()) == 3
    path.write_text('{"step": 2}\n')
    assert f.read() == ['{"step": 2}']


# -- the status line -----------------------------------------------------------------------------


def test_the_line_says_what_is_known_and_never_step_zero_for_a_script_without_heartbeats() -> None:
    p = Progress(total=None, started=0.0)
    p.on_event({"type": EventType.LAUNCH, "attempt": 1, "restarts_left": 3})
    p.on_event({"type": EventType.FIRST_STEP})  # a script's first step is never reported...
    for t in (1.0, 2.0, 3.0):
        p.on_step(None, t)  # ...and no heartbeat ever gives one
    line = p.line(75.0)
    assert "step" not in line and "loss" not in line and "ETA" not in line
    assert "running" in line and "attempt 1" in line and "restarts left 3" in line
    assert "elapsed 1:15" in line


def test_the_line_of_a_training_run_has_step_loss_throughput_eta_and_checkpoint() -> None:
    p = Progress(total=100, started=0.0)
    p.on_event({"type": EventType.LAUNCH, "attempt": 2, "restarts_left": 4})
    p.on_event({"type": EventType.CHECKPOINT_SAVED, "step": 20, "source": "trainer"})
    for t, step in ((10.0, 30), (15.0, 40), (20.0, 50)):
        p.on_step(step, t)
    p.on_metrics({"step": 50, "loss": 3.25, "tokens_per_s": 1500.0}, 20.0)
    line = p.line(20.0)
    assert line.startswith("step 50/100 (50%)")
    for part in ("loss 3.250", "1.5k tok/s", "ETA 0:25", "ckpt 20", "attempt 2", "restarts left 4"):
        assert part in line, line


# -- the console's blocks ------------------------------------------------------------------------


def _recovery_story(t0: float) -> list[dict]:
    base = {"time": t0}
    return [
        {**base, "type": "supervisor_started", "script": "/x/train.py", "nproc": 2,
         "max_restarts": 5, "run_dir": "/runs/a"},
        {**base, "type": "checkpoint_selected", "attempt": 1, "path": None, "step": 0},
        {**base, "type": "launch", "attempt": 1, "restarts_left": 5},
        {**base, "type": "checkpoint_saved", "step": 8, "source": "trainer"},
        {**base, "mono": 100.0, "type": "worker_failed", "attempt": 1, "step": 11,
         "source": "worker", "rank": 1, "pid": 4242, "exit_code": -9, "signal": "SIGKILL",
         "log_tail": "loading\nTraceback: boom"},
        {**base, "type": "stopping", "attempt": 1, "reason": "worker failed", "grace": 2},
        {**base, "type": "stopped", "attempt": 1, "seconds": 0.4, "terminated": 1, "killed": 0,
         "root_cause": {"rank": 1, "pid": 4242, "exit_code": -9, "signal": "SIGKILL"}},
        {**base, "type": "backoff", "attempt": 1, "delay": 0.5, "restarts_used": 1,
         "restarts_left": 4},
        {**base, "type": "checkpoint_selected", "attempt": 2, "path": "/runs/a/ckpt/step-8",
         "step": 8},
        {**base, "type": "launch", "attempt": 2, "restarts_left": 4},
        {**base, "mono": 107.25, "type": "first_step", "attempt": 2, "step": 9,
         "since_launch": 5.1},
    ]  # fmt: skip


def _console(quiet: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    config = ConsoleConfig(progress_every=0, quiet=quiet)
    return Console(config, stream=out, total_steps=40), out


def test_a_failure_and_its_recovery_make_one_block() -> None:
    console, out = _console()
    for record in _recovery_story(time.time()):
        console.event(record)
    text = out.getvalue()
    block = text[text.index("FAILURE") :]
    assert "FAILURE in attempt 1 at step 11: rank 1 (pid 4242) killed by SIGKILL" in block
    assert "last lines of rank 1's log:\n    | loading\n    | Traceback: boom" in block
    assert "attempt 1 stopped in 0.4 s" in block
    assert "restart 1 of 5 in 0.5 s" in block
    assert "attempt 2 resumes from checkpoint step 8 (/runs/a/ckpt/step-8)" in block
    assert "RECOVERED: attempt 2 trains again (step 9), 7.2 s after the failure" in block
    # Routine events stay in events.jsonl.
    assert "checkpoint_saved" not in text and "launch:" not in text and "stopping" not in text


def test_quiet_keeps_the_failure_block_only() -> None:
    console, out = _console(quiet=True)
    t = time.time()
    resumed = [
        {"time": t, "type": "checkpoint_selected", "attempt": 1, "path": "/c/step-4", "step": 4},
        {"time": t, "type": "first_step", "attempt": 1, "step": 5, "since_launch": 3.0},
        {"time": t, "type": "checkpoint_saved", "step": 8, "source": "trainer"},
    ]
    for record in [*resumed, *_recovery_story(t)[1:]]:
        console.event(record)
    console.poll(12)
    text = out.getvalue()
    assert "supervising" not in text and "progress" not in text
    assert "step-4" not in text and "first step 5" not in text  # a resume is no failure
    assert text.startswith("[rose ") and text.split("] ", 1)[1].startswith("FAILURE in attempt 1")
    assert "resumes from checkpoint step 8" in text and "RECOVERED" in text


def test_without_a_terminal_progress_is_a_plain_line_every_n_seconds() -> None:
    now = [0.0]
    out = io.StringIO()
    console = Console(
        ConsoleConfig(progress_every=30), stream=out, total_steps=100, clock=lambda: now[0]
    )
    console.event({"type": "launch", "attempt": 1, "restarts_left": 2, "time": time.time()})
    for step in range(1, 91):
        now[0] = step * 1.0
        console.poll(step)
    lines = [ln for ln in out.getvalue().splitlines() if "progress:" in ln]
    assert [ln.split("progress: ")[1].split()[1] for ln in lines] == ["30/100", "60/100", "90/100"]
    assert "\x1b" not in out.getvalue()


# -- tee ------------------------------------------------------------------------------------------


def test_tee_ranks_flag() -> None:
    assert parse_ranks("all") is None
    assert parse_ranks("none") == frozenset()
    assert parse_ranks("0,2") == frozenset({0, 2})
    for bad in ("x", "-1", "0,,1"):
        with pytest.raises(ValueError, match="--tee"):
            parse_ranks(bad)


def test_tee_streams_the_chosen_ranks_prefixed(tmp_path: Path) -> None:
    ranks = tmp_path / "ranks"
    for local in (0, 1):
        d = ranks / "runid" / "attempt_0" / str(local)
        d.mkdir(parents=True)
        (d / "stdout.log").write_text(f"hello from {local}\n")
        (d / "stderr.log").write_text(f"warning from {local}\npartial")
    tee = Tee(frozenset({1}), nproc=2, rank_of=lambda local: local + 4)
    tee.start(ranks)
    assert sorted(tee.read()) == ["[rank5]: hello from 1", "[rank5]: warning from 1"]
    assert tee.drain() == ["[rank5]: partial"]


# -- status --watch ------------------------------------------------------------------------------


def test_watch_refreshes_until_the_state_is_final(tmp_path: Path) -> None:
    state = {"state": "running", "supervisor_pid": os.getpid(), "attempt": 1, "step": 3}
    write_state(tmp_path, state)
    out = io.StringIO()
    looks = []

    def sleep(_seconds: float) -> None:  # the run goes on between two looks
        looks.append(1)
        step = 3 + len(looks)
        final = len(looks) == 3
        write_state(tmp_path, {**state, "step": step, "state": "succeeded" if final else "running"})

    assert watch(tmp_path, 0.01, stream=out, sleep=sleep) == 0
    text = out.getvalue()
    assert [ln.split()[-1] for ln in text.splitlines() if ln.startswith("step:")] == [
        "3",
        "4",
        "5",
        "6",
    ]
    assert "state:        succeeded" in text


def test_watch_ends_with_1_when_the_supervisor_is_gone(tmp_path: Path) -> None:
    write_state(tmp_path, {"state": "running", "supervisor_pid": 2**22 + 12345})
    out = io.StringIO()
    assert watch(tmp_path, 0.01, stream=out, sleep=lambda s: None) == LOST
    assert "is gone" in out.getvalue()


def test_events_go_to_the_console_once(tmp_path: Path) -> None:
    """The supervisor's own worker_failed carries a source (the failed process's kind); reading
    the log back must not show it a second time."""
    from supervisor.events import EventLog

    seen: list[str] = []

    class Sink:
        def event(self, record: dict) -> None:
            seen.append(record["type"])

    log = EventLog(tmp_path / "events.jsonl", console=Sink())
    log.emit(EventType.WORKER_FAILED, source="worker", rank=1)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write(json.dumps({"time": 1.0, "type": "checkpoint_saved", "source": "trainer"}) + "\n")
        f.write(json.dumps({"time": 1.0, "type": "fault_injected", "source": "chaos"}) + "\n")
    log.follow()
    log.close()
    assert seen == ["worker_failed", "checkpoint_saved", "fault_injected"]
