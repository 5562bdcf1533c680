"""supervisor.heartbeat: hang detection from real heartbeat files, driven by a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.heartbeat import HangConfig, HeartbeatMonitor
from trainer import supervised


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _setup(
    tmp_path: Path, **cfg
) -> tuple[HeartbeatMonitor, Clock, dict[int, supervised.Heartbeat]]:
    clock = Clock()
    env = supervised.SupervisedEnv(
        run_dir=tmp_path,
        attempt=2,
        resume_from=None,
        heartbeat_dir=tmp_path / "heartbeats",
        supervisor_pid=0,
    )
    beats = {r: supervised.Heartbeat(r, env=env, min_interval=0.0) for r in (0, 1)}
    monitor = HeartbeatMonitor(tmp_path / "heartbeats", 2, HangConfig(**cfg), clock.now, clock)
    return monitor, clock, beats


def test_explicit_timeout_detects_a_stalled_rank(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_timeout=5.0)
    for step in range(1, 4):
        beats[0](step)
        beats[1](step)
        clock.now += 1.0
        monitor.poll()
        assert monitor.check([]) is None
    # Rank 1 stops; rank 0 goes on.
    for step in range(4, 12):
        beats[0](step)
        clock.now += 1.0
        monitor.poll()
    hang = monitor.check([])
    assert hang is not None
    assert hang.rank == 1
    assert hang.step == 3
    assert hang.phase == "train"
    assert hang.timeout == 5.0
    assert hang.stalled_for > 5.0
    assert monitor.max_step() == 11


def test_derived_timeout_uses_floor_and_slowest_step(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_floor=3.0, hang_factor=10.0)
    assert monitor.hang_timeout() == 3.0  # nothing observed yet: the floor
    assert monitor.timeout_to_log() == 3.0
    beats[0](1)
    monitor.poll()
    # Fake a slow step by rewriting the worker's own timestamps through two real beats.
    import json

    path = tmp_path / "heartbeats" / "rank-0.json"
    rec = json.loads(path.read_text())
    rec.update(step=2, time=rec["time"] + 0.8)
    path.write_text(json.dumps(rec))
    clock.now += 0.8
    monitor.poll()
    assert monitor.hang_timeout() == pytest.approx(8.0)
    assert monitor.timeout_to_log() == pytest.approx(8.0)
    assert monitor.timeout_to_log() is None  # unchanged: not logged twice


def test_checkpoint_phase_gets_the_longer_allowance(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_timeout=2.0, checkpoint_timeout=20.0)
    beats[0](5, phase="checkpoint")
    monitor.poll()
    clock.now += 10.0
    monitor.poll()
    assert monitor.check([]) is None
    clock.now += 11.0
    hang = monitor.check([])
    assert hang is not None and hang.phase == "checkpoint" and hang.timeout == 20.0


def test_startup_allowance_counts_from_launch(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_timeout=1.0, startup_timeout=30.0)
    beats[0](0, phase="startup")
    clock.now += 20.0
    monitor.poll()
    assert monitor.check([]) is None
    clock.now += 11.0
    hang = monitor.check([])
    assert hang is not None and hang.phase == "startup" and hang.rank == 0


def test_done_rank_never_hangs(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_timeout=1.0)
    beats[0](9, phase="done")
    monitor.poll()
    clock.now += 100.0
    assert monitor.check([]) is None


def test_other_attempts_and_foreign_pids_are_ignored(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_timeout=1.0)
    beats[0](3)
    monitor.poll(worker_pids=[123456789])  # not our worker: ignored
    assert monitor.ranks == {}
    old = supervised.Heartbeat(
        1,
        env=supervised.SupervisedEnv(tmp_path, 1, None, tmp_path / "heartbeats", 0),
    )
    old(50)
    monitor.poll()
    assert set(monitor.ranks) == {0}  # rank 1's file is from attempt 1


def test_silent_worker_among_beating_peers_hangs_after_startup(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_timeout=100.0, startup_timeout=5.0)
    beats[0](1)
    monitor.poll()
    clock.now += 6.0
    beats[0](2)
    monitor.poll()
    hang = monitor.check([beats[0]._pid, 999999])
    assert hang is not None and hang.rank is None and hang.pid == 999999


def test_no_heartbeats_at_all_disables_detection_unless_required(tmp_path: Path) -> None:
    monitor, clock, _ = _setup(tmp_path, startup_timeout=5.0)
    clock.now += 6.0
    monitor.poll()
    assert monitor.check([4242]) is None
    assert monitor.silent()
    strict, clock2, _ = _setup(tmp_path, startup_timeout=5.0, require_heartbeats=True)
    clock2.now += 6.0
    strict.poll()
    hang = strict.check([4242])
    assert hang is not None and hang.pid == 4242
    assert not strict.silent()


@pytest.mark.parametrize("field", ["hang_timeout", "hang_floor", "startup_timeout"])
def test_config_validation_names_the_field(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HangConfig(**{field: 0.0})


def test_peers_waiting_for_a_checkpointing_rank_get_the_checkpoint_allowance(
    tmp_path: Path,
) -> None:
    # Rank 0 writes a long checkpoint; rank 1 reported its step and now waits in the next
    # collective. Neither is hung until the checkpoint allowance runs out.
    monitor, clock, beats = _setup(tmp_path, hang_timeout=5.0, checkpoint_timeout=60.0)
    beats[0](4, phase="checkpoint")
    beats[1](4)
    monitor.poll()
    clock.now += 30.0
    monitor.poll()
    assert monitor.check([]) is None
    clock.now += 40.0  # past the checkpoint allowance: the writer is the one stuck
    monitor.poll()
    hang = monitor.check([])
    assert hang is not None and hang.timeout == 60.0
    # Once the checkpoint is done, ranks that stall are judged by the train allowance again.
    beats[0](4)
    monitor.poll()
    clock.now += 6.0
    monitor.poll()
    hang = monitor.check([])
    assert hang is not None and hang.timeout == 5.0


def test_a_peer_that_waited_out_a_checkpoint_is_not_hung_as_it_ends(tmp_path: Path) -> None:
    # The checkpoint ends; the poll sees the writer back in train before the peer's next step
    # shows. The peer waited 30 s, but all of it for the checkpoint: its stall starts now.
    monitor, clock, beats = _setup(tmp_path, hang_timeout=5.0, checkpoint_timeout=60.0)
    beats[0](4, phase="checkpoint")
    beats[1](4)
    monitor.poll()
    clock.now += 30.0
    beats[0](4)
    monitor.poll()
    assert monitor.check([]) is None
    clock.now += 4.0
    assert monitor.check([]) is None
    clock.now += 2.0  # then the train allowance holds again, for every rank
    hang = monitor.check([])
    assert hang is not None and hang.timeout == 5.0 and 5.0 < hang.stalled_for < 7.0


def test_the_rank_behind_is_blamed_before_peers_that_stalled_longer(tmp_path: Path) -> None:
    monitor, clock, beats = _setup(tmp_path, hang_timeout=5.0)
    beats[1](7)  # rank 1 reached step 7 first, then waits in step 8's all-reduce
    monitor.poll()
    clock.now += 1.0
    beats[0](6)  # rank 0 beat later, but is still at step 6: it holds rank 1
    monitor.poll()
    clock.now += 10.0
    hang = monitor.check([])
    assert hang is not None and hang.rank == 0 and hang.step == 6


def test_a_stopped_rank_is_blamed_before_peers_at_the_same_step(tmp_path: Path) -> None:
    """Both ranks stall at one step; the peer beat first (the longest stall), but the rank
    whose process is stopped is the root cause."""
    import signal
    import subprocess
    import sys

    import psutil

    from supervisor.proctree import Worker
    from supervisor.runner import _stopped_rank_first

    monitor, clock, beats = _setup(tmp_path, hang_timeout=5.0)
    beats[1](9)
    monitor.poll()
    clock.now += 1.0
    beats[0](9)
    monitor.poll()
    clock.now += 10.0
    hang = monitor.check([])
    assert hang is not None and hang.rank == 1  # by the stall alone
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    try:
        workers = [Worker(psutil.Process(p.pid), rank=r, local_rank=r) for r, p in enumerate(procs)]
        assert _stopped_rank_first(hang, workers, monitor) == hang  # none stopped: unchanged
        procs[0].send_signal(signal.SIGSTOP)
        while workers[0].proc.status() != psutil.STATUS_STOPPED:
            pass  # the kernel applies the stop asynchronously
        blamed = _stopped_rank_first(hang, workers, monitor)
        assert blamed.rank == 0 and blamed.pid == procs[0].pid and blamed.step == 9
        assert "stopped" in blamed.reason
    finally:
        for p in procs:
            p.kill()
            p.wait()
