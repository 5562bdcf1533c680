"""The supervisor's console: the one place that prints while a run goes on.

It is told every event (``EventLog`` hands each one over) and, at each poll of a running attempt,
the step the heartbeats report. From those, the trainer's ``metrics.jsonl`` and, with ``--tee``,
the chosen ranks' output files, it shows:

- one status line (``supervisor.progress``): on a terminal it is redrawn in place by ``rich``
  (chosen over ``tqdm`` because the line is a set of fields, not a bar, and ``rich`` keeps one
  live line below text printed above it, crops it to the terminal's width and honours
  ``NO_COLOR`` and dumb terminals); without a terminal (CI, a SLURM log) a plain line every
  ``--progress-every`` seconds;
- a failure and its recovery as a short block: the cause, the root-cause rank, its log tail,
  the checkpoint chosen and the time from the detection to the first step after it;
- the important events as one line each (the routine ones are in ``events.jsonl`` only);
- with ``--quiet``, only the failures.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from runcontract.cli import option
from runcontract.events import CHAOS_SOURCE, EventType
from supervisor.flag_groups import CONSOLE
from supervisor.progress import MetricsTail, Progress
from supervisor.tee import Tee, parse_ranks

REFRESH_INTERVAL = 0.25
"""Seconds between redraws of the status line on a terminal."""
METRICS_INTERVAL = 0.5
TEE_INTERVAL = 0.2
LOG_TAIL_LINES = 8

# Printed on the status line only (and kept in events.jsonl).
_ROUTINE = frozenset(
    {
        EventType.LAUNCH,
        EventType.HANG_TIMEOUT,
        EventType.STOPPING,
        EventType.DONE,
        EventType.CHECKPOINT_SAVED,
        EventType.CHECKPOINT_PRUNED,
        EventType.CHECKPOINT_EXISTS,
        EventType.CHECKPOINT_SAVE_SKIPPED,
        EventType.CHECKPOINT_TMP_REMOVED,
    }
)
# What --quiet still prints: a failure, its recovery (_RECOVERY, while one is under way), and
# every reason a run stops badly.
_FAILURES = frozenset(
    {
        EventType.WORKER_FAILED,
        EventType.HANG_DETECTED,
        EventType.FATAL,
        EventType.BUDGET_EXHAUSTED,
        EventType.CRASH_LOOP,
        EventType.FINAL_STATE_UNSAVED,
        EventType.WARNING,
        EventType.INTERNAL_ERROR,
        EventType.CHECKPOINT_WRITE_FAILED,
        EventType.CHECKPOINT_NOT_FINITE,
        EventType.CHECKPOINT_UNLOADABLE,
        EventType.CHECKPOINT_QUARANTINED,
        EventType.DIVERGED,
    }
)
_RECOVERY = frozenset(
    {EventType.STOPPED, EventType.BACKOFF, EventType.CHECKPOINT_SELECTED, EventType.FIRST_STEP}
)
# Field order for an event's one line; the rest follow alphabetically.
_LINE_FIRST = ("attempt", "rank", "pid", "exit_code", "signal", "step", "reason")


@dataclass(frozen=True)
class ConsoleConfig:
    """What the console shows."""

    progress_every: float = option(
        30.0,
        "without a terminal: seconds between progress lines (0: none); on a terminal the "
        "status line is redrawn in place",
        group=CONSOLE,
        metavar="S",
    )
    tee: str = option(
        "0",
        "local ranks whose output is shown, prefixed [rankN]: as torchrun does: 0,1 | all | none",
        group=CONSOLE,
        metavar="RANKS",
    )
    quiet: bool = option(
        False,
        "print only failures, their recoveries and the final line: no status line, no worker "
        "output",
        group=CONSOLE,
    )
    no_plot: bool = option(
        False, "do not draw report.png at the end (drawn when matplotlib is installed)",
        group=CONSOLE,
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.progress_every < 0:
            raise ValueError(f"--progress-every {self.progress_every}: must be >= 0 (0: none)")
        parse_ranks(self.tee)

    @property
    def tee_ranks(self) -> frozenset[int] | None:
        """The local ranks to stream (None: all); none at all with --quiet."""
        return frozenset() if self.quiet else parse_ranks(self.tee)


class Console:
    """Receives events and polls; prints lines, blocks and the status line."""

    def __init__(
        self,
        config: ConsoleConfig,
        *,
        stream: TextIO | None = None,
        total_steps: int | None = None,
        nproc: int = 1,
        ranks_dir: Callable[[int], Path] | None = None,
        metrics_path: Path | None = None,
        rank_of: Callable[[int], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ranks_dir(attempt)`` is where torchrun writes that attempt's rank logs;
        ``rank_of(local_rank)`` a worker's global rank when known."""
        self.config = config
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self.progress = Progress(total=total_steps, started=clock())
        self.metrics = MetricsTail(metrics_path) if metrics_path is not None else None
        self.tee = Tee(config.tee_ranks, nproc, rank_of, clock=clock)
        self._ranks_dir = ranks_dir
        self._live: Any = None  # rich.live.Live while the status line is drawn in place
        self._rich: Any = None
        self._drawn = ""
        self.live = not config.quiet and self._is_terminal()
        self._failure: dict[str, Any] | None = None
        """The failure or hang being recovered from (its event), until the next first step."""
        now = clock()
        self._next_plain = now + config.progress_every
        self._next_metrics = now
        self._next_tee = now
        self._next_refresh = now

    # -- what the supervisor calls ----------------------------------------------------------

    def event(self, record: dict[str, Any]) -> None:
        """One event, the supervisor's own or one a worker appended."""
        if record.get("source") == CHAOS_SOURCE:
            return  # the chaos tool prints its own
        kind = record.get("type")
        self.progress.on_event(record)
        if kind == EventType.LAUNCH and self._ranks_dir is not None:
            attempt = record.get("attempt")
            if isinstance(attempt, int):
                self.tee.start(self._ranks_dir(attempt))
        if kind in (EventType.WORKER_FAILED, EventType.HANG_DETECTED, EventType.STOPPED):
            self._write(self.tee.drain())  # the failing rank's last words before the block
        if kind == EventType.STOPPED:
            self.tee.stop()
        if not self.config.quiet or self._is_failure(record):
            text = self._describe(record)
            if text:
                self._write(text.splitlines(), style=_style(kind))
        self._refresh(force=True)

    def poll(self, step: int | None) -> None:
        """One look at the running attempt: the heartbeats' highest step (None: unknown)."""
        now = self._clock()
        self.progress.on_step(step, now)
        if self.metrics is not None and now >= self._next_metrics:
            self._next_metrics = now + METRICS_INTERVAL
            for record in self.metrics.records():
                self.progress.on_metrics(record, now)
        if self.tee.enabled and now >= self._next_tee:
            self._next_tee = now + TEE_INTERVAL
            self._write(self.tee.read())
        self._refresh()

    def finish(self, lines: list[str] | None = None) -> None:
        """The run is over: take the status line away and print ``lines`` (the summary)."""
        self._write(self.tee.drain())
        if self._live is not None:
            try:
                self._live.stop()
            except (OSError, ValueError):
                pass
            self._live = None
        self.live = False
        if lines:
            self._write(lines)

    def print(self, text: str) -> None:
        """A line of the supervisor's own (above the status line on a terminal)."""
        self._write(text.splitlines())

    # -- what an event says -----------------------------------------------------------------

    def _is_failure(self, record: dict[str, Any]) -> bool:
        """What --quiet still shows: a failure and its recovery, and every bad end."""
        kind = record.get("type")
        if kind in _RECOVERY:
            return self._failure is not None
        if kind == EventType.EMERGENCY_CHECKPOINT:
            return not record.get("durable")
        return kind in _FAILURES

    def _describe(self, record: dict[str, Any]) -> str | None:
        kind = record.get("type")
        stamp = _stamp(record)
        failure = self._failure
        if kind == EventType.SUPERVISOR_STARTED:
            carried = record.get("restarts_carried") or 0
            return (
                f"{stamp} supervising {Path(str(record.get('script'))).name} with "
                f"{record.get('nproc')} worker(s) a node; up to {record.get('max_restarts')} "
                f"restart(s){f' ({carried} already used)' if carried else ''}; run dir "
                f"{record.get('run_dir')}"
            )
        if kind in (EventType.WORKER_FAILED, EventType.HANG_DETECTED):
            self._failure = record
            return _failure_block(record, stamp)
        if kind == EventType.STOPPED:
            return _stopped_line(record, failure, stamp)
        if kind == EventType.BACKOFF:
            used, left = record.get("restarts_used"), record.get("restarts_left")
            why = f" ({record['reason']})" if record.get("reason") else ""
            total = used + left if isinstance(used, int) and isinstance(left, int) else "?"
            return f"    restart {used} of {total} in {record.get('delay')} s{why}"
        if kind == EventType.CHECKPOINT_SELECTED:
            path = record.get("path")
            if failure is None and not path:
                return None  # a fresh start: nothing to say
            where = f"checkpoint step {record.get('step')} ({path})" if path else "step 0"
            lead = "    " if failure is not None else f"{stamp} "
            return f"{lead}attempt {record.get('attempt')} resumes from {where}"
        if kind == EventType.FIRST_STEP:
            return self._first_step(record, failure, stamp)
        if kind in _ROUTINE:
            return None
        return event_line(record)

    def _first_step(
        self, record: dict[str, Any], failure: dict[str, Any] | None, stamp: str
    ) -> str | None:
        since = record.get("since_launch")
        if failure is None:
            return (
                f"{stamp} attempt {record.get('attempt')}: first step {record.get('step')} "
                f"{since} s after the launch"
            )
        self._failure = None
        took = _seconds_between(failure, record)
        return (
            f"{stamp} RECOVERED: attempt {record.get('attempt')} trains again (step "
            f"{record.get('step')}), {took} after the failure was detected ({since} s of it "
            "from the launch to the first step)"
        )

    # -- output ------------------------------------------------------------------------------

    def _is_terminal(self) -> bool:
        try:
            if not self.stream.isatty():
                return False
        except (AttributeError, ValueError):
            return False
        from rich.console import Console as RichConsole

        self._rich = RichConsole(
            file=self.stream, markup=False, highlight=False, emoji=False, soft_wrap=True
        )
        return bool(self._rich.is_terminal and not self._rich.is_dumb_terminal)

    def _write(self, lines: list[str], style: str | None = None) -> None:
        if not lines:
            return
        try:
            if self._live is not None:
                from rich.text import Text

                for line in lines:
                    self._live.console.print(Text(line, style=style or ""))
            else:
                self.stream.write("".join(line + "\n" for line in lines))
                self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken console must not stop the run

    def _refresh(self, force: bool = False) -> None:
        if self.config.quiet:
            return
        now = self._clock()
        if self.live:
            if not force and now < self._next_refresh:
                return
            self._next_refresh = now + REFRESH_INTERVAL
            line = self.progress.line(now)
            if line != self._drawn:
                self._drawn = line
                self._draw(line)
        elif self.config.progress_every > 0 and now >= self._next_plain:
            self._next_plain = now + self.config.progress_every
            self._write([f"{_stamp({'time': time.time()})} progress: {self.progress.line(now)}"])

    def _draw(self, line: str) -> None:
        from rich.live import Live
        from rich.text import Text

        text = Text(line, no_wrap=True, overflow="ellipsis", style="bold")
        try:
            if self._live is None:
                self._live = Live(
                    text, console=self._rich, auto_refresh=False, transient=True,
                    redirect_stdout=True, redirect_stderr=True,
                )  # fmt: skip
                self._live.start()
            self._live.update(text, refresh=True)
        except (OSError, ValueError):
            self.live = False


def _stamp(record: dict[str, Any]) -> str:
    when = record.get("time")
    when = when if isinstance(when, (int, float)) else time.time()
    return f"[rose {time.strftime('%H:%M:%S', time.localtime(when))}]"


def _style(kind: Any) -> str | None:
    if kind in (EventType.WORKER_FAILED, EventType.HANG_DETECTED, EventType.FATAL):
        return "bold red"
    if kind == EventType.FIRST_STEP:
        return "green"
    return None


def _who(record: dict[str, Any]) -> str:
    if record.get("source") == "torchrun":
        return f"torchrun (pid {record.get('pid')})"
    rank = record.get("rank")
    who = f"rank {rank}" if rank is not None else "a worker"
    return f"{who} (pid {record.get('pid')})" if record.get("pid") else who


def _how(record: dict[str, Any]) -> str:
    if record.get("signal"):
        return f"killed by {record['signal']}"
    code = record.get("exit_code")
    return f"exited {code}" if code is not None else "exited (code not yet known)"


def _failure_block(record: dict[str, Any], stamp: str) -> str:
    step = record.get("step")
    at = f" at step {step}" if step is not None else ""
    if record.get("type") == EventType.HANG_DETECTED:
        head = (
            f"{stamp} HANG in attempt {record.get('attempt')}{at}: {_who(record)} made no "
            f"progress for {record.get('stalled_for')} s ({record.get('phase')} phase, timeout "
            f"{record.get('timeout')} s)"
        )
        return head
    head = f"{stamp} FAILURE in attempt {record.get('attempt')}{at}: {_who(record)} {_how(record)}"
    tail = [ln for ln in str(record.get("log_tail") or "").splitlines() if ln.strip()]
    if not tail:
        return head
    rank = record.get("rank")
    title = f"    last lines of rank {rank}'s log:" if rank is not None else "    log tail:"
    return "\n".join([head, title, *(f"    | {ln}" for ln in tail[-LOG_TAIL_LINES:])])


def _stopped_line(record: dict[str, Any], failure: dict[str, Any] | None, stamp: str) -> str:
    lead = "    " if failure is not None else f"{stamp} "
    line = (
        f"{lead}attempt {record.get('attempt')} stopped in {record.get('seconds')} s "
        f"({record.get('terminated')} worker(s) exited on SIGTERM, {record.get('killed')} "
        "killed)"
    )
    root = record.get("root_cause")
    if isinstance(root, dict) and failure is not None:
        known = (failure.get("rank"), failure.get("exit_code"))
        if (root.get("rank"), root.get("exit_code")) != known:
            line += f"; root cause: {_who(root)} {_how(root)}"
    return line


def _seconds_between(start: dict[str, Any], end: dict[str, Any]) -> str:
    a, b = start.get("mono"), end.get("mono")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        a, b = start.get("time"), end.get("time")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "?"
    return f"{max(0.0, b - a):.1f} s"


def event_line(record: dict[str, Any]) -> str:
    """One event as one line (plus its log tail, indented, when it has one)."""
    stamp = _stamp(record)
    if record.get("type") == EventType.WORKERS_STARTED:
        workers = ", ".join(f"rank {r} pid {p}" for r, p in (record.get("workers") or {}).items())
        return (
            f"{stamp} attempt {record.get('attempt')} running: {workers or 'no workers'} "
            f"(torchrun pid {record.get('torchrun_pid')})\n"
            f"    run dir {record.get('run_dir')}; worker output in "
            f"{record.get('log_dir') or 'logs/attempt-' + str(record.get('attempt'))}/"
        )
    parts = []
    keys = [k for k in _LINE_FIRST if k in record]
    keys += sorted(k for k in record if k not in keys and k not in ("time", "mono", "type"))
    for key in keys:
        value = record[key]
        if key == "log_tail" or value is None or value == "":
            continue
        parts.append(f"{key}={value}")
    line = f"{stamp} {record.get('type')}: " + " ".join(parts)
    tail = record.get("log_tail")
    if tail:
        line += "\n    " + "\n    ".join(str(tail).splitlines()[-LOG_TAIL_LINES:])
    return line
