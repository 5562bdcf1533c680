"""The run report: what happened to a run, read back from its run directory.

``python -m tools.report RUN_DIR`` prints a summary — attempts, failures by cause with the
root-cause rank, each recovery's phases, steps lost, goodput, the newest valid checkpoint — and
writes ``RUN_DIR/report.png`` (the loss curve with failures and resumes marked, and a timeline of
attempts) when matplotlib is installed (``pip install 'rosetrainer[report]'``).

Everything comes from files the run already writes: ``events.jsonl`` (the supervisor's log, plus
``fault_injected`` lines from the chaos tool), ``metrics.jsonl`` (the trainer's per-step records)
and ``checkpoints/``. Reading never changes the run directory, except for writing the PNG.

A multi-node run directory holds one event log per node (``events-<tag>.jsonl``, no
``events.jsonl``). Each node is reported on its own: its attempts and failures from its own log,
the loss curve and first-step times from the one ``metrics.jsonl`` (global rank 0 writes it, and
steps are global), the checkpoints shared. With no node chosen every node is reported, one section
and one plot (``report-<tag>.png``) per node; ``--node TAG`` reports one (plot ``report-<tag>.png``
too).

A recovery's phases, for a failure of attempt N followed by attempt N+1:

- detect: the injected fault (``fault_injected``), when one is logged → ``worker_failed`` or
  ``hang_detected``;
- stop: detection → ``stopped`` (the failed attempt's whole tree is gone);
- back off: ``stopped`` → ``launch`` of N+1 (choosing the checkpoint and the backoff delay);
- launch: ``launch`` → ``workers_started`` (torchrun up, workers spawned);
- first step: ``workers_started`` → the first step after the resume point completed (its
  ``metrics.jsonl`` time when present, else the supervisor's ``first_step`` event).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runcontract import layout
from runcontract.events import EventType, read_jsonl

EVENTS_FILE = layout.per_node_name(layout.EVENTS, None)
PNG_FILE = layout.per_node_name(layout.REPORT_PNG, None)

PHASES = ("detect", "stop", "backoff", "launch", "first_step")
"""The phases of one recovery, in order (see the module docstring)."""

# Events that end the run, and the end state each gives it.
_ENDING = {
    EventType.DONE: "succeeded",
    EventType.INTERRUPTED: "interrupted",
}
# Chaos fault kinds that end in a failed attempt; others (a preemption, a full disk) do not, so
# they are never taken for the cause of a later failure.
_FAILING_FAULTS = frozenset({"kill-worker", "kill-writer", "hang", "kill-torchrun", "corrupt"})

PROG = "python -m tools.report"


class ReportError(Exception):
    """The run directory cannot be reported on; the message says why and what to check."""


@dataclass
class Attempt:
    """One launch of torchrun, as the events tell it."""

    number: int
    """1-based over the whole run directory (a relaunched supervisor continues the count)."""
    supervisor_attempt: int
    """The attempt number the supervisor logged (restarts at 1 when a supervisor is relaunched)."""
    launched_at: float
    """Unix time of the ``launch`` event."""
    resume_step: int
    """The step it resumed from (0: a fresh start)."""
    workers_started_at: float | None = None
    first_step_at: float | None = None
    """Unix time the first step after ``resume_step`` completed."""
    ended_at: float | None = None
    """Unix time the attempt was over (stopped, or the run ended); None when the log stops."""
    outcome: str = "unknown"
    """``succeeded``, ``failed``, ``hung``, ``interrupted``, or ``unknown`` (log ends mid-way)."""
    last_step: int | None = None
    """The highest step known to have been reached in this attempt."""


@dataclass
class FailureRecord:
    """One failed attempt: its cause, its root-cause rank, and the work it cost."""

    attempt: int
    """``Attempt.number`` of the failed attempt."""
    cause: str
    """Human cause, e.g. ``worker killed by SIGKILL``, ``hang``, ``torchrun exited 1``."""
    rank: int | None
    """The root-cause rank (the earliest failing rank; the stalled rank of a hang)."""
    pid: int | None
    exit_code: int | None
    signal: str | None
    detected_at: float
    injected: str | None = None
    """The chaos fault kind that caused it, when one was logged."""
    injected_at: float | None = None
    step: int | None = None
    """The last step reached before the failure (None when the events do not tell)."""
    resumed_from: int | None = None
    """The step the next attempt resumed from (None when there was no next attempt)."""

    @property
    def steps_lost(self) -> int | None:
        """Steps done but not kept: ``step - resumed_from`` (None when either is unknown)."""
        if self.step is None or self.resumed_from is None:
            return None
        return max(0, self.step - self.resumed_from)


@dataclass
class Recovery:
    """The phases from one failure to the first completed step after the resume, in seconds."""

    failed_attempt: int
    next_attempt: int
    phases: dict[str, float | None]
    """Seconds per phase of ``PHASES``; None when an event the phase needs is missing."""
    first_step_source: str
    """``metrics`` or ``event``: where the first step's time came from."""

    @property
    def total(self) -> float | None:
        """Fault (or detection, when no fault was logged) → first step after resume."""
        values = [self.phases[p] for p in PHASES if p != "detect"]
        if any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None) + (self.phases["detect"] or 0.0)


@dataclass
class Checkpoint:
    """The newest checkpoint that verifies."""

    step: int
    path: Path


@dataclass
class Report:
    """Everything the summary and the plot show. Times are unix seconds."""

    run_dir: Path
    started_at: float | None
    ended_at: float | None
    end_state: str
    """The run's end: ``succeeded``, ``interrupted``, a give-up reason, or ``running or lost``."""
    attempts: list[Attempt] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    cold_start: float | None = None
    """Seconds from the first launch to the first completed step."""
    start_step: int = 0
    """The step the run directory's first attempt started from."""
    final_step: int | None = None
    newest_checkpoint: Checkpoint | None = None
    loss: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) from metrics.jsonl."""
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    faults_injected: int = 0
    node: str | None = None
    """The node's tag on a multi-node run directory (its ``events-<tag>.jsonl``); None on one."""

    @property
    def wall_seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)

    @property
    def useful_steps(self) -> int | None:
        """Steps that count: the final step minus where the run started."""
        if self.final_step is None:
            return None
        return max(0, self.final_step - self.start_step)

    @property
    def goodput(self) -> float | None:
        """Useful steps per wall-clock second over the whole run (None when unknown)."""
        wall, useful = self.wall_seconds, self.useful_steps
        if not wall or useful is None:
            return None
        return useful / wall

    @property
    def steps_lost(self) -> int:
        """Steps lost over all failures whose loss is known."""
        return sum(f.steps_lost or 0 for f in self.failures)

    def causes(self) -> list[tuple[str, int, list[int | None]]]:
        """(cause, count, root-cause ranks in order) per cause, most frequent first."""
        counts = Counter(f.cause for f in self.failures)
        return [
            (cause, n, [f.rank for f in self.failures if f.cause == cause])
            for cause, n in counts.most_common()
        ]


# -- reading -------------------------------------------------------------------------------------


def _cause(event: dict[str, Any]) -> str:
    if event["type"] == EventType.HANG_DETECTED:
        phase = event.get("phase")
        return f"hang ({phase} phase)" if phase else "hang"
    who = "torchrun" if event.get("source") == "torchrun" else "worker"
    if event.get("signal"):
        return f"{who} killed by {event['signal']}"
    code = event.get("exit_code")
    return f"{who} exited {code}" if code is not None else f"{who} exited (code unknown)"


def _newest_valid(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; read-only (nothing is quarantined)."""
    ckpt_dir = run_dir / layout.CHECKPOINTS
    if not ckpt_dir.is_dir():
        return None
    from trainer.checkpoint import CheckpointIncompatible, CheckpointInvalid, verify

    found = []
    for entry in ckpt_dir.iterdir():
        step = layout.parse_step(entry.name)
        if step is not None and entry.is_dir():
            found.append((step, entry))
    for step, path in sorted(found, reverse=True):
        try:
            verify(path)
        except (CheckpointInvalid, CheckpointIncompatible, OSError):
            continue
        return Checkpoint(step, path)
    return None


def node_tags(run_dir: str | Path) -> list[str]:
    """The tags of the nodes with an event log (``events-<tag>.jsonl``) in ``run_dir``, in node
    order; empty for a one-node run directory."""
    return layout.node_tags(Path(run_dir), layout.EVENTS)


def build_report(run_dir: str | Path, node: str | None = None) -> Report:
    """Read ``run_dir``'s events, metrics and checkpoints into a Report; on a multi-node run
    directory, those of node ``node`` (its ``events-<node>.jsonl``).

    Raises ReportError when the directory or the event log is missing or holds no event (for a
    multi-node directory read without ``node``, or a ``node`` it does not have, the message names
    its nodes).
    """
    run_dir = Path(run_dir)
    events_path = run_dir / layout.per_node_name(layout.EVENTS, node)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not events_path.is_file():
        tags = node_tags(run_dir)
        if node and (run_dir / EVENTS_FILE).is_file():
            raise ReportError(
                f"node {node!r}: {run_dir} is a one-node run directory ({EVENTS_FILE}); "
                "leave out the node"
            )
        if node and tags:
            raise ReportError(
                f"node {node!r}: {run_dir} has no {events_path.name}; "
                f"its nodes are {', '.join(tags)}"
            )
        if tags:
            raise ReportError(
                f"{run_dir} is a multi-node run directory (nodes: {', '.join(tags)}): "
                "choose one node"
            )
        raise ReportError(f"{events_path} not found: is {run_dir} a supervised run directory?")
    try:
        events = read_jsonl(events_path)
    except OSError as e:
        raise ReportError(f"cannot read {events_path}: {e.strerror or e}") from None
    events = [e for e in events if "type" in e and isinstance(e.get("time"), (int, float))]
    if not events:
        raise ReportError(f"{events_path} holds no events: the run has not started")
    metrics: list[dict[str, Any]] = []
    metrics_path = run_dir / layout.METRICS
    if metrics_path.is_file():
        try:
            metrics = read_jsonl(metrics_path)
        except OSError:
            metrics = []

    report = Report(
        run_dir=run_dir,
        started_at=None,
        ended_at=None,
        end_state="running or lost",
        node=node or None,
    )
    _walk_events(report, events)
    _use_metrics(report, metrics)
    report.newest_checkpoint = _newest_valid(run_dir)
    return report


def build_reports(run_dir: str | Path, node: str | None = None) -> list[Report]:
    """The reports ``launch.py report`` shows: the one report of a one-node run directory; on a
    multi-node one, node ``node``'s, or with ``node`` None one per node (``node_tags`` order).

    Raises ReportError as ``build_report`` does.
    """
    run_dir = Path(run_dir)
    if node is not None or (run_dir / EVENTS_FILE).is_file():
        return [build_report(run_dir, node)]
    tags = node_tags(run_dir)
    if not tags:
        return [build_report(run_dir)]  # raises: nothing to report
    return [build_report(run_dir, tag) for tag in tags]


def png_path(report: Report, base: str | Path | None = None, several: bool = False) -> Path:
    """Where ``launch.py report`` writes ``report``'s plot: ``RUN_DIR/report.png`` on one node,
    ``RUN_DIR/report-<tag>.png`` for a node of a multi-node run. An explicit ``base`` is used as
    it is, except that with ``several`` reports each node's tag is added to its stem."""
    if base is None:
        name = layout.per_node_name(layout.REPORT_PNG, report.node)
        return report.run_dir / name
    base = Path(base)
    if several and report.node:
        return base.with_name(f"{base.stem}-{report.node}{base.suffix}")
    return base


class _Walk:
    """What reading the event log in file order carries from one event to the next; one method
    per event type that matters (``_HANDLERS``), every other type is passed over."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.by_local: dict[int, Attempt] = {}  # the current supervisor's attempts, its numbering
        self.pending_fault: dict[str, Any] | None = None
        self.last_failure: FailureRecord | None = None
        self.current: Attempt | None = None
        self.selected_step = 0

    def attempt(self, ev: dict[str, Any], or_current: bool = True) -> Attempt | None:
        """The attempt an event names by the supervisor's numbering; else, with ``or_current``,
        the newest one launched."""
        att = self.by_local.get(int(ev.get("attempt") or 0))
        return att if att is not None or not or_current else self.current

    def supervisor_started(self, ev: dict[str, Any], t: float) -> None:
        if self.report.started_at is None:
            self.report.started_at = t
        if self.current is not None and self.current.ended_at is None:
            self.current.outcome = "unknown"  # the previous supervisor vanished mid-attempt
        self.by_local = {}
        self.current = None
        self.report.end_state = "running or lost"

    def checkpoint_selected(self, ev: dict[str, Any], t: float) -> None:
        self.selected_step = int(ev.get("step") or 0)

    def launch(self, ev: dict[str, Any], t: float) -> None:
        report = self.report
        resume = ev.get("resume_step")
        resume_step = int(resume) if resume is not None else self.selected_step
        self.current = Attempt(
            number=len(report.attempts) + 1,
            supervisor_attempt=int(ev.get("attempt") or 0),
            launched_at=t,
            resume_step=resume_step,
            last_step=resume_step,
        )
        if not report.attempts:
            report.start_step = resume_step
        report.attempts.append(self.current)
        self.by_local[self.current.supervisor_attempt] = self.current
        if self.last_failure is not None and self.last_failure.resumed_from is None:
            self.last_failure.resumed_from = resume_step
        self.pending_fault = None

    def workers_started(self, ev: dict[str, Any], t: float) -> None:
        att = self.attempt(ev, or_current=False)
        if att is not None and att.workers_started_at is None:
            att.workers_started_at = t

    def first_step(self, ev: dict[str, Any], t: float) -> None:
        att = self.attempt(ev, or_current=False)
        if att is not None:
            if att.first_step_at is None:
                att.first_step_at = t
            _raise_step(att, ev.get("step"))

    def fault_injected(self, ev: dict[str, Any], t: float) -> None:
        self.report.faults_injected += 1
        if ev.get("kind") in _FAILING_FAULTS:
            self.pending_fault = ev
        att = self.attempt(ev)
        if att is not None:
            _raise_step(att, ev.get("step"))

    def failure(self, ev: dict[str, Any], t: float) -> None:
        att = self.attempt(ev)
        if att is None:
            return
        att.outcome = "hung" if ev["type"] == EventType.HANG_DETECTED else "failed"
        _raise_step(att, ev.get("step"))
        # A fault counts as this failure's cause only if it hit this attempt.
        fault = self.pending_fault
        if fault is not None and int(fault.get("attempt") or 0) not in (0, att.supervisor_attempt):
            fault = None
        self.last_failure = FailureRecord(
            attempt=att.number,
            cause=_cause(ev),
            rank=ev.get("rank"),
            pid=ev.get("pid"),
            exit_code=ev.get("exit_code"),
            signal=ev.get("signal"),
            detected_at=t,
            injected=fault.get("kind") if fault else None,
            injected_at=float(fault["time"]) if fault else None,
            step=att.last_step,
        )
        self.report.failures.append(self.last_failure)
        self.pending_fault = None

    def stopped(self, ev: dict[str, Any], t: float) -> None:
        att = self.attempt(ev)
        if att is None or att.ended_at is not None:
            return
        att.ended_at = t
        root = ev.get("root_cause") or {}
        # The exit code may be learnt only once the tree is down (torchrun's log).
        failures = self.report.failures
        failure = failures[-1] if failures else None
        if failure is not None and failure.attempt == att.number and root:
            if failure.exit_code is None and root.get("exit_code") is not None:
                failure.exit_code = root.get("exit_code")
                failure.signal = root.get("signal")
                failure.cause = _cause({"type": EventType.WORKER_FAILED, **root})

    def run_ended(self, ev: dict[str, Any], t: float) -> None:
        self.report.end_state = _ENDING[ev["type"]]
        self.report.ended_at = t
        current = self.current
        if current is not None:
            if ev["type"] == EventType.DONE:
                current.outcome = "succeeded"
            elif current.outcome == "unknown":
                current.outcome = "interrupted"
            _raise_step(current, ev.get("step"))
            if current.ended_at is None:
                current.ended_at = t

    def gave_up(self, ev: dict[str, Any], t: float) -> None:
        what = str(ev["type"]).replace("_", " ")
        self.report.end_state = f"gave up: {what} ({ev.get('reason') or what})"
        self.report.ended_at = t


_HANDLERS: dict[EventType, Callable[[_Walk, dict[str, Any], float], None]] = {
    EventType.SUPERVISOR_STARTED: _Walk.supervisor_started,
    EventType.CHECKPOINT_SELECTED: _Walk.checkpoint_selected,
    EventType.LAUNCH: _Walk.launch,
    EventType.WORKERS_STARTED: _Walk.workers_started,
    EventType.FIRST_STEP: _Walk.first_step,
    EventType.FAULT_INJECTED: _Walk.fault_injected,
    EventType.WORKER_FAILED: _Walk.failure,
    EventType.HANG_DETECTED: _Walk.failure,
    EventType.STOPPED: _Walk.stopped,
    EventType.DONE: _Walk.run_ended,
    EventType.INTERRUPTED: _Walk.run_ended,
    EventType.FATAL: _Walk.gave_up,
    EventType.CRASH_LOOP: _Walk.gave_up,
    EventType.BUDGET_EXHAUSTED: _Walk.gave_up,
}
"""What each event type does to the report; an event's ``type`` (a plain string) finds its
handler here, as EventType is a ``str`` enum."""


def _walk_events(report: Report, events: list[dict[str, Any]]) -> None:
    """Attempts, failures and the run's end from the event log, in file order."""
    walk = _Walk(report)
    for ev in events:
        handler = _HANDLERS.get(ev["type"])
        if handler is not None:
            handler(walk, ev, float(ev["time"]))
    _settle_failures(report)
    if report.attempts and report.ended_at is None:
        report.ended_at = float(events[-1]["time"])
    _settle_final_step(report)


def _settle_failures(report: Report) -> None:
    """Each failure's last step, once everything about its attempt is known. The checkpoint the
    next attempt resumed from proves its step was reached, even when no event reported it (the
    heartbeat the events read lags the loop)."""
    for failure in report.failures:
        step = report.attempts[failure.attempt - 1].last_step
        if failure.resumed_from is not None:
            step = failure.resumed_from if step is None else max(step, failure.resumed_from)
        failure.step = step


def _settle_final_step(report: Report) -> None:
    steps = [a.last_step for a in report.attempts if a.last_step is not None]
    report.final_step = max(steps) if steps else None


def _raise_step(att: Attempt, step: Any) -> None:
    if isinstance(step, int) and (att.last_step is None or step > att.last_step):
        att.last_step = step


def _use_metrics(report: Report, metrics: list[dict[str, Any]]) -> None:
    """Loss curve, precise first-step times, recoveries and the cold start."""
    for m in metrics:
        step = m.get("step")
        if not isinstance(step, int):
            continue
        if isinstance(m.get("loss"), (int, float)):
            report.loss.append((step, float(m["loss"])))
        if isinstance(m.get("eval_loss"), (int, float)):
            report.eval_loss.append((step, float(m["eval_loss"])))
    step_time = {
        int(m["step"]): float(m["time"])
        for m in metrics
        if isinstance(m.get("step"), int)
        and isinstance(m.get("time"), (int, float))
        and "loss" in m
    }
    sources = _time_first_steps(report, step_time)
    _settle_failures(report)
    _settle_final_step(report)
    if report.attempts:
        first = report.attempts[0]
        if first.first_step_at is not None:
            report.cold_start = first.first_step_at - first.launched_at
    _add_recoveries(report, sources)


def _time_first_steps(report: Report, step_time: dict[int, float]) -> dict[int, str]:
    """Each attempt's first step from the metrics' step times where they hold it, and how far
    each attempt got; returns where each attempt's first-step time came from, by attempt."""
    sources: dict[int, str] = {}
    for i, att in enumerate(report.attempts):
        # metrics.jsonl keeps each step once: the record of step resume+1 belongs to this attempt
        # only when it was written inside this attempt's lifetime.
        t = step_time.get(att.resume_step + 1)
        window_end = (
            report.attempts[i + 1].launched_at if i + 1 < len(report.attempts) else float("inf")
        )
        if t is not None and att.launched_at < t <= window_end:
            att.first_step_at = t
            sources[att.number] = "metrics"
            _raise_step(att, att.resume_step + 1)
        elif att.first_step_at is not None:
            sources[att.number] = "event"
        # Steps this attempt completed and kept are a lower bound on how far it got.
        kept = [s for s, ts in step_time.items() if att.launched_at < ts <= window_end]
        if kept:
            _raise_step(att, max(kept))
    return sources


def _add_recoveries(report: Report, sources: dict[int, str]) -> None:
    """One Recovery per failure that was followed by another attempt."""
    for failure in report.failures:
        if failure.attempt >= len(report.attempts):
            continue
        failed = report.attempts[failure.attempt - 1]
        nxt = report.attempts[failure.attempt]
        phases: dict[str, float | None] = {
            "detect": _gap(failure.injected_at, failure.detected_at),
            "stop": _gap(failure.detected_at, failed.ended_at),
            "backoff": _gap(failed.ended_at, nxt.launched_at),
            "launch": _gap(nxt.launched_at, nxt.workers_started_at),
            "first_step": _gap(nxt.workers_started_at, nxt.first_step_at),
        }
        report.recoveries.append(
            Recovery(
                failed_attempt=failed.number,
                next_attempt=nxt.number,
                phases=phases,
                first_step_source=sources.get(nxt.number, "none"),
            )
        )


def _gap(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return end - start


# -- text ----------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _n(value: Any) -> str:
    return "-" if value is None else str(value)


def render_text(report: Report) -> str:
    """The human summary (plain text, fixed-width tables). Never raises for missing data:
    unknown values print as ``-``."""
    lines = _summary_lines(report)
    lines += ["", "attempts:", *_attempt_lines(report)]
    lines += ["", "failures by cause (root-cause rank):", *_failure_lines(report)]
    lines += ["", "recoveries (seconds):", *_recovery_lines(report)]
    return "\n".join(lines) + "\n"


def _summary_lines(report: Report) -> list[str]:
    title = f"run report: {report.run_dir}"
    ckpt = report.newest_checkpoint
    return [
        f"{title} (node {report.node})" if report.node else title,
        f"  outcome:     {report.end_state}; {len(report.attempts)} attempt(s), "
        f"{len(report.failures)} failure(s)"
        + (f", {report.faults_injected} fault(s) injected" if report.faults_injected else ""),
        f"  steps:       {_n(report.start_step)} -> {_n(report.final_step)} "
        f"({_n(report.useful_steps)} useful, {report.steps_lost} lost to failures)",
        f"  goodput:     {_s(report.goodput)} useful steps/s over "
        f"{_s(report.wall_seconds, 1)} s wall clock",
        f"  cold start:  {_s(report.cold_start)} s (launch -> first step)",
        f"  checkpoint:  newest valid step {ckpt.step} ({ckpt.path})"
        if ckpt
        else "  checkpoint:  no valid checkpoint",
    ]


def _attempt_lines(report: Report) -> list[str]:
    lines = [f"  {'#':>3} {'start s':>8} {'resume':>6} {'last step':>9} {'ran s':>7}  outcome"]
    t0 = report.started_at or 0.0
    for a in report.attempts:
        ran = _gap(a.launched_at, a.ended_at)
        lines.append(
            f"  {a.number:>3} {a.launched_at - t0:>8.2f} {a.resume_step:>6} "
            f"{_n(a.last_step):>9} {_s(ran):>7}  {a.outcome}"
        )
    return lines


def _failure_lines(report: Report) -> list[str]:
    if not report.failures:
        return ["  none"]
    lines = []
    for cause, count, ranks in report.causes():
        rank_text = ", ".join(_n(r) for r in ranks)
        lines.append(f"  {count} x {cause}: rank {rank_text}")
    lines.append("")
    lines.append(
        f"  {'attempt':>7} {'rank':>4} {'pid':>7} {'fault':>11} {'step':>5} "
        f"{'resumed':>7} {'lost':>5}  cause"
    )
    for f in report.failures:
        lines.append(
            f"  {f.attempt:>7} {_n(f.rank):>4} {_n(f.pid):>7} {_n(f.injected):>11} "
            f"{_n(f.step):>5} {_n(f.resumed_from):>7} {_n(f.steps_lost):>5}  {f.cause}"
        )
    return lines


def _recovery_lines(report: Report) -> list[str]:
    if not report.recoveries:
        return ["  none"]
    head = "".join(f"{p:>11}" for p in PHASES)
    lines = [f"  {'attempts':>9}{head}{'total':>9}  first step from"]
    for r in report.recoveries:
        cells = "".join(f"{_s(r.phases[p], 3):>11}" for p in PHASES)
        lines.append(
            f"  {f'{r.failed_attempt}->{r.next_attempt}':>9}{cells}"
            f"{_s(r.total, 3):>9}  {r.first_step_source}"
        )
    return [
        *lines,
        "  detect: fault -> detected (only when the fault was logged); stop: -> tree down;",
        "  backoff: -> relaunch; launch: -> workers up; first_step: -> first step completed",
    ]


# -- plot ----------------------------------------------------------------------------------------

_OUTCOME_COLOURS = {
    "succeeded": "#2e7d32",
    "failed": "#c62828",
    "hung": "#ef6c00",
    "interrupted": "#6a1b9a",
    "unknown": "#757575",
}


def render_png(report: Report, path: str | Path) -> bool:
    """Write the loss curve (failures and resumes marked) and the attempts' timeline to ``path``.

    Returns False, writing nothing, when matplotlib is not installed. Raises OSError when the
    file cannot be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False

    # A Figure with its own Agg canvas: no pyplot, so no global backend or state is touched.
    fig = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins: an automatic layout gives up on labels placed near the axes' edges.
    ax_loss, ax_time = fig.subplots(2, 1, height_ratios=[3, 2])
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.08, hspace=0.3)
    _plot_loss(ax_loss, report)
    _plot_timeline(ax_time, report)
    fig.savefig(str(path))
    return True


def _plot_loss(ax: Any, report: Report) -> None:
    """The train and eval loss by step, each failure and resume marked."""
    if report.loss:
        steps, losses = zip(*report.loss, strict=True)
        ax.plot(steps, losses, color="#1565c0", linewidth=1.2, label="train loss")
    if report.eval_loss:
        steps, losses = zip(*report.eval_loss, strict=True)
        ax.plot(steps, losses, "o-", color="#00838f", markersize=3, label="eval loss")
    _mark_failures(ax, report.failures)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    name = f"{report.run_dir.name} {report.node}" if report.node else report.run_dir.name
    ax.set_title(
        f"{name}: {report.end_state}, {len(report.failures)} failure(s), "
        f"{report.steps_lost} step(s) lost"
    )
    if not report.loss:
        ax.text(
            0.5, 0.5, "no loss: metrics.jsonl is missing or empty", ha="center",
            va="center", transform=ax.transAxes,
        )  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


def _mark_failures(ax: Any, failures: list[FailureRecord]) -> None:
    """A line at each failure's last step and at its resume step, the steps lost between shaded."""
    for i, f in enumerate(failures):
        if f.step is not None:
            ax.axvline(
                f.step,
                color="#c62828",
                linestyle="-",
                linewidth=1.0,
                label="failure (last step reached)" if i == 0 else None,
            )
        if f.resumed_from is not None:
            ax.axvline(
                f.resumed_from,
                color="#2e7d32",
                linestyle="--",
                linewidth=1.0,
                label="resume (checkpoint step)" if i == 0 else None,
            )
            if f.step is not None and f.step > f.resumed_from:
                ax.axvspan(f.resumed_from, f.step, color="#c62828", alpha=0.08)


def _plot_timeline(ax: Any, report: Report) -> None:
    """One bar per attempt over wall-clock time, coloured by its outcome; workers up, first
    step and injected faults marked."""
    t0 = report.started_at or (report.attempts[0].launched_at if report.attempts else 0.0)
    end = report.ended_at or t0
    for a in report.attempts:
        y = a.number
        start = a.launched_at - t0
        stop = (a.ended_at if a.ended_at is not None else end) - t0
        ax.barh(
            y,
            max(stop - start, 0.0),
            left=start,
            height=0.5,
            color=_OUTCOME_COLOURS.get(a.outcome, "#757575"),
            alpha=0.8,
        )
        if a.workers_started_at is not None:
            ax.plot(a.workers_started_at - t0, y, "|", color="black", markersize=12)
        if a.first_step_at is not None:
            ax.plot(a.first_step_at - t0, y, "v", color="black", markersize=6)
        ax.text(
            start, y + 0.32, f"from step {a.resume_step}: {a.outcome}", fontsize=7,
            va="bottom", clip_on=True,
        )  # fmt: skip
    for f in report.failures:
        if f.injected_at is not None:
            ax.plot(f.injected_at - t0, f.attempt, "x", color="black", markersize=8)
    ax.set_xlabel("seconds since the supervisor started (| workers up, v first step, x fault)")
    ax.set_ylabel("attempt")
    if report.attempts:
        ax.set_yticks([a.number for a in report.attempts])
        ax.set_ylim(0.4, len(report.attempts) + 0.9)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


# -- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``python -m tools.report RUN_DIR [--node TAG]``: print the summary, write
    ``RUN_DIR/report.png`` (on a multi-node run directory: a section and a
    ``RUN_DIR/report-<tag>.png`` per node, or only node TAG's).

    Returns 0, or 2 with one line on stderr when RUN_DIR is not a supervised run directory or
    TAG is not one of its nodes.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description="Summarise a supervised run and plot it to RUN_DIR/report.png."
    )
    parser.add_argument("run_dir", help="the run directory")
    parser.add_argument(
        "--node",
        default=None,
        metavar="TAG",
        help="multi-node run: report only this node (node1 for events-node1.jsonl; "
        "default: every node)",
    )
    parser.add_argument(
        "--png",
        default=None,
        help=f"where to write the plot (RUN_DIR/{PNG_FILE}; RUN_DIR/report-<tag>.png per node)",
    )
    parser.add_argument("--no-png", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        reports = build_reports(run_dir, args.node)
    except ReportError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    for i, report in enumerate(reports):
        if i:
            sys.stdout.write("\n")
        sys.stdout.write(render_text(report))
    if args.no_png:
        return 0
    for report in reports:
        png = png_path(report, args.png, several=len(reports) > 1)
        try:
            written = render_png(report, png)
        except OSError as e:
            print(f"plot not written: {png}: {e.strerror or e}", file=sys.stderr)
            return 2
        if not written:
            print("plot skipped: matplotlib is not installed (pip install 'rosetrainer[report]')")
            break
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
