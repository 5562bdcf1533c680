"""When rank 0 saves, and how: the measured cost of each save, the cheaper way to write to disk
(``--ckpt-mode auto``), and the intervals of Young and Daly's rule (``--ckpt-every auto``,
``--mem-every auto``).

The cost of a save (δ) is what it takes from the training loop:

- a memory snapshot, or a synchronous disk save: the time the loop waited in it;
- an asynchronous disk save: the time the loop waited in it (the host copy), plus what the steps
  taken while the writer ran lost to it (each one's time over the median step time). On a CPU
  whose cores the loop already uses, that second part can exceed a synchronous write.

``--ckpt-mode auto`` writes the first periodic save asynchronously and the second synchronously
(``FIRST_SAVE_SECONDS`` of training apart), then always the cheaper of the two by the mean of
their recent costs. After ``PROBE_EVERY`` saves one is written the other way once more, so that a
change of load is seen; each such probe that confirms the choice doubles the wait for the next.

The interval of a tier is T = sqrt(2·δ·M) (Young 1974, Daly 2006), M the mean time between
failures (``Mtbf``), turned into steps with the median step time. While the memory tier is on,
the disk's M counts only the failures the memory tier did not recover: a resume from memory
loses no disk checkpoint's work, so saving to disk as if it did would pay both tiers' costs for
one tier's protection (multi-level checkpointing: each level is spaced by the failures that only
it survives, such as the loss of the node). Bounds: at least one step;
for an asynchronous disk save, at least the time a write takes (a save due while the last one is
still being written would be skipped); at most ``MAX_INTERVAL_SECONDS``. Before a tier's first
save is measured, its first save comes after ``FIRST_SAVE_SECONDS`` of training.

The memory tier may spend a budget (``--mem-budget``, a share of the loop's time) to lose less:
its interval is the shorter of Young and Daly's and δ / budget. Young and Daly minimise the
expected time lost, and for a snapshot of a few milliseconds under an hour's MTBF that is a
snapshot every few seconds; a kill then still loses those seconds of every rank's work, which
snapshots spaced by the budget cut to a fraction for a bounded slowdown. With a budget its
first snapshot comes at the attempt's first step: it costs little, and a kill right after a
resume loses nothing.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from runcontract import env

SYNC, ASYNC = "sync", "async"
PROBE_EVERY = 10
"""Disk saves under ``--ckpt-mode auto`` before the way not in use is measured again; doubled
each time that confirms the choice (at most ``MAX_PROBE_EVERY``), reset when it changes it."""
MAX_PROBE_EVERY = 160
FIRST_SAVE_SECONDS = 2.0
"""Training seconds before a tier's first save under an auto interval: enough steps to know the
step time, early enough that a save that cannot be written is found at once."""
MAX_INTERVAL_SECONDS = 1800.0
"""The longest auto interval: at most half an hour of work is lost, whatever the estimates."""
COST_WINDOW = 5
"""A cost is the mean of this many recent measurements."""
MEMORY_COST_WINDOW = 20
"""The memory tier's cost is the mean of this many recent snapshots: they come every few steps,
and a short window makes a noisy interval (a steady one loses fewer steps for the same cost)."""
MEMORY_SLOTS_MADE = 2
"""An attempt's first snapshots each make a slot (files made and mapped, once): their cost is
dropped from the memory tier's once a snapshot rewrites a slot."""
STEP_WINDOW = 50
"""The step time is the median of this many recent steps that no background write overlapped."""
NOT_YET = 2**62
"""A due step that never comes: the next save waits for a measurement."""
RECOMPUTE_CHANGE = 0.25
"""An interval is announced again (event ``checkpoint_interval``) when it moves by this much, and
by more than one step."""


@dataclass
class Mtbf:
    """The mean time between failures, M, from the failures this run has seen.

    ``failures``, ``seconds`` and ``memory_recoveries`` come from the supervisor
    (``ROSE_FAILURES``, ``ROSE_RUN_SECONDS``, ``ROSE_MEMORY_RECOVERIES``: the failures of earlier
    attempts, how long they ran, and how many of those failures were resumed from the memory
    tier). Once a failure was seen, M is the run's time over its failures; before, the larger of
    the prior and the time run so far, since no failure in that time says M is at least that
    long.
    """

    prior: float
    failures: int = 0
    seconds: float = 0.0
    memory_recoveries: int = 0
    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_env(cls, prior: float, clock: Callable[[], float] = time.monotonic) -> Mtbf:
        """The estimate the supervisor handed this attempt; the prior alone when unsupervised
        or when the values are malformed."""
        try:
            failures = int(os.environ.get(env.FAILURES, "0"))
            seconds = float(os.environ.get(env.RUN_SECONDS, "0"))
            recovered = int(os.environ.get(env.MEMORY_RECOVERIES, "0"))
        except ValueError:
            failures, seconds, recovered = 0, 0.0, 0
        if failures < 0 or not 0.0 <= seconds < math.inf:
            failures, seconds, recovered = 0, 0.0, 0
        if not 0 <= recovered <= failures:
            recovered = 0  # every failure counts for the disk: the safe side
        return cls(prior, failures, seconds, recovered, started=clock(), clock=clock)

    def counted(self, beyond_memory: bool = False) -> int:
        """The failures M is taken over."""
        return self.failures - (self.memory_recoveries if beyond_memory else 0)

    def value(self, beyond_memory: bool = False) -> float:
        """M over every failure; with ``beyond_memory``, over the failures the memory tier did
        not recover."""
        ran = self.seconds + max(0.0, self.clock() - self.started)
        failures = self.counted(beyond_memory)
        if failures:
            return max(ran / failures, 1.0)
        return max(self.prior, ran)


@dataclass
class Cost:
    """Recent measurements of one kind of save, seconds."""

    samples: deque[float] = field(default_factory=lambda: deque(maxlen=COST_WINDOW))

    def add(self, seconds: float) -> None:
        self.samples.append(max(0.0, seconds))

    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


@dataclass
class _AsyncSave:
    """An asynchronous save whose cost is still being added up while its writer runs."""

    step: int
    blocked: float
    extra: float = 0.0


@dataclass
class TierInterval:
    """The interval of one tier: fixed (``every``), or auto (``every`` None)."""

    tier: str
    every: int | None
    due_at: int | None = None
    """The step of the next save under an auto interval (None: first save not placed yet)."""
    current: int | None = None
    """The auto interval in steps last computed."""
    announced: int | None = None

    first_after: float = FIRST_SAVE_SECONDS
    """Training seconds before the first save under an auto interval."""

    def due(self, step: int, trained: float) -> bool:
        if self.every is not None:
            return self.every > 0 and step % self.every == 0
        if self.due_at is None:
            return trained > 0 and trained >= self.first_after
        return step >= self.due_at


class SavePolicy:
    """Rank 0's schedule of disk and memory saves, and the way each disk save is written.

    The loop reports each step (``on_step``) and each save (``disk_saved``, ``memory_saved``);
    it asks ``disk_due``, ``memory_due`` and ``disk_mode``. Decisions are announced through
    ``emit`` as ``checkpoint_mode`` and ``checkpoint_interval`` events.
    """

    def __init__(
        self,
        *,
        ckpt_every: int | None,
        mem_every: int | None,
        mode: str,
        mtbf: Mtbf,
        emit: Callable[..., None],
        mem_budget: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode_setting = mode
        self.mtbf = mtbf
        self.mem_budget = mem_budget
        self.memory_covers = False
        """The memory tier is taking snapshots: the disk interval then counts only the failures
        it did not recover (set by the loop; see :meth:`memory_off`)."""
        self.emit = emit
        self.clock = clock
        self.disk = TierInterval("disk", ckpt_every)
        self.memory = TierInterval(
            "memory", mem_every, first_after=0.0 if mem_budget else FIRST_SAVE_SECONDS
        )
        self.costs = {
            SYNC: Cost(),
            ASYNC: Cost(),
            "memory": Cost(deque(maxlen=MEMORY_COST_WINDOW)),
        }
        self._snapshots = 0
        self.write_seconds = Cost()
        """How long the asynchronous writer took per save (it bounds the disk interval)."""
        self.mode = ASYNC if mode == "auto" else mode
        self._steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self._all_steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self._trained = 0.0
        self._disk_saves = 0
        self._probe_every = PROBE_EVERY
        self._next_probe: int | None = None
        """The disk save count at which the way not in use is tried again (None: before the
        first choice, or while a probe is under way)."""
        self._chosen = False
        self._pending: _AsyncSave | None = None

    # -- what the loop reports ------------------------------------------------------------------

    def on_step(self, seconds: float, writer_busy: bool) -> None:
        """One optimizer step took ``seconds``; ``writer_busy``: a background write ran during
        it (its excess over the median step is charged to that save)."""
        self._trained += seconds
        self._all_steps.append(seconds)
        pending = self._pending
        if writer_busy and pending is not None:
            typical = self.step_time()
            if typical is not None:
                pending.extra += max(0.0, seconds - typical)
            return
        self._steps.append(seconds)

    def writer_done(self, step: int, write_seconds: float | None) -> None:
        """The asynchronous save of ``step`` has committed (or failed): its cost is complete."""
        pending = self._pending
        if pending is None or pending.step != step:
            return
        self._pending = None
        self.costs[ASYNC].add(pending.blocked + pending.extra)
        if write_seconds is not None:
            self.write_seconds.add(write_seconds)
        self._after_disk_cost(step)

    def disk_saved(self, step: int, mode: str, blocked: float) -> None:
        """A periodic disk save of ``step`` returned after ``blocked`` seconds, written ``mode``."""
        self._disk_saves += 1
        if mode == ASYNC:
            # Placed once the writer is done and the cost known; until then no save is due
            # (unless an earlier interval stands).
            self._pending = _AsyncSave(step, blocked)
            self.disk.due_at = step + self.disk.current if self.disk.current else NOT_YET
            return
        self.costs[SYNC].add(blocked)
        self._after_disk_cost(step)

    def disk_skipped(self, step: int) -> None:
        """The save due at ``step`` was skipped (the last one is still being written): the
        next comes an interval later, or once that write's cost is known."""
        if self.disk.every is None:
            self.disk.due_at = step + self.disk.current if self.disk.current else NOT_YET

    def memory_off(self, step: int) -> None:
        """The memory tier stopped (a snapshot could not be written): from now on every failure
        costs disk work, so the next disk save is placed again with M over all of them."""
        if not self.memory_covers:
            return
        self.memory_covers = False
        if self.disk.every is None and self.disk.current is not None and self._pending is None:
            self._place(self.disk, step)

    def memory_saved(self, step: int, seconds: float) -> None:
        self._snapshots += 1
        if self._snapshots == MEMORY_SLOTS_MADE + 1:
            self.costs["memory"].samples.clear()
        self.costs["memory"].add(seconds)
        self._place(self.memory, step)

    # -- what the loop asks ---------------------------------------------------------------------

    def disk_due(self, step: int) -> bool:
        return self.disk.due(step, self._trained)

    def memory_due(self, step: int) -> bool:
        return self.memory.due(step, self._trained)

    def disk_mode(self) -> str:
        """How the next periodic disk save is written."""
        if self.mode_setting != "auto":
            return self.mode_setting
        sync_cost, async_cost = self.costs[SYNC].mean(), self.costs[ASYNC].mean()
        if self._pending is not None:
            return self.mode  # nothing new is learnt until that write is done
        if async_cost is None:
            return ASYNC
        if sync_cost is None:
            return SYNC
        if self._next_probe is not None and self._disk_saves >= self._next_probe:
            self._next_probe = None  # a probe is under way
            return SYNC if self.mode == ASYNC else ASYNC
        return self.mode

    def step_time(self) -> float | None:
        """The median recent step that no background write overlapped (any step, while
        there is none yet)."""
        steps = self._steps or self._all_steps
        return statistics.median(steps) if steps else None

    # -- decisions --------------------------------------------------------------------------------

    def _after_disk_cost(self, step: int) -> None:
        self._choose_mode(step)
        self._place(self.disk, step)

    def _choose_mode(self, step: int) -> None:
        if self.mode_setting != "auto":
            return
        sync_cost, async_cost = self.costs[SYNC].mean(), self.costs[ASYNC].mean()
        if sync_cost is None or async_cost is None:
            return
        best = SYNC if sync_cost < async_cost else ASYNC
        if self._next_probe is None:  # the first choice, or a probe's: when to look again
            # A probe that confirms the choice halves how often the other way is tried.
            confirmed = self._chosen and best == self.mode
            self._probe_every = (
                min(self._probe_every * 2, MAX_PROBE_EVERY) if confirmed else PROBE_EVERY
            )
            self._next_probe = self._disk_saves + self._probe_every
        if self._chosen and best == self.mode:
            return
        self._chosen = True
        previous, self.mode = self.mode, best
        self.emit(
            "checkpoint_mode",
            step=step,
            mode=best,
            previous=previous,
            sync_cost=round(sync_cost, 5),
            async_cost=round(async_cost, 5),
            reason=f"{best} cost the loop less: {min(sync_cost, async_cost):.4f} s a save "
            f"against {max(sync_cost, async_cost):.4f} s",
        )

    def _tier_cost(self, tier: TierInterval) -> float | None:
        if tier.tier == "memory":
            # The mean, not the median: a snapshot's cost has a long tail (a cold cache, a
            # collection), and the loop pays all of it.
            return self.costs["memory"].mean()
        cost = self.costs[self.mode].mean()
        other = SYNC if self.mode == ASYNC else ASYNC
        return cost if cost is not None else self.costs[other].mean()

    def _place(self, tier: TierInterval, step: int) -> None:
        """Place the next save of an auto ``tier`` after the one at ``step``."""
        if tier.every is not None:
            return
        cost, step_time = self._tier_cost(tier), self.step_time()
        if cost is None or not step_time:
            tier.due_at = step + (tier.current or 1)
            return
        if tier.tier == "disk" and self._measuring():
            # Both ways of writing are measured early, one first save's time apart.
            tier.due_at = step + max(1, round(FIRST_SAVE_SECONDS / step_time))
            return
        beyond_memory = tier.tier == "disk" and self.memory_covers
        mtbf = self.mtbf.value(beyond_memory)
        seconds = math.sqrt(2.0 * cost * mtbf)
        rule = "sqrt(2 x cost x mtbf)"
        if tier.tier == "memory" and self.mem_budget and cost / self.mem_budget < seconds:
            seconds, rule = cost / self.mem_budget, "cost / mem_budget"
        floor = 0.0
        if tier.tier == "disk" and self.mode == ASYNC:
            floor = self.write_seconds.mean() or 0.0
        seconds = min(max(seconds, floor), MAX_INTERVAL_SECONDS)
        every = max(1, round(seconds / step_time))
        tier.current = every
        tier.due_at = step + every
        last = tier.announced
        if last is None or abs(every - last) > max(RECOMPUTE_CHANGE * last, 1):
            tier.announced = every
            self.emit(
                "checkpoint_interval",
                step=step,
                tier=tier.tier,
                every=every,
                seconds=round(every * step_time, 3),
                cost=round(cost, 5),
                mtbf=round(mtbf, 1),
                failures=self.mtbf.counted(beyond_memory),
                mtbf_of="failures not recovered from memory" if beyond_memory else "all failures",
                step_time=round(step_time, 5),
                rule=rule,
            )

    def _measuring(self) -> bool:
        """Under --ckpt-mode auto, while a way of writing has not been measured yet."""
        return self.mode_setting == "auto" and any(
            self.costs[m].mean() is None for m in (SYNC, ASYNC)
        )
