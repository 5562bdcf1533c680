"""The run report as plain text: a summary, then fixed-width tables of the attempts, the
failures by cause and each recovery's phases."""

from __future__ import annotations

from typing import Any

from tools.report_model import PHASES, Report, gap


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
    lines = [
        f"{title} (node {report.node})" if report.node else title,
        f"  outcome:     {report.end_state}; {len(report.attempts)} attempt(s), "
        f"{len(report.failures)} failure(s)"
        + (f", {report.faults_injected} fault(s) injected" if report.faults_injected else ""),
        *_step_lines(report),
        f"  cold start:  {_s(report.cold_start)} s (launch -> first step)",
        f"  checkpoint:  newest valid step {ckpt.step} ({ckpt.path})"
        if ckpt
        else "  checkpoint:  no valid checkpoint",
    ]
    if ckpt and ckpt.params_sha256:
        lines.append(f"  params:      params_sha256={ckpt.params_sha256}")
    return lines + _interval_lines(report) + _divergence_lines(report)


def _interval_lines(report: Report) -> list[str]:
    """The auto checkpoint intervals: the last one chosen per tier, and their range."""
    lines = []
    for tier, label in (("disk", "disk every:"), ("memory", "mem every:")):
        chosen = [every for _, t, every in report.intervals if t == tier]
        if chosen:
            lines.append(
                f"  {label:<13}{chosen[-1]} steps at the end (auto; "
                f"{min(chosen)}-{max(chosen)} over {len(chosen)} choice(s))"
            )
    return lines


def _step_lines(report: Report) -> list[str]:
    """Steps and goodput; "unknown" for a script that reports no steps (no heartbeats, no
    metrics), never a made-up 0."""
    wall = f"{_s(report.wall_seconds, 1)} s wall clock"
    if report.final_step is None:
        return [
            "  steps:       unknown (the script reported no steps: no heartbeats, no metrics)",
            f"  goodput:     unknown over {wall}",
        ]
    return [
        f"  steps:       {_n(report.start_step)} -> {_n(report.final_step)} "
        f"({_n(report.useful_steps)} useful, {report.steps_lost} lost to failures)",
        f"  goodput:     {_s(report.goodput)} useful steps/s over {wall}",
    ]


def render_summary(report: Report) -> list[str]:
    """The short summary the launcher prints when a run ends: steps, wall time and goodput,
    each failure with its recovery time, the newest checkpoint and its parameters' hash."""
    lines = _step_lines(report)
    recovered = {r.failed_attempt: r for r in report.recoveries}
    for f in report.failures:
        rec = recovered.get(f.attempt)
        if rec is None:
            after = "not recovered"
        else:
            after = f"recovered in {_s(rec.total, 1)} s, resumed from step {_n(f.resumed_from)}"
        where = f"rank {f.rank}" if f.rank is not None else "no rank"
        lines.append(
            f"  failure:     attempt {f.attempt}, {where}: {f.cause} at step {_n(f.step)}; {after}"
        )
    if not report.failures:
        lines.append("  failures:    none")
    ckpt = report.newest_checkpoint
    if ckpt is None:
        lines.append("  checkpoint:  no valid checkpoint")
    else:
        lines.append(f"  checkpoint:  step {ckpt.step} ({ckpt.path})")
        if ckpt.params_sha256:
            lines.append(f"  params:      params_sha256={ckpt.params_sha256}")
    return lines


def _divergence_lines(report: Report) -> list[str]:
    """The divergences and the data skipped after them; nothing when there were none."""
    if not report.divergences:
        return []
    where = ", ".join(f"step {_n(step)} ({action})" for step, action in report.divergences)
    lines = [f"  diverged:    {len(report.divergences)} time(s): {where}"]
    if report.skipped:
        ranges = ", ".join(f"[{a}, {b})" for a, b in report.skipped)
        samples = sum(b - a for a, b in report.skipped)
        lines.append(f"  skipped:     {samples} sample(s) never trained on: positions {ranges}")
    return lines


def _attempt_lines(report: Report) -> list[str]:
    lines = [f"  {'#':>3} {'start s':>8} {'resume':>6} {'last step':>9} {'ran s':>7}  outcome"]
    t0 = report.started_at or 0.0
    for a in report.attempts:
        ran = gap(a.launched_at, a.ended_at)
        lines.append(
            f"  {a.number:>3} {a.launched_at - t0:>8.2f} {_n(a.resume_step):>6} "
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
    lines = [f"  {'attempts':>9}{head}{'total':>9}  {'start':<8} first step from"]
    for r in report.recoveries:
        cells = "".join(f"{_s(r.phases[p], 3):>11}" for p in PHASES)
        lines.append(
            f"  {f'{r.failed_attempt}->{r.next_attempt}':>9}{cells}"
            f"{_s(r.total, 3):>9}  {'standby' if r.standby else 'cold':<8} {r.first_step_source}"
        )
    return [
        *lines,
        "  detect: fault -> detected (only when the fault was logged); stop: -> tree down;",
        "  backoff: -> relaunch; launch: -> workers up (start standby: a waiting standby's",
        "  gate opened; cold: a new torchrun); first_step: -> first step completed",
    ]
