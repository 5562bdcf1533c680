"""The chaos tool itself, against a stand-in run of real processes (fake_run.py): whom it
signals, what it logs, what it refuses. Fast: no torch, no torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.events import EventLog
from tests.chaos.conftest import HERE, REPO_ROOT, read_jsonl
from tools import chaos

pytestmark = pytest.mark.chaos


class FakeRun:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fake_run.py"), str(run_dir)])
        deadline = time.monotonic() + 30
        while not (run_dir / "supervisor.json").exists():
            assert time.monotonic() < deadline, "fake run did not start"
            assert self.proc.poll() is None, "fake run exited"
            time.sleep(0.02)
        self.workers = {
            int(r): p
            for r, p in json.loads((run_dir / "supervisor.json").read_text())["workers"].items()
        }
        while len(list((run_dir / "heartbeats").glob("rank-*.json"))) < len(self.workers):
            assert time.monotonic() < deadline, "fake workers did not beat"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in self.workers.values():  # by pid, only if still ours
            try:
                if psutil.Process(pid).environ().get("ROSE_RUN_DIR") == str(self.run_dir):
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, OSError):
                pass


@pytest.fixture
def fake_runs(tmp_path: Path) -> Iterator[list[FakeRun]]:
    runs: list[FakeRun] = []
    yield runs
    for run in runs:
        run.stop()


def tool(run_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.chaos", str(run_dir), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def injected(run_dir: Path) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "fault_injected"]


def dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def test_kill_worker_kills_one_worker_of_the_run_and_logs_it(
    tmp_path: Path, fake_runs: list[FakeRun]
) -> None:
    run = FakeRun(tmp_path / "run")
    fake_runs.append(run)
    res = tool(run.run_dir, "--fault", "kill-worker", "--seed", "5")
    assert res.returncode == 0, res.stderr
    (fault,) = injected(run.run_dir)
    assert fault["kind"] == "kill-worker" and fault["source"] == "chaos"
    assert run.workers[fault["rank"]] == fault["pid"] and fault["step"] >= 1
    assert dead(fault["pid"])
    other = run.workers[1 - fault["rank"]]
    assert not dead(other, timeout=0.2)
    assert f"pid={fault['pid']}" in res.stdout and "seed 5" in res.stdout


def test_the_seed_replays_the_same_choices(tmp_path: Path, fake_runs: list[FakeRun]) -> None:
    ranks = []
    for i in range(3):
        run = FakeRun(tmp_path / f"run-{i}")
        fake_runs.append(run)
        assert tool(run.run_dir, "--fault", "hang", "--seed", "42").returncode == 0
        (fault,) = injected(run.run_dir)
        assert psutil.Process(fault["pid"]).status() == psutil.STATUS_STOPPED
        ranks.append(fault["rank"])
        run.stop()
    assert len(set(ranks)) == 1


def test_a_pid_that_is_not_the_runs_is_never_signalled(
    tmp_path: Path, fake_runs: list[FakeRun]
) -> None:
    run = FakeRun(tmp_path / "run")
    fake_runs.append(run)
    # A stranger: alive, but not of this run. Point rank 0's heartbeat at it, as a reused pid
    # would, and keep the real rank 0 from rewriting it.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(run.workers[0], signal.SIGSTOP)
        hb = run.run_dir / "heartbeats" / "rank-0.json"
        record = json.loads(hb.read_text())
        record["pid"] = stranger.pid
        hb.write_text(json.dumps(record))
        res = tool(run.run_dir, "--fault", "kill-worker", "--timeout", "2", "--seed", "1")
        assert res.returncode == 3, res.stdout + res.stderr
        assert stranger.poll() is None
        assert not injected(run.run_dir)
    finally:
        stranger.kill()
        stranger.wait()


def test_corrupt_flips_one_byte_of_the_newest_checkpoint(
    tmp_path: Path, fake_runs: list[FakeRun]
) -> None:
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    payload = bytes(range(256)) * 64
    for step in (4, 8):
        d = ckpt / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(payload)
        (d / "manifest.json").write_text("{}")
    run = FakeRun(run_dir)
    fake_runs.append(run)
    res = tool(run_dir, "--fault", "corrupt", "--corrupt-mode", "flip", "--seed", "9")
    assert res.returncode == 0, res.stderr
    (fault,) = injected(run_dir)
    assert fault["path"] == str(ckpt / "step-00000008") and fault["file"] == "model.safetensors"
    assert fault["pid"] == run.workers[0] and dead(run.workers[0])
    damaged = (ckpt / "step-00000008" / "model.safetensors").read_bytes()
    diff = [i for i in range(len(payload)) if damaged[i] != payload[i]]
    assert diff == [fault["offset"]]
    assert (ckpt / "step-00000004" / "model.safetensors").read_bytes() == payload
    assert (ckpt / "step-00000008" / "manifest.json").read_text() == "{}"


def test_kill_writer_takes_a_writer_stopped_just_after_its_rename(
    tmp_path: Path, fake_runs: list[FakeRun]
) -> None:
    """On a busy machine a whole checkpoint write can fall between two of the tool's looks, so
    it never sees the temp directory. A writer found stopped after this attempt committed a
    checkpoint (the store's after-rename pause hook) is still the one killed, and the step is
    this attempt's, not one an earlier attempt left."""
    run = FakeRun(tmp_path / "run")
    fake_runs.append(run)
    ckpt = run.run_dir / "checkpoints"
    earlier = ckpt / f"step-{500:08d}"  # a higher step, committed before this attempt
    earlier.mkdir(parents=True)
    os.utime(earlier, (time.time() - 100, time.time() - 100))
    EventLog(run.run_dir / "events.jsonl").emit("launch", attempt=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.chaos", str(run.run_dir), "--fault", "kill-writer"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        events = run.run_dir / "events.jsonl"
        deadline = time.monotonic() + 30
        while not any(e["type"] == "chaos_started" for e in read_jsonl(events)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.02)
        writer = run.workers[0]
        (ckpt / f"step-{4:08d}").mkdir()
        os.kill(writer, signal.SIGSTOP)  # as if paused right after renaming step 4 into place
        assert dead(writer, timeout=20)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (fault,) = injected(run.run_dir)
    assert fault["kind"] == "kill-writer" and fault["pid"] == writer
    assert fault["renamed"] and fault["writer_paused_itself"] and fault["temp_dir"] is None
    assert fault["writing_step"] == 4


def test_fill_disk_refuses_to_fill_a_large_disk(tmp_path: Path, fake_runs: list[FakeRun]) -> None:
    run = FakeRun(tmp_path / "run")
    fake_runs.append(run)
    (run.run_dir / "checkpoints").mkdir()
    res = tool(run.run_dir, "--fault", "fill-disk", "--fill-limit", "4096")
    assert res.returncode == 2
    assert "--fill-limit" in res.stderr and "tmpfs" in res.stderr
    assert not list((run.run_dir / "checkpoints").iterdir())


WRITER = """
import sys
from pathlib import Path
from runcontract.events import EventWriter
log = EventWriter(Path(sys.argv[1]), source="chaos")
for i in range(int(sys.argv[2])):
    log.write("fault_injected", i=i, pad="y" * (200 + (i * 37) % 3000))
"""


def test_event_lines_never_interleave_with_the_supervisors(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    n = 1500
    other = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(n)],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    log = EventLog(path, console=None)
    try:
        for i in range(n):
            log.emit("heartbeat_seen", i=i, pad="x" * (200 + (i * 53) % 3000))
    finally:
        log.close()
        assert other.wait(timeout=60) == 0
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # a torn line would not parse
    assert len(records) == 2 * n
    assert [r["i"] for r in records if r["type"] == "fault_injected"] == list(range(n))
    assert [r["i"] for r in records if r["type"] == "heartbeat_seen"] == list(range(n))


def test_spec_syntax() -> None:
    assert chaos.spec_to_argv("kill-worker:every=30:count=3:seed=7") == [
        "--fault", "kill-worker", "--every", "30", "--count", "3", "--seed", "7",
    ]  # fmt: skip
    assert chaos.spec_to_argv("hang,corrupt:at-steps=100,250") == [
        "--fault", "hang,corrupt", "--at-steps", "100,250",
    ]  # fmt: skip
    config = chaos.parse_spec("random:every=5", Path("runs/x"))
    assert config.faults == ("random",) and config.every == 5.0 and config.planned is None
    for bad, word in [
        ("", "no fault kind"),
        ("kill-worker:often=3", "often"),
        ("explode", "unknown kind"),
        ("kill-worker:every=0", "--every"),
        ("kill-worker:every=3:at-steps=4", "not allowed"),
    ]:
        with pytest.raises(ValueError, match=word):
            chaos.parse_spec(bad, Path("runs/x"))


def test_config_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"at_steps=\[9, 3\]"):
        chaos.ChaosConfig(Path("r"), at_steps=(9, 3))
    with pytest.raises(ValueError, match="count=4: more than the 2 steps"):
        chaos.ChaosConfig(Path("r"), at_steps=(3, 9), count=4)
    assert chaos.ChaosConfig(Path("r"), at_steps=(3, 9)).planned == 2
    assert chaos.ChaosConfig(Path("r")).planned == 1
    res = subprocess.run(
        [sys.executable, "-m", "tools.chaos", "runs/x", "--at-steps", "a,b"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "--at-steps 'a,b'" in res.stderr


def test_spawn_runs_the_tool_beside_a_run(tmp_path: Path, fake_runs: list[FakeRun]) -> None:
    run = FakeRun(tmp_path / "run")
    fake_runs.append(run)
    proc = chaos.spawn(run.run_dir, "kill-worker:seed=2", cwd=REPO_ROOT)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        chaos.stop_spawned(proc)
    (fault,) = injected(run.run_dir)
    assert dead(fault["pid"])
    # One that would wait long is stopped cleanly: it says so, and exits 3.
    idle = chaos.spawn(run.run_dir, "hang:every=300", cwd=REPO_ROOT)
    deadline = time.monotonic() + 30
    while not any(
        e["type"] == "chaos_started" and e["pid"] == idle.pid
        for e in read_jsonl(run.run_dir / "events.jsonl")
    ):
        assert time.monotonic() < deadline and idle.poll() is None
        time.sleep(0.05)
    assert chaos.stop_spawned(idle, timeout=20) == 3
    finished = [
        e for e in read_jsonl(run.run_dir / "events.jsonl") if e["type"] == "chaos_finished"
    ]
    assert finished[-1]["reason"] == "stopped by a signal" and finished[-1]["injected"] == 0


def _multi_node_dir(run_dir: Path, tags: tuple[str, ...] = ("node0", "node1")) -> Path:
    """A run directory as two node supervisors leave it (state and event files per node)."""
    run_dir.mkdir(parents=True)
    for tag in tags:
        (run_dir / f"supervisor-{tag}.json").write_text(json.dumps({"state": "running"}))
        (run_dir / f"events-{tag}.jsonl").write_text("")
    return run_dir


def test_a_multi_node_run_dir_without_node_is_refused_naming_the_nodes(tmp_path: Path) -> None:
    run_dir = _multi_node_dir(tmp_path / "run", ("node0", "node1", "node10", "node2"))
    injector = chaos.Injector(chaos.ChaosConfig(run_dir), console=None)
    with pytest.raises(chaos.ChaosError, match="nodes: node0, node1, node2, node10") as err:
        injector.run()
    assert "--node TAG" in str(err.value)
    # Refused before anything was logged anywhere: no event file gained a line or appeared.
    assert not (run_dir / "events.jsonl").exists()
    assert all(p.read_text() == "" for p in run_dir.glob("events-*.jsonl"))


def test_a_bad_node_names_the_nodes_that_exist(tmp_path: Path) -> None:
    run_dir = _multi_node_dir(tmp_path / "run")
    config = chaos.ChaosConfig(run_dir, node="node7", wait_start=0.3, poll_interval=0.02)
    with pytest.raises(chaos.ChaosError) as err:
        chaos.Injector(config, console=None).run()
    message = str(err.value)
    assert "--node node7" in message and "supervisor-node7.json" in message
    assert "its nodes are node0, node1" in message
    assert not (run_dir / "events-node7.jsonl").exists()


def test_node_on_a_one_node_run_dir_and_a_malformed_tag_are_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "supervisor.json").write_text(json.dumps({"state": "running"}))
    config = chaos.ChaosConfig(run_dir, node="node1", wait_start=5)
    with pytest.raises(chaos.ChaosError, match="one-node run directory.*leave out --node"):
        chaos.Injector(config, console=None).run()
    with pytest.raises(ValueError, match=r"node='\.\./x': not a node tag"):
        chaos.ChaosConfig(run_dir, node="../x")
    with pytest.raises(chaos.UsageError, match=r"^--node '\.\./x': not a node tag"):
        chaos.config_from_args(chaos.build_parser().parse_args([str(run_dir), "--node", "../x"]))


def test_a_node_view_reads_and_writes_that_nodes_files(tmp_path: Path) -> None:
    run_dir = _multi_node_dir(tmp_path / "run")
    (run_dir / "supervisor-node1.json").write_text(json.dumps({"state": "running", "attempt": 3}))
    injector = chaos.Injector(chaos.ChaosConfig(run_dir, node="node1"), console=None)
    assert injector.view.state() == {"state": "running", "attempt": 3}
    assert injector.view.lock_path.name == "supervisor-node1.lock"
    injector.events.emit("probe")
    assert [e["type"] for e in read_jsonl(run_dir / "events-node1.jsonl")] == ["probe"]
    assert (run_dir / "events-node0.jsonl").read_text() == ""
    # launch.py --chaos passes its own node: the spec's configuration carries it.
    assert chaos.parse_spec("kill-worker:seed=1", run_dir, "node1").node == "node1"
    assert chaos.parse_spec("kill-worker", run_dir).node is None


def test_spawn_for_a_node_attacks_that_node(tmp_path: Path) -> None:
    """What ``launch.py --chaos`` does on a multi-node supervisor: the tool gets its node, reads
    that node's state (here: a finished run, so it stops at once) and logs to its events file."""
    run_dir = _multi_node_dir(tmp_path / "run")
    (run_dir / "supervisor-node1.json").write_text(json.dumps({"state": "succeeded"}))
    proc = chaos.spawn(run_dir, "kill-worker:seed=4", node="node1", cwd=REPO_ROOT)
    try:
        assert proc.wait(timeout=60) == chaos.EXIT_NOT_DONE
    finally:
        chaos.stop_spawned(proc)
    finished = [e["type"] for e in read_jsonl(run_dir / "events-node1.jsonl")]
    assert finished == ["chaos_started", "chaos_finished"]
    assert (run_dir / "events-node0.jsonl").read_text() == ""
