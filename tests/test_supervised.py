"""trainer.supervised: the environment contract, heartbeats and the parent watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from runcontract import events as events_module
from runcontract.events import EventWriter, read_jsonl
from trainer import supervised

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "ROSE_RUN_DIR": str(tmp_path),
        "ROSE_ATTEMPT": "3",
        "ROSE_RESUME_FROM": str(tmp_path / "checkpoints" / "step-00000040"),
        "ROSE_HEARTBEAT_DIR": str(tmp_path / "heartbeats"),
        "ROSE_SUPERVISOR_PID": "4242",
    }
    env.update(extra)
    return env


def test_from_env_unsupervised_is_none() -> None:
    assert supervised.from_env({}) is None
    assert supervised.from_env({"ROSE_RUN_DIR": ""}) is None


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    env = supervised.from_env(_env(tmp_path))
    assert env is not None
    assert env.run_dir == tmp_path
    assert env.attempt == 3
    assert env.resume_from == tmp_path / "checkpoints" / "step-00000040"
    assert env.heartbeat_dir == tmp_path / "heartbeats"
    assert env.supervisor_pid == 4242


def test_from_env_empty_resume_means_fresh_start(tmp_path: Path) -> None:
    env = supervised.from_env(_env(tmp_path, ROSE_RESUME_FROM="", ROSE_HEARTBEAT_DIR=""))
    assert env is not None
    assert env.resume_from is None
    assert env.heartbeat_dir == tmp_path / "heartbeats"


@pytest.mark.parametrize(("name", "value"), [("ROSE_ATTEMPT", "two"), ("ROSE_ATTEMPT", "0")])
def test_from_env_malformed_names_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        supervised.from_env(_env(tmp_path, **{name: value}))


def test_heartbeat_is_noop_when_unsupervised(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ROSE_RUN_DIR", raising=False)
    beat = supervised.Heartbeat(0)
    assert not beat.enabled
    assert beat(5) is False
    assert not (tmp_path / "heartbeats").exists()


def test_heartbeat_writes_contract_fields(tmp_path: Path) -> None:
    env = supervised.from_env(_env(tmp_path))
    beat = supervised.Heartbeat(1, env=env)
    assert beat(0, phase="startup") is True
    record = json.loads((tmp_path / "heartbeats" / "rank-1.json").read_text())
    assert record["rank"] == 1
    assert record["pid"] == os.getpid()
    assert record["attempt"] == 3
    assert record["step"] == 0
    assert record["phase"] == "startup"
    assert abs(record["time"] - time.time()) < 60
    # Only the final file is left: the temp file was renamed into place.
    assert sorted(p.name for p in (tmp_path / "heartbeats").iterdir()) == ["rank-1.json"]


def test_heartbeat_throttles_unless_phase_changes(tmp_path: Path) -> None:
    env = supervised.from_env(_env(tmp_path))
    beat = supervised.Heartbeat(0, env=env, min_interval=30.0)
    path = tmp_path / "heartbeats" / "rank-0.json"
    assert beat(1) is True
    assert beat(2) is False  # throttled
    assert json.loads(path.read_text())["step"] == 1
    assert beat(2, phase="checkpoint") is True  # a phase change is always written
    assert json.loads(path.read_text())["phase"] == "checkpoint"
    assert beat.beat(3, phase="train") is True


def test_heartbeat_writes_again_after_interval(tmp_path: Path) -> None:
    env = supervised.from_env(_env(tmp_path))
    beat = supervised.Heartbeat(0, env=env, min_interval=0.05)
    assert beat(1) is True
    time.sleep(0.1)
    assert beat(2) is True
    assert json.loads((tmp_path / "heartbeats" / "rank-0.json").read_text())["step"] == 2


def test_heartbeat_rejects_unknown_phase(tmp_path: Path) -> None:
    beat = supervised.Heartbeat(0, env=supervised.from_env(_env(tmp_path)))
    with pytest.raises(ValueError, match="phase"):
        beat(1, phase="training")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return True
        except OSError:  # it was reaped between the two looks
            return True
        time.sleep(0.05)
    return False


def _start_guarded(tmp_path: Path, supervisor_pid: int) -> tuple[subprocess.Popen, int]:
    """Start spawn_child.py → guarded_sleeper.py; return the middle process and the worker pid."""
    env = dict(os.environ)
    env.update(_env(tmp_path, ROSE_SUPERVISOR_PID=str(supervisor_pid)))
    env["PYTHONPATH"] = str(ROOT)
    middle = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "spawn_child.py"),
            sys.executable,
            str(SCRIPTS / "guarded_sleeper.py"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert middle.stdout is not None
    pid_text, armed = middle.stdout.readline().split()
    assert armed == "1"
    return middle, int(pid_text)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_guard_parent_exits_when_supervisor_dies(tmp_path: Path) -> None:
    fake_supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    middle, worker = _start_guarded(tmp_path, fake_supervisor.pid)
    try:
        assert not _wait_gone(worker, 0.5)  # alive while its supervisor is
        fake_supervisor.kill()
        fake_supervisor.wait()
        assert _wait_gone(worker, 10.0)
        assert middle.wait(timeout=10) == 0  # the worker exited on its own; the parent saw it
    finally:
        _kill(worker)
        middle.kill()
        middle.wait()
        fake_supervisor.kill()
        fake_supervisor.wait()


def test_guard_parent_exits_when_parent_dies(tmp_path: Path) -> None:
    middle, worker = _start_guarded(tmp_path, os.getpid())
    try:
        middle.kill()  # torchrun vanishing
        middle.wait()
        assert _wait_gone(worker, 10.0)
    finally:
        _kill(worker)


def test_guard_parent_unsupervised_does_nothing(monkeypatch) -> None:
    monkeypatch.delenv("ROSE_RUN_DIR", raising=False)
    assert supervised.guard_parent() is False


# -- the worker's events, beside the supervisor's ------------------------------------------------


def test_events_file_is_the_variable_else_an_existing_one_node_file(tmp_path: Path) -> None:
    named = tmp_path / "events-node1.jsonl"
    env = supervised.from_env(_env(tmp_path, ROSE_EVENTS_FILE=str(named)))
    assert env is not None and env.events_file == named
    # Unset: never create the one-node file, whose presence tells a one-node run directory.
    env = supervised.from_env(_env(tmp_path))
    assert env is not None and env.events_file is None
    supervised.Events(env)({"type": "checkpoint_saved", "step": 1})
    assert not (tmp_path / "events.jsonl").exists()
    (tmp_path / "events.jsonl").write_text("")  # made by a one-node supervisor at its start
    env = supervised.from_env(_env(tmp_path))
    assert env is not None and env.events_file == tmp_path / "events.jsonl"


def test_events_lines_never_interleave_with_another_writer(tmp_path: Path) -> None:
    """A worker's events and another process's (the supervisor's) in one file at the same time:
    every line parses whole, none is lost."""
    path = tmp_path / "events.jsonl"
    path.write_text("")
    n = 2000
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from runcontract.events import EventWriter\n"
            "w = EventWriter(Path(sys.argv[1]))\n"
            "for i in range(int(sys.argv[2])): w.write('launch', i=i, pad='x' * 3000)",
            str(path),
            str(n),
        ],
        cwd=ROOT,
    )
    events = supervised.Events(supervised.from_env(_env(tmp_path)))
    for i in range(n):
        events({"type": "checkpoint_saved", "time": 0.0, "i": i, "pad": "y" * 3000})
    events.close()
    assert other.wait(timeout=120) == 0
    records = read_jsonl(path)
    # Every line parses whole (a blank one, left by an open that met a stalled append, is no
    # event: readers skip it).
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert len(lines) == len(records) == 2 * n
    mine = [r for r in records if r.get("source") == "trainer"]
    assert [r["i"] for r in mine] == list(range(n))
    assert all(r["type"] == "checkpoint_saved" and r["time"] > 0 for r in mine)
    theirs = [r["i"] for r in records if "source" not in r]
    assert theirs == list(range(n))


def test_an_events_file_that_ends_in_a_torn_line_gets_a_newline_before_the_next_event(
    tmp_path: Path,
) -> None:
    # A write cut short by a full disk left half a line: the next writer must not glue its
    # first event onto it.
    path = tmp_path / "events.jsonl"
    path.write_text('{"time": 1, "type": "launch"}\n{"time": 2, "type": "che')
    writer = EventWriter(path)
    writer.write("done", step=3)
    writer.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"time": 2, "type": "che'
    assert [r["type"] for r in read_jsonl(path)] == ["launch", "done"]


def test_a_line_still_being_appended_is_not_taken_for_a_torn_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process's append seen half done: the file grows while the new writer waits to be
    # sure, so no newline is added (it would leave a blank line behind). The other writer
    # finishes its line during that wait, exactly.
    path = tmp_path / "events.jsonl"
    path.write_text('{"time": 1, "type": "launch"}\n{"time": 2, ')
    waits: list[float] = []

    def the_other_writer_finishes(seconds: float) -> None:
        waits.append(seconds)
        with open(path, "a") as f:
            f.write('"type": "done"}\n')

    clock = SimpleNamespace(
        sleep=the_other_writer_finishes, time=time.time, monotonic=time.monotonic
    )
    monkeypatch.setattr(events_module, "time", clock)
    writer = EventWriter(path)
    writer.write("exit", code=0)
    writer.close()
    assert waits == [events_module.TORN_LINE_SETTLE]
    assert path.read_text().count("\n") == 3
    assert [r["type"] for r in read_jsonl(path)] == ["launch", "done", "exit"]
