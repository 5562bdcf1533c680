"""supervisor.loop: the state machine, driven by a scripted fake runner and a fake clock."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runcontract import exit_codes
from supervisor.attempt import Failure, Hang, Observation, Outcome, StopReport
from supervisor.config import LaunchConfig
from supervisor.events import EventLog, read_events
from supervisor.loop import Supervisor
from supervisor.policy import PolicyConfig
from supervisor.status import read_state


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)


RUNNING = Observation(Outcome.RUNNING)
DONE = Observation(Outcome.SUCCEEDED, step=10)


def crash(code: int = 1, rank: int = 1) -> Observation:
    return Observation(
        Outcome.FAILED,
        failure=Failure("worker", rank=rank, local_rank=rank, pid=100, exit_code=code),
    )


HANG = Observation(
    Outcome.HUNG,
    hang=Hang(rank=0, pid=7, step=4, phase="train", stalled_for=6, timeout=5, reason="x"),
)


class FakeRunner:
    """Each attempt replays its scripted observations; the last one repeats."""

    def __init__(self, attempts: list[list[Observation]], on_poll=None) -> None:
        self.attempts = attempts
        self.started: list[tuple[int, Path | None]] = []
        self.stops: list[tuple[float, bool]] = []
        self.forwarded = 0
        self.writing = False
        """What ``checkpointing`` says: a rank is writing a checkpoint."""
        self._script: list[Observation] = []
        self.on_poll = on_poll
        self.finished = False
        """What ``all_done`` answers: whether every rank reported ``done``."""

    def start(self, attempt: int, resume_from: Path | None) -> int:
        self.started.append((attempt, resume_from))
        self._script = list(self.attempts[attempt - 1])
        return 1000 + attempt

    def poll(self) -> Observation:
        if self.on_poll:
            self.on_poll(self)
        return self._script.pop(0) if len(self._script) > 1 else self._script[0]

    def forward_sigterm(self) -> int:
        self.forwarded += 1
        self._script = [Observation(Outcome.FAILED, failure=Failure("worker", exit_code=75))]
        return 2

    def stop(self, grace: float, already_signalled: bool = False) -> StopReport:
        self.stops.append((grace, already_signalled))
        return StopReport(terminated=2, killed=0, leftovers=0, seconds=0.1)

    def complete(self, failure: Failure) -> Failure:
        return failure

    def attempt_alive(self) -> bool:
        return self._script[0].outcome == Outcome.RUNNING

    def all_done(self) -> bool:
        return self.finished

    def launch_info(self) -> dict[str, Any]:
        return {"standby": False}

    def standby_state(self) -> dict[str, Any] | None:
        return None

    def checkpointing(self) -> bool:
        return self.writing

    def worker_pids(self) -> dict[str, int]:
        return (
            {"0": 11, "1": 12}
            if self._script and self._script[0].outcome == Outcome.RUNNING
            else {}
        )


def _supervisor(
    tmp_path: Path,
    runner: FakeRunner,
    checkpoints: list[Path | None] | None = None,
    **policy,
) -> tuple[Supervisor, Clock]:
    policy.setdefault("backoff_jitter", 0.0)
    policy.setdefault("backoff_initial", 1.0)
    config = LaunchConfig(
        script=tmp_path / "script.py",
        run_dir=tmp_path,
        policy=PolicyConfig(**policy),
        term_timeout=5.0,
    )
    sequence = list(checkpoints or [None])

    def select(run_dir: Path, on_event=None, **_tiers) -> Path | None:
        return sequence.pop(0) if len(sequence) > 1 else sequence[0]

    clock = Clock()
    events = EventLog(tmp_path / "events.jsonl", console=None)
    sup = Supervisor(config, runner, events, select=select, clock=clock, sleep=clock.sleep)
    return sup, clock


def _types(tmp_path: Path) -> list[str]:
    return [e["type"] for e in read_events(tmp_path / "events.jsonl")]


def test_success_first_time(tmp_path: Path) -> None:
    runner = FakeRunner([[RUNNING, RUNNING, DONE]])
    sup, _ = _supervisor(tmp_path, runner)
    assert sup.run() == exit_codes.SUCCESS
    types = _types(tmp_path)
    assert types[:3] == ["supervisor_started", "checkpoint_selected", "launch"]
    assert types[-1] == "done"
    assert "first_step" in types
    state = read_state(tmp_path)
    assert state["state"] == "succeeded" and state["exit_code"] == 0 and state["step"] == 10


def test_crash_then_recovery_resumes_from_newest_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "step-00000040"
    runner = FakeRunner([[RUNNING, crash(-9)], [RUNNING, DONE]])
    sup, clock = _supervisor(tmp_path, runner, checkpoints=[None, ckpt])
    assert sup.run() == exit_codes.SUCCESS
    assert runner.started == [(1, None), (2, ckpt)]
    # The survivors are killed at once: they hold nothing the restart needs.
    assert runner.stops == [(0.0, False)]
    events = read_events(tmp_path / "events.jsonl")
    types = [e["type"] for e in events]
    order = ["worker_failed", "stopping", "stopped", "backoff", "checkpoint_selected", "launch"]
    idx = [types.index(t, types.index("worker_failed")) for t in order]
    assert idx == sorted(idx)
    failed = next(e for e in events if e["type"] == "worker_failed")
    assert failed["rank"] == 1 and failed["exit_code"] == -9 and failed["signal"] == "SIGKILL"
    backoff = next(e for e in events if e["type"] == "backoff")
    assert backoff["delay"] == 0.0 and backoff["progressed"] is True  # progress: at once
    selected = [e for e in events if e["type"] == "checkpoint_selected"]
    assert selected[-1]["step"] == 40 and selected[-1]["path"] == str(ckpt)


def test_budget_exhausted_after_exactly_n_plus_one_attempts(tmp_path: Path) -> None:
    runner = FakeRunner([[crash()]] * 10)
    sup, _ = _supervisor(tmp_path, runner, max_restarts=3, crash_loop=0)
    assert sup.run() == exit_codes.BUDGET_EXHAUSTED
    assert len(runner.started) == 4
    types = _types(tmp_path)
    assert types.count("launch") == 4 and types.count("backoff") == 3
    assert types[-1] == "budget_exhausted"
    assert read_state(tmp_path)["restarts_left"] == 0


def test_crash_loop_guard_stops_before_budget(tmp_path: Path) -> None:
    runner = FakeRunner([[crash()]] * 10)
    sup, _ = _supervisor(tmp_path, runner, max_restarts=9, crash_loop=2)
    assert sup.run() == exit_codes.CRASH_LOOP
    assert len(runner.started) == 2
    assert _types(tmp_path)[-1] == "crash_loop"


def test_hang_is_stopped_and_restarted(tmp_path: Path) -> None:
    runner = FakeRunner([[RUNNING, HANG], [DONE]])
    sup, _ = _supervisor(tmp_path, runner)
    assert sup.run() == exit_codes.SUCCESS
    events = read_events(tmp_path / "events.jsonl")
    hang = next(e for e in events if e["type"] == "hang_detected")
    assert hang["rank"] == 0 and hang["step"] == 4 and hang["timeout"] == 5
    assert len(runner.started) == 2


def test_worker_bad_input_is_not_retried(tmp_path: Path) -> None:
    runner = FakeRunner([[crash(2)], [DONE]])
    sup, _ = _supervisor(tmp_path, runner)
    assert sup.run() == exit_codes.WORKER_BAD_INPUT
    assert len(runner.started) == 1
    assert _types(tmp_path)[-1] == "fatal"


def test_a_diverged_worker_stops_the_run_with_its_own_code_and_step(tmp_path: Path) -> None:
    def diverge(runner: FakeRunner) -> None:
        if not (tmp_path / "events.jsonl").read_text().count('"diverged"'):
            # What the trainer's rank 0 appends to the supervisor's log before exiting 74.
            with open(tmp_path / "events.jsonl", "a") as f:
                f.write(json.dumps({"time": 1.0, "type": "diverged", "step": 13}) + "\n")

    runner = FakeRunner([[crash(74)], [DONE]], on_poll=diverge)
    sup, _ = _supervisor(tmp_path, runner, max_restarts=5)
    assert sup.run() == exit_codes.DIVERGED
    assert len(runner.started) == 1  # no restart: the same data would diverge again
    fatal = read_events(tmp_path / "events.jsonl")[-1]
    assert fatal["type"] == "fatal" and fatal["exit_code"] == 74 and fatal["step"] == 13
    assert "diverged" in fatal["reason"] and sup.exit_reason.endswith("at step 13")
    assert read_state(tmp_path)["restarts_used"] == 0


def test_signal_while_running_forwards_sigterm_and_exits_interrupted(tmp_path: Path) -> None:
    polls = []

    def on_poll(runner: FakeRunner) -> None:
        polls.append(1)
        if len(polls) == 3:
            sup.request_stop(signal.SIGTERM)

    runner = FakeRunner([[RUNNING]], on_poll=on_poll)
    sup, _ = _supervisor(tmp_path, runner)
    assert sup.run() == exit_codes.INTERRUPTED
    assert runner.forwarded == 1
    assert runner.stops == [(0.0, True)]
    events = read_events(tmp_path / "events.jsonl")
    assert [e for e in events if e["type"] == "interrupted"][0]["signal"] == "SIGTERM"
    assert read_state(tmp_path)["state"] == "interrupted"


def _sigterm_at_poll(n: int, sup: list[Supervisor]) -> Callable[[FakeRunner], None]:
    """An ``on_poll`` that sends the supervisor (``sup[0]``) SIGTERM at its n-th poll."""
    polls = []

    def on_poll(runner: FakeRunner) -> None:
        polls.append(1)
        if len(polls) == n:
            sup[0].request_stop(signal.SIGTERM)

    return on_poll


def _step_dir(tmp_path: Path, step: int) -> Path:
    path = tmp_path / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True, exist_ok=True)  # the run is on the checkpoint store
    return path


@pytest.mark.parametrize(("saved", "code"), [(7, exit_codes.INTERRUPTED_UNSAVED), (8, 75)])
def test_an_interrupt_is_75_only_when_a_checkpoint_holds_the_step_reached(
    tmp_path: Path, saved: int, code: int
) -> None:
    holder: list[Supervisor] = []
    runner = FakeRunner(
        [[Observation(Outcome.RUNNING, step=8)]], on_poll=_sigterm_at_poll(3, holder)
    )
    sup, _ = _supervisor(tmp_path, runner, checkpoints=[None, _step_dir(tmp_path, saved)])
    holder.append(sup)
    assert sup.run() == code
    emergency = [
        e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "emergency_checkpoint"
    ]
    assert emergency[0]["reached_step"] == 8 and emergency[0]["durable_step"] == saved
    assert emergency[0]["durable"] == (code == 75)
    assert read_state(tmp_path)["exit_code"] == code


def test_a_signal_after_every_rank_finished_is_judged_as_a_finished_run(tmp_path: Path) -> None:
    holder: list[Supervisor] = []
    runner = FakeRunner(
        [[Observation(Outcome.RUNNING, step=10)]], on_poll=_sigterm_at_poll(2, holder)
    )
    runner.finished = True
    sup, _ = _supervisor(tmp_path, runner, checkpoints=[None, _step_dir(tmp_path, 10)])
    holder.append(sup)
    assert sup.run() == exit_codes.SUCCESS
    assert _types(tmp_path)[-1] == "done"


def test_a_finished_run_whose_final_step_is_not_saved_is_not_a_success(tmp_path: Path) -> None:
    runner = FakeRunner([[DONE]])
    sup, _ = _supervisor(tmp_path, runner, checkpoints=[None, _step_dir(tmp_path, 6)])
    assert sup.run() == exit_codes.FINAL_STATE_UNSAVED
    unsaved = read_events(tmp_path / "events.jsonl")[-1]
    assert unsaved["type"] == "final_state_unsaved"
    assert (unsaved["step"], unsaved["durable_step"]) == (10, 6)
    assert read_state(tmp_path)["state"] == "failed"


def test_signal_during_backoff_exits_without_relaunch(tmp_path: Path) -> None:
    def on_poll(runner: FakeRunner) -> None:
        pass

    runner = FakeRunner([[crash()], [DONE]])
    sup, clock = _supervisor(tmp_path, runner, backoff_initial=10.0)
    original_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        if sup.state.value == "backoff":
            sup.request_stop(signal.SIGINT)
        original_sleep(seconds)

    sup._sleep = sleep
    assert sup.run() == exit_codes.INTERRUPTED
    assert len(runner.started) == 1
    assert _types(tmp_path)[-1] == "interrupted"


def test_events_have_timestamps_and_state_file_is_json(tmp_path: Path) -> None:
    runner = FakeRunner([[RUNNING, crash()], [DONE]])
    sup, _ = _supervisor(tmp_path, runner)
    sup.run()
    for event in read_events(tmp_path / "events.jsonl"):
        assert isinstance(event["time"], float) and isinstance(event["mono"], float)
        assert isinstance(event["type"], str)
    json.loads((tmp_path / "supervisor.json").read_text())


@pytest.mark.parametrize("bad", [{"nproc": 0}, {"nnodes": "2"}, {"nnodes": "x"}])
def test_launch_config_validation(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        LaunchConfig(script=tmp_path / "s.py", run_dir=tmp_path, **bad)


def test_an_unloadable_checkpoint_is_passed_over_at_no_restart(tmp_path: Path) -> None:
    newer, older = _step_dir(tmp_path, 20), _step_dir(tmp_path, 10)
    runner = FakeRunner([[crash(78)], [DONE]])
    sup, clock = _supervisor(tmp_path, runner, checkpoints=[newer, older, older], max_restarts=0)
    assert sup.run() == exit_codes.SUCCESS
    assert [r for _, r in runner.started] == [newer, older]
    assert clock.now < 1.0  # no backoff
    backoff = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "backoff"][0]
    assert backoff["delay"] == 0.0 and backoff["restarts_used"] == 0


def test_no_older_checkpoint_left_stops_rather_than_starting_over(tmp_path: Path) -> None:
    runner = FakeRunner([[crash(78)], [DONE]])
    sup, _ = _supervisor(tmp_path, runner, checkpoints=[_step_dir(tmp_path, 20), None])
    assert sup.run() == exit_codes.NO_USABLE_CHECKPOINT
    assert len(runner.started) == 1
    fatal = read_events(tmp_path / "events.jsonl")[-1]
    assert fatal["type"] == "fatal" and "not starting over" in fatal["reason"]


def test_survivors_get_the_stop_grace_only_while_a_rank_writes_a_checkpoint(
    tmp_path: Path,
) -> None:
    runner = FakeRunner([[RUNNING, crash(-9)], [RUNNING, DONE]])
    runner.writing = True
    sup, _ = _supervisor(tmp_path, runner)
    assert sup.run() == exit_codes.SUCCESS
    assert runner.stops == [(2.0, False)]
    stopping = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "stopping"]
    assert [e["grace"] for e in stopping] == [2.0]
