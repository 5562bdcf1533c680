"""Restart policy: the budget, the restart window, the crash-loop guard and the backoff.

Pure bookkeeping with an injectable clock, so the state machine's tests can drive it without
sleeping. The backoff is tenacity's exponential wait with jitter, capped; a healthy stretch
resets it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from runcontract import exit_codes
from runcontract.cli import option
from supervisor.flag_groups import RESTARTS


@dataclass(frozen=True)
class PolicyConfig:
    """How many restarts, how fast, and when to give up."""

    max_restarts: int = option(
        3, "restarts allowed in total, or within --restart-window", group=RESTARTS
    )
    """Restarts allowed in total (or within ``restart_window``): at most N+1 attempts."""
    restart_window: float = option(
        0.0, "count restarts only within the last S seconds; 0: no window", group=RESTARTS
    )
    """When > 0: at most ``max_restarts`` restarts within this many seconds (sliding window)."""
    crash_loop: int = option(
        3,
        "give up after K consecutive failed attempts without progress: a new valid checkpoint, "
        "or for a script that keeps its own, a file under --ckpt-path, steps in its heartbeats "
        "or a run past --healthy-after (0 turns the guard off)",
        group=RESTARTS,
    )
    """Give up after this many failed attempts in a row without progress (0: off)."""
    backoff_initial: float = option(
        0.5, "first backoff of a failure streak, seconds; doubles", group=RESTARTS
    )
    """Seconds before the first restart of a failure streak (then doubled each time)."""
    backoff_max: float = option(30.0, "cap on one backoff, seconds", group=RESTARTS)
    """Cap on one backoff, seconds."""
    backoff_jitter: float = 0.5
    """Up to this many random seconds added to each backoff."""
    healthy_after: float = option(
        60.0,
        "an attempt that ran this long (or made progress) before failing restarts at once and "
        "resets the backoff",
        group=RESTARTS,
    )
    """An attempt that ran this long before failing (or made progress) restarts without a
    backoff and resets the streak."""

    def __post_init__(self) -> None:
        checks = [
            ("max_restarts", self.max_restarts >= 0, "must be >= 0"),
            ("restart_window", self.restart_window >= 0, "must be >= 0 (0: no window)"),
            ("crash_loop", self.crash_loop >= 0, "must be >= 0 (0: off)"),
            ("backoff_initial", self.backoff_initial >= 0, "must be >= 0"),
            ("backoff_max", self.backoff_max >= self.backoff_initial, "must be >= backoff_initial"),
            ("backoff_jitter", self.backoff_jitter >= 0, "must be >= 0"),
            ("healthy_after", self.healthy_after >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt."""

    restart: bool
    """True: back off for ``delay`` seconds, then launch again."""
    delay: float
    """Backoff before the next attempt, seconds (0 when giving up)."""
    exit_code: int | None
    """The supervisor's exit code when giving up, else None."""
    reason: str
    """One line for the log: why this decision."""
    restarts_used: int
    """Restarts made so far, counting the one decided now."""
    restarts_left: int
    """Restarts still allowed after this one."""


class RestartPolicy:
    """Counts failures and decides: restart after a backoff, or give up with an exit code."""

    def __init__(
        self,
        config: PolicyConfig,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[tenacity.RetryCallState], float] | None = None,
    ) -> None:
        """``clock`` gives seconds (monotonic); ``wait`` overrides the tenacity wait strategy."""
        self.config = config
        self._clock = clock
        self._wait = wait or tenacity.wait_exponential_jitter(
            multiplier=config.backoff_initial,
            max=config.backoff_max,
            jitter=config.backoff_jitter,
        )
        self._restart_times: deque[float] = deque()
        self.restarts_used = 0
        self.failures_without_progress = 0
        self.streak = 0

    def carry(self, restarts_used: int) -> None:
        """Start from ``restarts_used`` restarts already spent by an earlier supervisor of the
        run (read from the run directory). A restart window starts afresh: the earlier
        restarts' times are not known on this process's clock. Raises ValueError when negative."""
        if restarts_used < 0:
            raise ValueError(f"restarts_used={restarts_used!r} must be >= 0")
        self.restarts_used = restarts_used

    def restarts_left(self) -> int:
        """Restarts still allowed now (the window forgets old restarts)."""
        self._forget_old()
        counted = len(self._restart_times) if self.config.restart_window else self.restarts_used
        return max(0, self.config.max_restarts - counted)

    def _forget_old(self) -> None:
        if not self.config.restart_window:
            return
        horizon = self._clock() - self.config.restart_window
        while self._restart_times and self._restart_times[0] <= horizon:
            self._restart_times.popleft()

    def on_failure(self, *, attempt_runtime: float, progressed: bool) -> Decision:
        """Record one failed attempt and decide.

        ``attempt_runtime`` is how long it ran (seconds); ``progressed`` says whether it achieved
        anything a restart keeps (a newer valid checkpoint, for the built-in trainer).
        """
        cfg = self.config
        self.failures_without_progress = 0 if progressed else self.failures_without_progress + 1
        # A failure after progress or a healthy stretch restarts at once; only failures in a
        # row that achieved nothing back off, longer each time.
        healthy = progressed or attempt_runtime >= cfg.healthy_after
        if healthy:
            self.streak = 0
        if cfg.crash_loop and self.failures_without_progress >= cfg.crash_loop:
            return self._give_up(
                exit_codes.CRASH_LOOP,
                f"{self.failures_without_progress} consecutive failed attempts without progress "
                f"(--crash-loop {cfg.crash_loop})",
            )
        if self.restarts_left() <= 0:
            window = f" within {cfg.restart_window:g} s" if cfg.restart_window else ""
            return self._give_up(
                exit_codes.BUDGET_EXHAUSTED,
                f"restart budget spent: {cfg.max_restarts} restarts{window} (--max-restarts)",
            )
        delay = 0.0
        if not healthy:
            self.streak += 1
            state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
            state.attempt_number = self.streak
            delay = float(self._wait(state))
        self.restarts_used += 1
        self._restart_times.append(self._clock())
        return Decision(
            restart=True,
            delay=delay,
            exit_code=None,
            reason=f"restart {self.restarts_used} after {delay:.2f} s backoff",
            restarts_used=self.restarts_used,
            restarts_left=self.restarts_left(),
        )

    def _give_up(self, code: int, reason: str) -> Decision:
        return Decision(
            restart=False,
            delay=0.0,
            exit_code=code,
            reason=reason,
            restarts_used=self.restarts_used,
            restarts_left=self.restarts_left(),
        )
