"""Hang detection for scripts that write no heartbeats: what the process table shows.

Two signs, each held for the hang timeout, make a hang:

- a rank stopped (state ``T`` or ``t``: SIGSTOP, a terminal stop, a debugger that never let go);
  that rank is named as the root cause;
- every rank idle: the workers and their own children together used less than
  ``IDLE_CPU_SHARE`` of one core per live rank, and no worker wrote a byte of output, since they
  were last seen active. A rank waiting in a gloo collective for a peer that never comes sleeps
  in the kernel but for its library's polling threads, and its peers soon do too.

What it cannot see: a rank that spins while stuck (NCCL busy-polls a collective on the GPU, a
``while True`` loop) looks busy, and a script that legitimately idles longer than the hang
timeout (a long sleep, a download with no output) looks hung. Heartbeats see both right; a
script that beats is judged by them alone (``supervisor.heartbeat``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from supervisor.attempt import Hang
from supervisor.proctree import Worker

IDLE_CPU_SHARE = 0.05
"""Below this share of one core per live rank since the last activity, the ranks count as idle.
A rank blocked for good still spends a little: one stuck in gloo's destroy_process_group after
its peer had exited used 1.2 % of a core (two of the library's threads polling), so the bar
sits well above that and far below any rank at work."""
MIN_CPU_SECONDS = 0.05
"""CPU seconds that always count as activity, however short the time since the last look."""
STOPPED_STATES = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


@dataclass
class ActivityMonitor:
    """Watches one attempt's workers for a stopped rank and for all ranks idle."""

    timeout: float
    """Seconds a rank may stay stopped, or all ranks idle, before the attempt counts as hung."""
    output_dir: Path | None = None
    """Where the workers' output files are (their growth is activity); None: output unseen."""
    clock: Callable[[], float] = time.monotonic
    _stopped_since: dict[int, float] = field(default_factory=dict)
    _cpu_by_pid: dict[int, float] = field(default_factory=dict)
    """Each process's CPU seconds when last read: one that exited keeps its share, so that
    the total never drops and hides new work."""
    _active_at: float | None = None
    _cpu_at_active: float = 0.0
    _output_at_active: tuple[int, ...] = ()

    def look(self, workers: Iterable[Worker], children: Iterable[psutil.Process]) -> Hang | None:
        """One look at the live ``workers`` and their ``children``; the hang, or None."""
        now = self.clock()
        workers = list(workers)
        stopped, any_stopped = self._look_for_stopped(workers, now)
        if stopped is not None or any_stopped:
            # A stopped rank soon idles its peers: name it once its own timeout is up.
            return stopped
        for proc in [w.proc for w in workers] + list(children):
            seconds = _cpu_seconds(proc)
            if seconds is not None:
                self._cpu_by_pid[proc.pid] = max(seconds, self._cpu_by_pid.get(proc.pid, 0.0))
        cpu = sum(self._cpu_by_pid.values())
        output = self._output_sizes()
        if self._active_at is None or self._active(now, cpu, output, len(workers)):
            self._active_at, self._cpu_at_active, self._output_at_active = now, cpu, output
            return None
        idle_for = now - self._active_at
        if idle_for <= self.timeout or not workers:
            return None
        used = max(0.0, cpu - self._cpu_at_active)
        return Hang(
            rank=None,
            pid=workers[0].pid,
            step=None,
            phase="idle",
            stalled_for=idle_for,
            timeout=self.timeout,
            reason=f"every rank idle for {idle_for:.1f} s (timeout {self.timeout:.1f} s): "
            f"{used:.2f} CPU seconds used in all and no output (no heartbeats to tell more)",
        )

    def _active(self, now: float, cpu: float, output: tuple[int, ...], ranks: int) -> bool:
        assert self._active_at is not None
        used = cpu - self._cpu_at_active
        share = IDLE_CPU_SHARE * max(1, ranks) * (now - self._active_at)
        # Output that changed in any way (a capped log starts again smaller) is activity.
        return used >= max(MIN_CPU_SECONDS, share) or output != self._output_at_active

    def _look_for_stopped(self, workers: list[Worker], now: float) -> tuple[Hang | None, bool]:
        seen = set()
        worst: Hang | None = None
        for worker in workers:
            try:
                stopped = worker.proc.status() in STOPPED_STATES
            except psutil.Error:
                continue
            if not stopped:
                continue
            seen.add(worker.pid)
            since = self._stopped_since.setdefault(worker.pid, now)
            stalled = now - since
            if stalled > self.timeout and (worst is None or stalled > worst.stalled_for):
                rank = worker.rank if worker.rank is not None else f"pid {worker.pid}"
                worst = Hang(
                    rank=worker.rank,
                    pid=worker.pid,
                    step=None,
                    phase="stopped",
                    stalled_for=stalled,
                    timeout=self.timeout,
                    reason=f"rank {rank} stopped (process state T) for {stalled:.1f} s "
                    f"(timeout {self.timeout:.1f} s)",
                )
        for pid in list(self._stopped_since):
            if pid not in seen:
                del self._stopped_since[pid]
        return worst, bool(seen)

    def _output_sizes(self) -> tuple[int, ...]:
        if self.output_dir is None:
            return ()
        try:
            return tuple(p.stat().st_size for p in sorted(self.output_dir.glob("*/*/*/std*.log")))
        except OSError:
            return self._output_at_active  # a file rotated under us: no news


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
        return float(times.user + times.system)
    except psutil.Error:
        return None
