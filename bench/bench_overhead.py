"""Supervision overhead: tokens/s of the same job under the supervisor vs bare torchrun.

Every run trains the same job on 2 ranks with asynchronous checkpoints. Under the supervisor the
workers also write heartbeats and the supervisor polls them; four supervised variants separate
the costs of the two features on by default: the standby attempt (a second torchrun started
5 s into training, whose workers import torch and then wait at a gate) and the memory tier
(snapshots into shared memory, trainer flag ``--mem-every``):

- defaults (standby on, memory tier on);
- ``--standby off`` (a supervisor flag);
- ``--mem-every 0`` (a trainer flag);
- both off.

Each round runs bare torchrun and the four variants one after the other, in an order that
rotates from round to round, so that a change in the machine's load hits all alike. The figure
per run is the median of the per-step ``tokens_per_s`` in metrics.jsonl after the warm-up steps;
each variant's ratio is to the bare run of the same round, over the same steps. For the variants
with the standby, two more windows separate its one-time cost from its steady state: the steps
that ran while the standby imported (``standby_started`` → ``standby_ready`` in events.jsonl)
and the steps that began after it was ready.

    python bench/bench_overhead.py                     # small preset, 4 rounds of 5 runs
    python bench/bench_overhead.py --rounds 1 --steps 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    fmt,
    job_args,
    machine_line,
    median,
    read_jsonl,
    start_supervised,
    start_torchrun,
    stop_run,
    wait_exit,
)

from runcontract.events import EventType

TARGET = 0.98
BARE = "bare torchrun"
# Each supervised variant: its supervisor flags and its extra trainer flags.
VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "defaults": ([], []),
    "--standby off": (["--standby", "off"], []),
    "--mem-every 0": ([], ["--mem-every", "0"]),
    "both off": (["--standby", "off"], ["--mem-every", "0"]),
}
KINDS = (BARE, *VARIANTS)
WINDOWS = ("all", "imports", "ready")
"""All steps after the warm-up; those that overlapped the standby's imports; those that began
after the standby was ready."""

Row = dict[str, Any]


@dataclass
class Run:
    """What one run left: its metrics rows and, under the supervisor, its events."""

    rows: list[Row]
    standby: tuple[float, float | None] | None
    """Times of ``standby_started`` and ``standby_ready`` (None: not seen)."""
    memory_saves: int


def one_run(kind: str, run_dir: Path, args: argparse.Namespace) -> Run | None:
    """Train once under ``kind`` (bare torchrun or a supervised variant); None when it failed."""
    train = job_args(
        model=args.model,
        steps=args.steps,
        ckpt_every=args.ckpt_every,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
    )
    train += ["--ckpt-mode", "async"]  # the same saves in every run ('auto' may switch)
    if kind == BARE:
        proc = start_torchrun(run_dir, train, ["--max-restarts", "0"])
    else:
        flags, extra = VARIANTS[kind]
        proc = start_supervised(run_dir, [*train, *extra], ["--max-restarts", "0", *flags])
    try:
        code = wait_exit(proc, args.timeout)
    finally:
        stop_run(proc, run_dir)
    if code != 0:
        print(f"  {kind} run failed (exit {code}); see {run_dir}", file=sys.stderr)
        return None
    rows = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "tokens_per_s" in m]
    events = read_jsonl(run_dir / "events.jsonl") if kind != BARE else []
    times = {e["type"]: e["time"] for e in events}
    standby = None
    if EventType.STANDBY_STARTED in times:
        standby = (times[EventType.STANDBY_STARTED], times.get(EventType.STANDBY_READY))
    saves = sum(e["type"] == EventType.MEMORY_SAVED for e in events)
    return Run(rows, standby, saves)


def _in_window(row: Row, run: Run, window: str) -> bool:
    """Whether the step of ``row`` lies in ``window`` of ``run`` (see WINDOWS)."""
    if window == "all":
        return True
    if run.standby is None or run.standby[1] is None:
        return False
    started, ready = run.standby
    began = row["time"] - row.get("step_time", 0.0)
    if window == "imports":
        return row["time"] > started and began < ready
    return began >= ready


def _median_of(rows: list[Row], keep: Callable[[Row], bool]) -> float | None:
    values = [r["tokens_per_s"] for r in rows if keep(r)]
    return statistics.median(values) if values else None


def ratio(run: Run | None, bare: Run | None, window: str, warmup: int) -> float | None:
    """Tokens/s of ``run`` over the steps of ``window`` after the warm-up, to ``bare``'s over
    the same steps."""
    if run is None or bare is None:
        return None
    steps = {r["step"] for r in run.rows if r["step"] > warmup and _in_window(r, run, window)}
    mine = _median_of(run.rows, lambda r: r["step"] in steps)
    theirs = _median_of(bare.rows, lambda r: r["step"] in steps)
    return mine / theirs if mine and theirs else None


def steady(run: Run | None, warmup: int) -> float | None:
    """The run's figure: median tokens/s after the warm-up."""
    return None if run is None else _median_of(run.rows, lambda r: r["step"] > warmup)


def run_rounds(args: argparse.Namespace, tmp: Path) -> list[dict[str, Run | None]]:
    """Every round's runs, by kind; the order rotates from round to round."""
    rounds: list[dict[str, Run | None]] = []
    for i in range(args.rounds):
        shift = i % len(KINDS)
        order = KINDS[shift:] + KINDS[:shift]
        runs: dict[str, Run | None] = {}
        for kind in order:
            slug = kind.strip("-").replace(" ", "-")
            runs[kind] = one_run(kind, tmp / f"{slug}-{i}", args)
        rounds.append(runs)
        print(
            f"  round {i + 1}: "
            + ", ".join(f"{k} {fmt(steady(runs[k], args.warmup), 0)} tok/s" for k in KINDS),
            file=sys.stderr,
            flush=True,
        )
    return rounds


def _cell(values: list[float | None]) -> str:
    """``median (min–max)`` of the known values."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    spread = f" ({min(known):.3f}–{max(known):.3f})" if len(known) > 1 else ""
    return f"{statistics.median(known):.3f}{spread}"


def summary_row(kind: str, rounds: list[dict[str, Run | None]], warmup: int) -> str:
    """A variant's line of the summary table."""
    runs = [r[kind] for r in rounds]
    cells = [_cell([ratio(r[kind], r[BARE], w, warmup) for r in rounds]) for w in WINDOWS]
    waits = [r.standby[1] - r.standby[0] for r in runs if r and r.standby and r.standby[1]]
    after = [
        sum(r["step"] > warmup and _in_window(r, run, "ready") for r in run.rows)
        for run in runs
        if run and run.standby
    ]
    saves = median(r.memory_saves for r in runs if r)
    tps = median(steady(r, warmup) for r in runs)
    return (
        f"| {kind} | {fmt(tps, 0)} | {cells[0]} | {cells[1]} | {cells[2]} | "
        f"{fmt(median(waits), 1)} | {fmt(median(after), 0)} | {fmt(saves, 0)} |"
    )


def tables(rounds: list[dict[str, Run | None]], warmup: int) -> str:
    """The per-round tokens/s, the ratios to bare by window, and the target."""
    lines = ["Tokens/s (median per step after the warm-up), one column per run of a round:", ""]
    lines.append("| round | " + " | ".join(KINDS) + " |")
    lines.append("|---:|" + "---:|" * len(KINDS))
    for i, runs in enumerate(rounds):
        cells = " | ".join(fmt(steady(runs[k], warmup), 0) for k in KINDS)
        lines.append(f"| {i + 1} | {cells} |")
    lines += ["", "Ratio to the bare run of the same round, over the same steps: median over "
              "the rounds (min–max):", ""]  # fmt: skip
    lines.append(
        "| supervised | tokens/s | all steps | while the standby imports | after the standby is "
        "ready | standby import (s) | steps after ready | memory saves |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    lines += [summary_row(kind, rounds, warmup) for kind in VARIANTS]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for window, what in (("all", "all steps"), ("ready", "steps after the standby is ready")):
        value = median(ratio(r["defaults"], r[BARE], window, warmup) for r in rounds)
        met = "yes" if value is not None and value >= TARGET else "**no**"
        lines.append(
            f"| supervised (defaults) ≥ {TARGET:.0%} of bare tokens/s, {what} | "
            f"{fmt(value, 3)} | {met} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print Markdown tables; returns 0 (1 when no run completed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of 5 runs (default 4)")
    parser.add_argument("--model", default="small", help="model preset (default small)")
    parser.add_argument("--steps", type=int, default=120, help="steps per run (default 120)")
    parser.add_argument("--warmup", type=int, default=5, help="steps not counted (default 5)")
    parser.add_argument("--ckpt-every", type=int, default=10, help="(default 10)")
    parser.add_argument("--micro-batch", type=int, default=16, help="(default 16)")
    parser.add_argument("--seq-len", type=int, default=64, help="(default 64)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")

    print(machine_line())
    print(
        f"job: {args.model} preset, 2 ranks (gloo, 1 thread each), micro-batch "
        f"{args.micro_batch} x seq-len {args.seq_len}, {args.steps} steps ({args.warmup} "
        f"warm-up not counted), async checkpoint every {args.ckpt_every} steps; {args.rounds} "
        f"rounds of {len(KINDS)} runs, order rotating"
    )
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        rounds = run_rounds(args, Path(tmp))
    print(f"({time.monotonic() - began:.0f} s)")
    print()
    print(tables(rounds, args.warmup))
    return 0 if any(run for r in rounds for run in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
