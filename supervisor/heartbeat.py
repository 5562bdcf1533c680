"""Hang detection from the workers' heartbeat files (``heartbeats/rank-<R>.json``).

A rank hangs when its heartbeat stops advancing for longer than its phase allows:

- ``startup`` (or no heartbeat yet): ``startup_timeout`` from the launch;
- ``train``: the hang timeout, either given or derived from observed step times
  (``max(hang_floor, hang_factor × slowest recent step)``);
- ``eval`` and ``checkpoint``: the longer of the hang timeout and ``checkpoint_timeout``, for the
  rank in it and for its peers in ``train`` (they wait for it in their next collective, and their
  stall counts from its end);
- ``done``: never (the rank finished; its peers' own timeouts still apply).

Stall time is measured on the supervisor's monotonic clock from when it last saw the rank's step
or phase change, so skewed worker clocks do not matter.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runcontract.cli import option
from runcontract.heartbeat import Phase
from supervisor.attempt import Hang
from supervisor.flag_groups import DETECTION


@dataclass(frozen=True)
class HangConfig:
    """How long each phase may go without progress before the attempt counts as hung."""

    hang_timeout: float | None = option(
        None,
        "seconds without a new step before a hang (default: derived, 10 x the slowest recent "
        "step, at least --hang-floor)",
        group=DETECTION,
    )
    """Seconds without a new step in ``train``; None derives it from observed step times."""
    hang_floor: float = option(30.0, "least derived hang timeout, seconds", group=DETECTION)
    """Least derived hang timeout, seconds."""
    hang_factor: float = 10.0
    """Derived timeout = this × the slowest recent step time (at least ``hang_floor``)."""
    startup_timeout: float = option(180.0, "seconds from launch to the first step", group=DETECTION)
    """Seconds from launch until a rank must leave ``startup`` (import, rendezvous, loading)."""
    checkpoint_timeout: float = option(
        300.0,
        "seconds a rank may spend in a checkpoint or eval phase",
        group=DETECTION,
    )
    """Seconds a rank may stay in ``checkpoint`` or ``eval``."""
    process_hang: str = option(
        "yes",
        "for a script that writes no heartbeats: a rank stopped (state T), or every rank idle "
        "(under 5 %% of a core per live rank, no output), for the hang timeout (or "
        "--hang-floor) is a hang",
        choices=("yes", "no"),
        group=DETECTION,
    )
    """``yes``: a script without heartbeats is watched through the process table
    (``supervisor.activity``); ``no``: only its crashes are detected."""
    require_heartbeats: bool = False
    """True: a worker with no heartbeat after ``startup_timeout`` hangs, even when no rank beats
    (right for scripts known to beat, such as the built-in trainer). False: a script whose ranks
    never beat is taken not to beat, and only crashes are detected."""

    @property
    def process_timeout(self) -> float:
        """Seconds a rank may stay stopped, or every rank idle, in a script without
        heartbeats."""
        return self.hang_timeout if self.hang_timeout is not None else self.hang_floor

    def __post_init__(self) -> None:
        if self.process_hang not in ("yes", "no"):
            raise ValueError(f"--process-hang {self.process_hang!r}: expected yes or no")
        if self.hang_timeout is not None and self.hang_timeout <= 0:
            raise ValueError(f"hang_timeout={self.hang_timeout!r} must be > 0")
        for name in ("hang_floor", "hang_factor", "startup_timeout", "checkpoint_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")


_WAITED_FOR = (Phase.CHECKPOINT, Phase.EVAL)
"""Phases a rank's peers wait out in their next collective."""


@dataclass
class RankState:
    """The newest heartbeat of one rank, as the supervisor saw it."""

    rank: int
    pid: int
    step: int
    phase: str
    time: float
    """The worker's own timestamp (epoch seconds)."""
    changed_at: float
    """Supervisor monotonic time when step or phase last changed."""


@dataclass
class HeartbeatMonitor:
    """Reads the heartbeat files of one attempt and decides whether it hangs."""

    heartbeat_dir: Path
    attempt: int
    config: HangConfig
    started_at: float
    """Supervisor monotonic time of the launch."""
    clock: Callable[[], float] = time.monotonic
    ranks: dict[int, RankState] = field(default_factory=dict)
    _step_times: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    _logged_timeout: float | None = None
    _wait_ended_at: float = float("-inf")
    """Supervisor monotonic time when a rank was last seen leaving ``checkpoint`` or ``eval``."""

    def poll(self, worker_pids: Iterable[int] | None = None) -> None:
        """Read every rank's file. Only files of this attempt (and, when given, of these pids)
        count; unreadable or half-written files are skipped until the next poll."""
        pids = set(worker_pids) if worker_pids is not None else None
        now = self.clock()
        try:
            paths = list(self.heartbeat_dir.glob("rank-*.json"))
        except OSError:
            return
        for path in paths:
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                rank, pid, step = int(rec["rank"]), int(rec["pid"]), int(rec["step"])
                phase, stamp, attempt = str(rec["phase"]), float(rec["time"]), int(rec["attempt"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if attempt != self.attempt or (pids is not None and pid not in pids):
                continue
            self._observe(rank, pid, step, phase, stamp, now)

    def _observe(
        self, rank: int, pid: int, step: int, phase: str, stamp: float, now: float
    ) -> None:
        old = self.ranks.get(rank)
        if old is None:
            self.ranks[rank] = RankState(rank, pid, step, phase, stamp, now)
            return
        if (
            step > old.step
            and phase == Phase.TRAIN
            and old.phase == Phase.TRAIN
            and stamp > old.time
        ):
            self._step_times.append((stamp - old.time) / (step - old.step))
        if step != old.step or phase != old.phase:
            old.changed_at = now
        if old.phase in _WAITED_FOR and phase != old.phase:
            self._wait_ended_at = now
        old.pid, old.step, old.phase, old.time = pid, step, phase, stamp

    def hang_timeout(self) -> float:
        """The timeout in force for the ``train`` phase, seconds."""
        cfg = self.config
        if cfg.hang_timeout is not None:
            return cfg.hang_timeout
        slowest = max(self._step_times, default=0.0)
        return max(cfg.hang_floor, cfg.hang_factor * slowest)

    def timeout_to_log(self) -> float | None:
        """The hang timeout when new or moved by over 25 % since last logged, else None."""
        current = self.hang_timeout()
        last = self._logged_timeout
        if last is None or abs(current - last) > 0.25 * last:
            self._logged_timeout = current
            return current
        return None

    def allowance(self, phase: str) -> float | None:
        """Seconds ``phase`` may go without progress (None: unlimited)."""
        if phase == Phase.DONE:
            return None
        if phase == Phase.STARTUP:
            return self.config.startup_timeout
        if phase in (Phase.EVAL, Phase.CHECKPOINT):
            return max(self.hang_timeout(), self.config.checkpoint_timeout)
        return self.hang_timeout()

    def max_step(self) -> int | None:
        """The highest step any rank reported, or None before the first heartbeat."""
        return max((r.step for r in self.ranks.values()), default=None)

    def check(self, worker_pids: Iterable[int]) -> Hang | None:
        """The rank stalled longest past its allowance, or None.

        ``worker_pids`` are the attempt's live workers; one of them without a heartbeat counts
        as stuck in ``startup``. While any rank is in ``checkpoint`` or ``eval``, every rank in
        ``train`` gets that phase's allowance. When no worker has written a heartbeat by the end
        of the start-up allowance, the script is taken not to beat and no hang is reported.
        """
        now = self.clock()
        worst: Hang | None = None
        # While one rank checkpoints or evaluates, its peers wait for it in their next
        # collective: they are judged by the same, longer allowance, not called hung.
        # The wait is over when the checkpoint is: their stall counts from its end, since the
        # step they wait to finish needs a moment after it (and the next poll) to show.
        waiting = any(r.phase in _WAITED_FOR for r in self.ranks.values())
        for state in self.ranks.values():
            phase = Phase.CHECKPOINT if waiting and state.phase == Phase.TRAIN else state.phase
            allowed = self.allowance(phase)
            if state.phase == Phase.STARTUP:
                stalled = now - self.started_at
            elif state.phase == Phase.TRAIN:
                stalled = now - max(state.changed_at, self._wait_ended_at)
            else:
                stalled = now - state.changed_at
            if allowed is not None and stalled > allowed:
                if worst is None or _blame_before(state.step, stalled - allowed, worst):
                    worst = Hang(
                        rank=state.rank,
                        pid=state.pid,
                        step=state.step,
                        phase=state.phase,
                        stalled_for=stalled,
                        timeout=allowed,
                        reason=f"rank {state.rank} stuck at step {state.step} in {state.phase} "
                        f"for {stalled:.1f} s (timeout {allowed:.1f} s)",
                    )
        if worst is not None:
            return worst
        if not self.ranks and not self.config.require_heartbeats:
            return None
        beating = {s.pid for s in self.ranks.values()}
        silent = [pid for pid in worker_pids if pid not in beating]
        stalled = now - self.started_at
        if silent and stalled > self.config.startup_timeout:
            return Hang(
                rank=None,
                pid=silent[0],
                step=None,
                phase=Phase.STARTUP,
                stalled_for=stalled,
                timeout=self.config.startup_timeout,
                reason=f"worker pid {silent[0]} wrote no heartbeat within the start-up "
                f"timeout ({self.config.startup_timeout:.1f} s)",
            )
        return None

    def silent(self) -> bool:
        """True when the start-up allowance passed and no rank ever wrote a heartbeat."""
        return (
            not self.config.require_heartbeats
            and not self.ranks
            and self.clock() - self.started_at > self.config.startup_timeout
        )


def _blame_before(step: int, overdue: float, worst: Hang) -> bool:
    """Whether a rank at ``step``, ``overdue`` seconds past its allowance, is a likelier root
    cause than ``worst``. A rank behind its peers holds them in their next collective, so the
    lowest step comes first; at one step (the usual DDP hang: every peer waits in the same
    all-reduce) the order in which the ranks last beat is noise, and the longest overdue wins
    only as a tie-break."""
    worst_step = worst.step if worst.step is not None else step
    if step != worst_step:
        return step < worst_step
    return overdue > worst.stalled_for - worst.timeout
