"""trainer.save_policy and supervisor.failure_history: the measured cost of saves, the cheaper
disk mode, Young/Daly intervals and the failure history they draw on, on a fake clock."""

from __future__ import annotations

import math
from typing import Any

import pytest

from runcontract import env
from supervisor.failure_history import failure_history
from trainer import save_policy
from trainer.save_policy import ASYNC, SYNC, Mtbf, SavePolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _policy(
    ckpt_every: int | None = None,
    mem_every: int | None = None,
    mode: str = "auto",
    mtbf: Mtbf | None = None,
    mem_budget: float = 0.0,
) -> tuple[SavePolicy, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    clock = Clock()
    policy = SavePolicy(
        ckpt_every=ckpt_every,
        mem_every=mem_every,
        mode=mode,
        mtbf=mtbf or Mtbf(prior=3600.0, clock=clock, started=clock()),
        emit=lambda type_, **fields: events.append((type_, fields)),
        mem_budget=mem_budget,
        clock=clock,
    )
    return policy, events


def _steps(policy: SavePolicy, n: int, seconds: float = 0.1, busy: bool = False) -> None:
    for _ in range(n):
        policy.on_step(seconds, writer_busy=busy)


def test_mtbf_is_the_prior_until_a_failure_then_run_time_over_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    assert Mtbf(prior=3600.0, clock=clock, started=clock()).value() == 3600.0
    # No failure in longer than the prior: at least that long.
    assert Mtbf(prior=3600.0, seconds=5000.0, clock=clock, started=clock()).value() == 5000.0
    seen = Mtbf(prior=3600.0, failures=4, seconds=100.0, clock=clock, started=clock())
    assert seen.value() == 25.0
    clock.now += 20.0  # this attempt's own time counts too
    assert seen.value() == 30.0
    monkeypatch.setenv(env.FAILURES, "2")
    monkeypatch.setenv(env.RUN_SECONDS, "60.0")
    assert Mtbf.from_env(3600.0, clock).value() == 30.0
    for failures, seconds in (("x", "1"), ("1", "nan"), ("-3", "-9")):
        monkeypatch.setenv(env.FAILURES, failures)
        monkeypatch.setenv(env.RUN_SECONDS, seconds)
        assert Mtbf.from_env(3600.0, clock).value() == 3600.0, (failures, seconds)


def test_fixed_intervals_are_due_on_multiples_whatever_is_measured() -> None:
    policy, events = _policy(ckpt_every=4, mem_every=3, mode=ASYNC)
    due = [s for s in range(1, 13) if policy.disk_due(s)]
    assert due == [4, 8, 12]
    assert [s for s in range(1, 10) if policy.memory_due(s)] == [3, 6, 9]
    policy.disk_saved(4, ASYNC, 0.5)
    policy.writer_done(4, 2.0)
    assert [s for s in range(5, 13) if policy.disk_due(s)] == [8, 12]
    assert policy.disk_mode() == ASYNC and events == []
    assert [s for s in range(1, 5) if _policy(ckpt_every=0)[0].disk_due(s)] == []


def test_auto_mode_measures_both_then_keeps_the_cheaper_and_says_why() -> None:
    policy, events = _policy(ckpt_every=1)
    _steps(policy, 20, seconds=0.1)
    assert policy.disk_mode() == ASYNC  # first measured: async
    policy.disk_saved(1, ASYNC, blocked=0.01)
    # The writer competes with the loop: three steps took 0.3 s longer each.
    _steps(policy, 3, seconds=0.4, busy=True)
    policy.writer_done(1, write_seconds=1.0)
    assert policy.costs[ASYNC].mean() == pytest.approx(0.01 + 3 * 0.3)
    assert policy.disk_mode() == SYNC  # then sync
    policy.disk_saved(2, SYNC, blocked=0.2)
    (kind, chosen), *_ = [e for e in events if e[0] == "checkpoint_mode"]
    assert kind == "checkpoint_mode" and chosen["mode"] == SYNC
    assert chosen["sync_cost"] == pytest.approx(0.2)
    assert chosen["async_cost"] == pytest.approx(0.91)
    # From now on the cheaper one, except a probe of the other after PROBE_EVERY saves, then
    # after twice as many each time a probe confirms the choice.
    modes = []
    for step in range(3, 3 + 8 * save_policy.PROBE_EVERY):
        mode = policy.disk_mode()
        modes.append(mode)
        policy.disk_saved(step, mode, blocked=0.2 if mode == SYNC else 0.01)
        if mode == ASYNC:
            _steps(policy, 3, seconds=0.4, busy=True)
            policy.writer_done(step, 1.0)
    probes = [i + 3 for i, m in enumerate(modes) if m == ASYNC]  # save k is at step k
    every = save_policy.PROBE_EVERY
    first = 2 + every + 1  # the choice after save 2, then every saves
    assert probes == [first, first + 2 * every + 1, first + 6 * every + 2]
    assert policy.mode == SYNC


def test_auto_mode_switches_when_the_load_changes() -> None:
    policy, events = _policy(ckpt_every=1)
    _steps(policy, 10)
    policy.disk_saved(1, policy.disk_mode(), blocked=0.01)
    policy.writer_done(1, 0.5)  # async: nothing lost by the steps
    policy.disk_saved(2, policy.disk_mode(), blocked=0.3)  # sync: dearer
    assert policy.mode == ASYNC
    # The disk slows the loop down: the next async saves cost more than sync did.
    for step in range(3, 12):
        mode = policy.disk_mode()
        policy.disk_saved(step, mode, blocked=0.3 if mode == SYNC else 0.01)
        if mode == ASYNC:
            _steps(policy, 4, seconds=0.3, busy=True)
            policy.writer_done(step, 2.0)
    assert policy.mode == SYNC
    switches = [f for t, f in events if t == "checkpoint_mode" and f["previous"] != f["mode"]]
    assert switches and switches[-1]["mode"] == SYNC


def test_fixed_mode_is_never_probed() -> None:
    policy, events = _policy(ckpt_every=1, mode=SYNC)
    for step in range(1, 30):
        assert policy.disk_mode() == SYNC
        policy.disk_saved(step, SYNC, 0.1)
    assert not [e for e in events if e[0] == "checkpoint_mode"]


def test_auto_interval_follows_young_daly_and_its_bounds() -> None:
    clock = Clock()
    mtbf = Mtbf(prior=3600.0, failures=1, seconds=200.0, clock=clock, started=clock())
    policy, events = _policy(mode=SYNC, mtbf=mtbf)
    assert not policy.disk_due(1)  # nothing trained yet
    _steps(policy, 30, seconds=0.1)  # 3 s of training: the first save is due
    assert policy.disk_due(30)
    policy.disk_saved(30, SYNC, blocked=0.25)
    expected = round(math.sqrt(2 * 0.25 * 200.0) / 0.1)  # 10 s of 0.1-s steps
    assert policy.disk.current == expected == 100
    assert not policy.disk_due(129) and policy.disk_due(130)
    ((kind, fields),) = [e for e in events if e[1].get("tier") == "disk"]
    assert kind == "checkpoint_interval" and fields["every"] == 100 and fields["mtbf"] == 200.0
    # A cheaper tier gets a shorter interval, never under one step.
    policy.memory_saved(30, 0.0)
    assert policy.memory.current == 1
    # At most MAX_INTERVAL_SECONDS, however rare the failures.
    calm, _ = _policy(mode=SYNC, mtbf=Mtbf(prior=1e9, clock=clock, started=clock()))
    _steps(calm, 30)
    calm.disk_saved(30, SYNC, blocked=10.0)
    assert calm.disk.current == round(save_policy.MAX_INTERVAL_SECONDS / 0.1)


def test_a_memory_budget_snapshots_as_often_as_it_allows() -> None:
    policy, events = _policy(mode=SYNC, mem_budget=0.02)
    assert not policy.memory_due(0)  # nothing trained yet
    _steps(policy, 1, seconds=0.1)
    assert policy.memory_due(1)  # the first snapshot at the first step, not after 2 s
    # 4 ms a snapshot at 2 % of the loop: one every 0.2 s, 2 steps of 0.1 s. Young and Daly
    # alone would wait sqrt(2 x 0.004 x 3600) = 5.4 s.
    policy.memory_saved(1, 0.004)
    assert policy.memory.current == 2 and policy.memory_due(3) and not policy.memory_due(2)
    ((kind, fields),) = [e for e in events if e[1].get("tier") == "memory"]
    assert fields["rule"] == "cost / mem_budget" and fields["seconds"] == 0.2
    # A snapshot too dear for the budget is placed by Young and Daly, as without one.
    _steps(policy, 2)
    for _ in range(save_policy.COST_WINDOW):
        policy.memory_saved(3, 40.0)
    assert policy.memory.current == round(math.sqrt(2 * 40.0 * 3600) / 0.1)
    assert [e for e in events if e[1].get("tier") == "memory"][-1][1]["rule"] == (
        "sqrt(2 x cost x mtbf)"
    )
    # No budget: Young and Daly alone, and the first snapshot after 2 s of training.
    plain, _ = _policy(mode=SYNC)
    _steps(plain, 1, seconds=0.1)
    assert not plain.memory_due(1)
    _steps(plain, 20, seconds=0.1)
    assert plain.memory_due(21)
    plain.memory_saved(21, 0.004)
    assert plain.memory.current == round(math.sqrt(2 * 0.004 * 3600) / 0.1)


def test_the_memory_cost_is_the_mean_of_many_without_the_snapshots_that_made_slots() -> None:
    policy, _ = _policy(mode=SYNC, mem_budget=0.02)
    _steps(policy, 10, seconds=0.1)
    policy.memory_saved(10, 0.05)  # makes the first slot: its files, mapped
    assert policy.memory.current == round(0.05 / 0.02 / 0.1)  # all there is to go by
    policy.memory_saved(35, 0.03)  # makes the second
    # The first rewrite of a slot: only what rewriting costs counts from now on.
    policy.memory_saved(50, 0.002)
    assert list(policy.costs["memory"].samples) == [0.002]
    # A long tail is paid in full: 15 snapshots of 1 ms and 5 of 5 ms cost 2 ms each on
    # average (their median says 1 ms).
    for _ in range(15):
        policy.memory_saved(60, 0.001)
    for _ in range(5):
        policy.memory_saved(60, 0.005)
    assert len(policy.costs["memory"].samples) == save_policy.MEMORY_COST_WINDOW
    assert policy.costs["memory"].mean() == pytest.approx(0.002)
    assert policy.memory.current == 1  # 2 ms / 2 % = 0.1 s: one step


def test_an_async_interval_is_never_shorter_than_a_write() -> None:
    policy, _ = _policy(mode=ASYNC)
    _steps(policy, 30, seconds=0.1)
    policy.disk_saved(30, ASYNC, blocked=0.001)
    # Until the writer is done, the next save is not placed (its cost is unknown).
    assert not any(policy.disk_due(s) for s in range(31, 500))
    policy.writer_done(30, write_seconds=20.0)
    # sqrt(2 x 0.001 x 3600) = 2.7 s, but a write takes 20 s: 200 steps of 0.1 s.
    assert policy.disk.current == 200


def test_a_skipped_save_waits_for_the_interval_not_the_next_step() -> None:
    policy, _ = _policy(mode=SYNC)
    _steps(policy, 30)
    policy.disk_saved(30, SYNC, 0.05)
    every = policy.disk.current
    assert every is not None
    policy.disk_skipped(30 + every)
    assert not policy.disk_due(31 + every) and policy.disk_due(30 + 2 * every)


def test_failure_history_counts_failures_and_attempt_time_across_supervisors() -> None:
    events = [
        {"type": "supervisor_started", "time": 0.0},
        {"type": "launch", "time": 1.0},
        {"type": "checkpoint_saved", "time": 5.0, "source": "trainer"},
        {"type": "worker_failed", "time": 11.0, "source": "worker"},
        {"type": "stopped", "time": 12.0},
        {"type": "launch", "time": 13.0},
        {"type": "hang_detected", "time": 20.0},
        {"type": "stopped", "time": 23.0},
        {"type": "launch", "time": 24.0},
        {"type": "interrupted", "time": 30.0},  # a preemption: not a failure
        {"type": "stopped", "time": 34.0},
        {"type": "launch", "time": 100.0},
        {"type": "fault_injected", "time": 101.0, "source": "chaos"},
        # The supervisor was SIGKILLed: the next one's start ends this attempt's time.
        {"type": "supervisor_started", "time": 110.0},
        {"type": "launch", "time": 111.0},
    ]
    history = failure_history(events)
    assert history.failures == 2
    assert history.seconds == pytest.approx(11 + 10 + 10 + 10)
    assert history.environment() == {
        env.FAILURES: "2",
        env.RUN_SECONDS: "41.0",
        env.MEMORY_RECOVERIES: "0",
    }


def test_failure_history_counts_the_failures_the_memory_tier_recovered() -> None:
    def failure(at: float) -> list[dict[str, Any]]:
        return [
            {"type": "launch", "time": at},
            {"type": "worker_failed", "time": at + 5, "source": "worker"},
            {"type": "stopped", "time": at + 6},
        ]

    def selected(at: float, tier: str | None) -> dict[str, Any]:
        return {"type": "checkpoint_selected", "time": at, "tier": tier}

    events = [
        {"type": "supervisor_started", "time": 0.0},
        selected(0.5, None),  # the first launch: no failure before it
        *failure(1.0),
        selected(7.0, "memory"),  # recovered from memory
        *failure(8.0),
        selected(14.0, "disk"),  # memory had nothing newer, or was lost with the node
        *failure(15.0),
        selected(21.0, None),  # nothing to resume from at all
        *failure(22.0),
        {"type": "hang_detected", "time": 28.0},  # two failures, one choice: both from memory
        selected(29.0, "memory"),
        *failure(30.0),  # not resumed yet: not counted either way
    ]
    history = failure_history(events)
    assert (history.failures, history.memory_recoveries) == (6, 3)
    assert history.environment()[env.MEMORY_RECOVERIES] == "3"


def test_the_disk_interval_counts_only_failures_the_memory_tier_did_not_recover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    # 400 s, 4 failures, 3 of them resumed from memory: M 100 s over all, 400 s for the disk.
    mtbf = Mtbf(
        prior=3600.0, failures=4, seconds=400.0, memory_recoveries=3, clock=clock, started=clock()
    )
    assert mtbf.value() == 100.0 and mtbf.value(beyond_memory=True) == 400.0
    policy, events = _policy(mode=SYNC, mtbf=mtbf, mem_budget=0.0)
    policy.memory_covers = True
    _steps(policy, 30, seconds=0.1)
    policy.disk_saved(30, SYNC, blocked=0.02)
    policy.memory_saved(30, 0.005)
    assert policy.disk.current == round(math.sqrt(2 * 0.02 * 400.0) / 0.1) == 40  # 4 s
    assert policy.memory.current == round(math.sqrt(2 * 0.005 * 100.0) / 0.1) == 10  # 1 s
    disk = [f for _, f in events if f.get("tier") == "disk"]
    assert disk[-1]["mtbf"] == 400.0 and disk[-1]["mtbf_of"] == "failures not recovered from memory"
    # The memory tier stops (a snapshot could not be written): every failure counts again, and
    # the next disk save is placed anew from now, not 40 steps after the last.
    policy.memory_off(35)
    assert policy.disk.current == round(math.sqrt(2 * 0.02 * 100.0) / 0.1) == 20  # 2 s
    assert policy.disk_due(55) and not policy.disk_due(54)
    latest = [f for _, f in events if f.get("tier") == "disk"][-1]
    assert latest["mtbf"] == 100.0 and latest["mtbf_of"] == "all failures"
    # Without a memory tier the disk always counts every failure.
    plain, _ = _policy(mode=SYNC, mtbf=mtbf)
    _steps(plain, 30, seconds=0.1)
    plain.disk_saved(30, SYNC, blocked=0.02)
    assert plain.disk.current == 20
    # From the supervisor's variables; a count above the failures is not believed.
    monkeypatch.setenv(env.FAILURES, "4")
    monkeypatch.setenv(env.RUN_SECONDS, "400.0")
    for recovered, expected in (("3", 400.0), ("0", 100.0), ("9", 100.0), ("-1", 100.0)):
        monkeypatch.setenv(env.MEMORY_RECOVERIES, recovered)
        assert Mtbf.from_env(3600.0, clock).value(beyond_memory=True) == expected, recovered
    monkeypatch.setenv(env.MEMORY_RECOVERIES, "x")
    assert Mtbf.from_env(3600.0, clock).value(beyond_memory=True) == 3600.0  # all malformed


def test_auto_mode_measures_both_ways_early_then_spaces_saves_by_young_daly() -> None:
    policy, events = _policy()  # --ckpt-mode auto, --ckpt-every auto
    _steps(policy, 20, seconds=0.1)  # 2 s: the first save
    assert policy.disk_due(20) and policy.disk_mode() == ASYNC
    policy.disk_saved(20, ASYNC, 0.01)
    _steps(policy, 2, seconds=0.1, busy=True)
    policy.writer_done(20, 0.15)
    # The sync measurement comes one first save's time later, not a whole interval.
    assert policy.disk_due(40) and not policy.disk_due(39)
    assert policy.disk_mode() == SYNC
    policy.disk_saved(40, SYNC, 0.5)
    assert policy.mode == ASYNC
    # Both known: Young/Daly from the cheaper (async: 0.01 s), M the prior 3600 s.
    assert policy.disk.current == round(math.sqrt(2 * 0.01 * 3600) / 0.1)
    assert [e[1]["mode"] for e in events if e[0] == "checkpoint_mode"] == [ASYNC]
