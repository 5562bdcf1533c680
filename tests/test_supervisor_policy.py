"""supervisor.policy: budget, restart window, crash-loop guard, backoff."""

from __future__ import annotations

import pytest

from runcontract import exit_codes
from supervisor.policy import PolicyConfig, RestartPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _policy(**kw) -> tuple[RestartPolicy, Clock]:
    clock = Clock()
    kw.setdefault("backoff_jitter", 0.0)
    return RestartPolicy(PolicyConfig(**kw), clock=clock), clock


def test_budget_allows_exactly_n_restarts() -> None:
    policy, _ = _policy(max_restarts=3, crash_loop=0)
    decisions = [policy.on_failure(attempt_runtime=1.0, progressed=False) for _ in range(4)]
    assert [d.restart for d in decisions] == [True, True, True, False]
    assert decisions[-1].exit_code == exit_codes.BUDGET_EXHAUSTED
    assert decisions[-1].restarts_used == 3
    assert [d.restarts_left for d in decisions[:3]] == [2, 1, 0]


def test_zero_budget_gives_up_at_first_failure() -> None:
    policy, _ = _policy(max_restarts=0)
    decision = policy.on_failure(attempt_runtime=1.0, progressed=True)
    assert not decision.restart
    assert decision.exit_code == exit_codes.BUDGET_EXHAUSTED


def test_restart_window_forgets_old_restarts() -> None:
    policy, clock = _policy(max_restarts=2, restart_window=60.0, crash_loop=0)
    assert policy.on_failure(attempt_runtime=1.0, progressed=True).restart
    clock.now += 10
    assert policy.on_failure(attempt_runtime=1.0, progressed=True).restart
    clock.now += 10
    assert not policy.on_failure(attempt_runtime=1.0, progressed=True).restart  # 2 within 60 s
    clock.now += 55  # the first restart is now older than the window
    decision = policy.on_failure(attempt_runtime=1.0, progressed=True)
    assert decision.restart
    assert policy.restarts_used == 3


def test_crash_loop_needs_consecutive_failures_without_progress() -> None:
    policy, _ = _policy(max_restarts=100, crash_loop=3)
    assert policy.on_failure(attempt_runtime=1.0, progressed=False).restart
    assert policy.on_failure(attempt_runtime=1.0, progressed=False).restart
    # A new valid checkpoint resets the count.
    assert policy.on_failure(attempt_runtime=1.0, progressed=True).restart
    assert policy.on_failure(attempt_runtime=1.0, progressed=False).restart
    assert policy.on_failure(attempt_runtime=1.0, progressed=False).restart
    decision = policy.on_failure(attempt_runtime=1.0, progressed=False)
    assert not decision.restart
    assert decision.exit_code == exit_codes.CRASH_LOOP
    assert "3 consecutive" in decision.reason


def test_backoff_grows_only_with_failures_in_a_row_that_achieved_nothing() -> None:
    policy, _ = _policy(
        max_restarts=100, crash_loop=0, backoff_initial=1.0, backoff_max=5.0, healthy_after=60.0
    )
    delays = [policy.on_failure(attempt_runtime=1.0, progressed=False).delay for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    # Progress, or a healthy stretch, restarts at once and starts the streak again.
    assert policy.on_failure(attempt_runtime=1.0, progressed=True).delay == 0.0
    assert policy.on_failure(attempt_runtime=1.0, progressed=False).delay == 1.0
    assert policy.on_failure(attempt_runtime=1.0, progressed=False).delay == 2.0
    assert policy.on_failure(attempt_runtime=61.0, progressed=False).delay == 0.0
    assert policy.on_failure(attempt_runtime=1.0, progressed=False).delay == 1.0


def test_backoff_jitter_stays_within_bounds() -> None:
    policy, _ = _policy(max_restarts=100, crash_loop=0, backoff_initial=1.0, backoff_jitter=0.5)
    delays = []
    for _ in range(50):  # the first backoff of a fresh streak each time
        assert policy.on_failure(attempt_runtime=1.0, progressed=True).delay == 0.0
        delays.append(policy.on_failure(attempt_runtime=1.0, progressed=False).delay)
    assert all(1.0 <= d <= 1.5 for d in delays)
    assert len(set(delays)) > 1  # jitter really varies


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_restarts", -1),
        ("restart_window", -1.0),
        ("crash_loop", -2),
        ("backoff_initial", -0.1),
        ("backoff_jitter", -1.0),
    ],
)
def test_config_validation_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyConfig(**{field: value})


def test_config_rejects_cap_below_initial() -> None:
    with pytest.raises(ValueError, match="backoff_max"):
        PolicyConfig(backoff_initial=5.0, backoff_max=1.0)
