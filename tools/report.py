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
from pathlib import Path
from typing import Any

from runcontract import layout
from runcontract.events import read_jsonl
from tools.report_events import use_metrics, walk_events
from tools.report_model import PHASES, Checkpoint, Report
from tools.report_plot import render_png
from tools.report_text import render_summary, render_text

__all__ = [
    "PHASES",
    "Report",
    "ReportError",
    "build_report",
    "build_reports",
    "main",
    "node_tags",
    "png_path",
    "render_png",
    "render_summary",
    "render_text",
]

EVENTS_FILE = layout.per_node_name(layout.EVENTS, None)
PNG_FILE = layout.per_node_name(layout.REPORT_PNG, None)

PROG = "python -m tools.report"


class ReportError(Exception):
    """The run directory cannot be reported on; the message says why and what to check."""


# -- reading -------------------------------------------------------------------------------------


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
            manifest = verify(path)
        except (CheckpointInvalid, CheckpointIncompatible, OSError):
            continue
        sha = manifest.get("params_sha256")
        return Checkpoint(step, path, sha if isinstance(sha, str) else None)
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
    walk_events(report, events)
    use_metrics(report, metrics)
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
