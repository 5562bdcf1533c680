"""The run report's plot: the loss curve with failures and resumes marked, above a timeline of
the attempts. Needs matplotlib (``pip install 'rosetrainer[report]'``), imported only here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools.report_model import FailureRecord, Report

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
    fig = Figure(figsize=(10, 9 if report.intervals else 7), dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins: an automatic layout gives up on labels placed near the axes' edges.
    if report.intervals:
        ax_loss, ax_every, ax_time = fig.subplots(3, 1, height_ratios=[3, 1.5, 2])
        _plot_intervals(ax_every, report)
    else:
        ax_loss, ax_time = fig.subplots(2, 1, height_ratios=[3, 2])
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.08, hspace=0.35)
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
        + (
            f"{report.steps_lost} step(s) lost"
            if report.final_step is not None
            else "steps unknown"
        )
    )
    if not report.loss:
        ax.text(
            0.5, 0.5, "no loss: metrics.jsonl is missing or empty (a script that writes none)",
            ha="center",
            va="center", transform=ax.transAxes,
        )  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


# Each failure's marks on the loss curve: (FailureRecord field, colour, line style, label).
_FAILURE_MARKS = (
    ("step", "#c62828", "-", "failure (last step reached)"),
    ("resumed_from", "#2e7d32", "--", "resume (checkpoint step)"),
)


def _mark_failures(ax: Any, failures: list[FailureRecord]) -> None:
    """A line at each failure's last step and at its resume step, the steps lost between shaded."""
    for i, f in enumerate(failures):
        for name, colour, style, label in _FAILURE_MARKS:
            step = getattr(f, name)
            if step is not None:
                ax.axvline(
                    step,
                    color=colour,
                    linestyle=style,
                    linewidth=1.0,
                    label=label if i == 0 else None,  # one legend entry for all failures
                )
        if f.step is not None and f.resumed_from is not None and f.step > f.resumed_from:
            ax.axvspan(f.resumed_from, f.step, color="#c62828", alpha=0.08)


_TIER_COLOURS = {"disk": "#1565c0", "memory": "#ef6c00"}


def _plot_intervals(ax: Any, report: Report) -> None:
    """The auto checkpoint intervals by step, one line per tier, as the trainer chose them."""
    last_step = max([report.final_step or 0] + [s for s, _, _ in report.intervals])
    for tier, colour in _TIER_COLOURS.items():
        points = [(step, every) for step, t, every in report.intervals if t == tier]
        if not points:
            continue
        steps, values = zip(*[*points, (last_step, points[-1][1])], strict=True)
        ax.step(steps, values, where="post", color=colour, linewidth=1.2, label=tier)
    ax.set_xlabel("step")
    ax.set_ylabel("steps between saves")
    ax.set_title("auto checkpoint intervals (Young/Daly)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


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
            start, y + 0.32, f"from step {_step(a.resume_step)}: {a.outcome}", fontsize=7,
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


def _step(step: int | None) -> str:
    return "?" if step is None else str(step)
