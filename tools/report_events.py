"""The run's story read back from its files: the event log walked in file order into attempts,
failures and the run's end, then the trainer's metrics for the loss curve, precise first-step
times and each recovery's phases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runcontract.events import EventType
from tools.chaos_config import RESTARTING_FAULTS
from tools.report_model import Attempt, FailureRecord, Recovery, Report, gap

# Events that end the run, and the end state each gives it.
_ENDING = {
    EventType.DONE: "succeeded",
    EventType.INTERRUPTED: "interrupted",
}


def _cause(event: dict[str, Any]) -> str:
    if event["type"] == EventType.HANG_DETECTED:
        phase = event.get("phase")
        return f"hang ({phase} phase)" if phase else "hang"
    who = "torchrun" if event.get("source") == "torchrun" else "worker"
    if event.get("signal"):
        return f"{who} killed by {event['signal']}"
    code = event.get("exit_code")
    return f"{who} exited {code}" if code is not None else f"{who} exited (code unknown)"


class _Walk:
    """What reading the event log in file order carries from one event to the next; one method
    per event type that matters (``_HANDLERS``), every other type is passed over."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.by_local: dict[int, Attempt] = {}  # the current supervisor's attempts, its numbering
        self.pending_fault: dict[str, Any] | None = None
        self.last_failure: FailureRecord | None = None
        self.current: Attempt | None = None
        self.selected_step: int | None = 0

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
        step = ev.get("step")
        # No step: a script that resumes from its own state; where it resumes is not known.
        self.selected_step = int(step) if step is not None else None

    def launch(self, ev: dict[str, Any], t: float) -> None:
        report = self.report
        resume = ev.get("resume_step")
        resume_step = int(resume) if resume is not None else self.selected_step
        if "resume_step" in ev and resume is None:
            resume_step = None
        self.current = Attempt(
            number=len(report.attempts) + 1,
            supervisor_attempt=int(ev.get("attempt") or 0),
            launched_at=t,
            resume_step=resume_step,
            last_step=resume_step,
            standby=bool(ev.get("standby")),
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
        if ev.get("kind") in RESTARTING_FAULTS:
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

    def diverged(self, ev: dict[str, Any], t: float) -> None:
        step = ev.get("step")
        self.report.divergences.append(
            (step if isinstance(step, int) else None, str(ev.get("action") or "stop"))
        )

    def data_skipped(self, ev: dict[str, Any], t: float) -> None:
        ranges = ev.get("skipped")
        if isinstance(ranges, list):
            self.report.skipped = [
                (r[0], r[1])
                for r in ranges
                if isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
            ]

    def checkpoint_interval(self, ev: dict[str, Any], t: float) -> None:
        step, tier, every = ev.get("step"), ev.get("tier"), ev.get("every")
        if isinstance(step, int) and isinstance(every, int) and tier in ("disk", "memory"):
            self.report.intervals.append((step, str(tier), every))

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
    EventType.DIVERGED: _Walk.diverged,
    EventType.DATA_SKIPPED: _Walk.data_skipped,
    EventType.CHECKPOINT_INTERVAL: _Walk.checkpoint_interval,
    EventType.FATAL: _Walk.gave_up,
    EventType.CRASH_LOOP: _Walk.gave_up,
    EventType.BUDGET_EXHAUSTED: _Walk.gave_up,
}
"""What each event type does to the report; an event's ``type`` (a plain string) finds its
handler here, as EventType is a ``str`` enum."""


def walk_events(report: Report, events: list[dict[str, Any]]) -> None:
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


def use_metrics(report: Report, metrics: list[dict[str, Any]]) -> None:
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
        first = (att.resume_step or 0) + 1
        t = step_time.get(first) if att.resume_step is not None else None
        window_end = (
            report.attempts[i + 1].launched_at if i + 1 < len(report.attempts) else float("inf")
        )
        if t is not None and att.launched_at < t <= window_end:
            att.first_step_at = t
            sources[att.number] = "metrics"
            _raise_step(att, first)
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
            "detect": gap(failure.injected_at, failure.detected_at),
            "stop": gap(failure.detected_at, failed.ended_at),
            "backoff": gap(failed.ended_at, nxt.launched_at),
            "launch": gap(nxt.launched_at, nxt.workers_started_at),
            "first_step": gap(nxt.workers_started_at, nxt.first_step_at),
        }
        report.recoveries.append(
            Recovery(
                failed_attempt=failed.number,
                next_attempt=nxt.number,
                phases=phases,
                first_step_source=sources.get(nxt.number, "none"),
                standby=nxt.standby,
            )
        )
