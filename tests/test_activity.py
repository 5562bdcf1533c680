"""Hang detection without heartbeats (supervisor/activity.py), on a fake clock: the ranks'
CPU seconds are scripted, the processes are real (their state is read)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor import activity
from supervisor.activity import ActivityMonitor
from supervisor.proctree import Worker

TIMEOUT = 30.0


class Ranks:
    """Sleeping processes standing in for ranks, with CPU seconds the test sets."""

    def __init__(self, n: int) -> None:
        self.procs = [
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            for _ in range(n)
        ]
        self.workers = [
            Worker(psutil.Process(p.pid), rank, rank) for rank, p in enumerate(self.procs)
        ]
        self.cpu = {p.pid: 0.0 for p in self.procs}
        self.now = 0.0

    def spend(self, seconds: float, share_of_a_core: float) -> None:
        """``seconds`` pass while each rank uses ``share_of_a_core``."""
        self.now += seconds
        for pid in self.cpu:
            self.cpu[pid] += seconds * share_of_a_core


MakeRanks = Callable[[int], Ranks]


@pytest.fixture
def ranks(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeRanks]:
    made: list[Ranks] = []

    def make(n: int) -> Ranks:
        r = Ranks(n)
        made.append(r)
        monkeypatch.setattr(activity, "_cpu_seconds", lambda proc: r.cpu.get(proc.pid))
        return r

    yield make
    for r in made:
        for p in r.procs:
            p.kill()
            p.wait()


def _watch(r: Ranks, share: float, live: list[Worker], seconds: float = 40.0) -> list[float]:
    """Looks every 2 s for ``seconds`` at ``share`` of a core per rank: when each hang came."""
    monitor = ActivityMonitor(TIMEOUT, clock=lambda: r.now)
    hangs = []
    monitor.look(live, [])
    while r.now < seconds:
        r.spend(2.0, share)
        hang = monitor.look(live, [])
        if hang is not None:
            assert hang.phase == "idle" and hang.stalled_for > TIMEOUT
            hangs.append(r.now)
    return hangs


def test_ranks_at_work_are_not_idle(ranks: MakeRanks) -> None:
    r = ranks(2)
    assert _watch(r, 0.5, r.workers) == []


def test_ranks_that_spend_only_their_librarys_polling_are_idle(ranks: MakeRanks) -> None:
    # 1.2 % of a core each: what a gloo rank stuck for good was measured to spend.
    r = ranks(4)
    assert _watch(r, 0.012, r.workers)[0] == pytest.approx(32.0)


def test_the_last_rank_stuck_after_its_peer_exited_is_idle(ranks: MakeRanks) -> None:
    # Its peer exited 0; it hangs in destroy_process_group(), polling at 1.2 % of a core.
    r = ranks(2)
    assert _watch(r, 0.012, r.workers[1:])[0] == pytest.approx(32.0)


def test_output_is_activity(ranks: MakeRanks, tmp_path: Path) -> None:
    r = ranks(1)
    log = tmp_path / "run-id" / "attempt_0" / "0" / "stdout.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    monitor = ActivityMonitor(TIMEOUT, output_dir=tmp_path, clock=lambda: r.now)
    monitor.look(r.workers, [])
    for i in range(20):
        r.spend(2.0, 0.0)
        if i % 10 == 0:
            with log.open("a") as f:
                f.write("still here\n")
        assert monitor.look(r.workers, []) is None
