"""Goodput under failures: useful steps per wall-clock second with a worker SIGKILL every T s.

The same supervised 2-rank job runs under each save configuration, side by side in one
invocation: once without faults (the default configuration), then per T and configuration with
the chaos tool (``python -m tools.chaos --fault kill-worker --every T``) killing a random worker
every T seconds (each kill waits until the new attempt is training). The configurations are the
defaults (``--ckpt-every auto``, memory tier on), fixed disk intervals of 5, 20 and 100 steps
(memory tier on), the defaults with the memory tier off, and the memory tier at Young and
Daly's interval alone (``--mem-budget 0``). Goodput and the work lost per failure come from
the run report (``tools.report``).

One cell moves by several percent from one invocation to the next, more than the differences
between configurations; ``--rounds N`` runs every cell N times, with the configurations' order
rotated each round so that a drift of the machine hits them alike, and ends with each ratio per
round and its mean.

    python bench/bench_goodput.py                      # T = 60, 30 s; 6000 steps a run
    python bench/bench_goodput.py --every 30 --steps 3000 --configs auto "disk 20"
    python bench/bench_goodput.py --rounds 3 --configs auto "auto, memory tier off" "disk 100"
    python bench/bench_goodput.py --model small --steps 1000   # the trainer's default preset
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    clean_env,
    fmt,
    job_args,
    machine_line,
    read_jsonl,
    start_supervised,
    stop_run,
    wait_exit,
)

from tools.report import build_report

#: Each configuration's trainer flags (the last of a flag wins).
CONFIGS = {
    "auto": [],
    "disk 5": ["--ckpt-every", "5"],
    "disk 20": ["--ckpt-every", "20"],
    "disk 100": ["--ckpt-every", "100"],
    "auto, memory tier off": ["--mem-every", "0"],
    # The memory tier at Young and Daly's interval alone, without the budget's extra snapshots.
    "auto, memory budget 0": ["--mem-budget", "0"],
}
FIXED = ("disk 5", "disk 20", "disk 100")
#: One run: its round (from 0), its faults, its configuration and its result.
Row = tuple[int, str, str, dict[str, Any]]


def one_run(
    run_dir: Path, every: float | None, flags: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """One supervised run with trainer ``flags``, a kill every ``every`` seconds (None: none)."""
    train = [
        *job_args(
            model=args.model, steps=args.steps, ckpt_every="auto", micro_batch=args.micro_batch,
            seq_len=args.seq_len,
        ),
        *flags,
    ]  # fmt: skip
    flags = ["--max-restarts", "1000", "--crash-loop", "0", "--backoff-initial", "0.5"]
    proc = start_supervised(run_dir, train, flags)
    chaos = None
    if every is not None:
        chaos = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.chaos",
                str(run_dir),
                "--fault",
                "kill-worker",
                "--every",
                str(every),
                "--seed",
                "1",
            ],  # fmt: skip
            cwd=REPO_ROOT,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        code = wait_exit(proc, args.timeout)
        if chaos is not None:
            wait_exit(chaos, 30)
    finally:
        if chaos is not None and chaos.poll() is None:
            chaos.kill()
            chaos.wait()
        stop_run(proc, run_dir)
    report = build_report(run_dir)
    lost = [f.steps_lost for f in report.failures if f.steps_lost is not None]
    recoveries = [r.total for r in report.recoveries if r.total is not None]
    step_times = [m["step_time"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
    saves = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("type") == "checkpoint_saved"]
    return {
        "ok": code == 0 and report.final_step == args.steps,
        "code": code,
        "goodput": report.goodput,
        "wall": report.wall_seconds,
        "failures": len(report.failures),
        "lost": statistics.mean(lost) if lost else None,
        "recovery": statistics.median(recoveries) if recoveries else None,
        "step_time": statistics.median(step_times) if step_times else None,
        "disk_saves": len(saves),
    }


def _ratios(rows: list[Row], faults: str, round_: int) -> dict[str, dict[str, float | None]]:
    """Per configuration in one round at one kill rate: goodput over the best fixed setting's,
    and over the memory tier off's (None where either is unknown)."""
    same = {c: r["goodput"] for n, f, c, r in rows if n == round_ and f == faults and r["goodput"]}
    fixed = [g for c, g in same.items() if c in FIXED]
    best = max(fixed) if fixed else None
    off = same.get("auto, memory tier off")
    return {
        c: {"best": g / best if best else None, "off": g / off if off else None}
        for c, g in same.items()
    }


def _cell_table(rows: list[Row], rounds: int) -> list[str]:
    """Every run as a row of a Markdown table."""
    lines = [
        "| round | faults | configuration | completed | wall (s) | failures | goodput (steps/s) | "
        "vs best fixed | vs memory tier off | lost per failure (steps) | median recovery (s) "
        "| disk saves |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, faults, config, r in rows:
        ratio = _ratios(rows, faults, n).get(config, {})
        done = (
            "yes"
            if r["ok"]
            else "no (timed out)"
            if r["code"] is None
            else f"no (exit {r['code']})"
        )
        lines.append(
            f"| {n + 1 if faults != 'no faults' else '-'} | {faults} | {config} | {done} "
            f"| {fmt(r['wall'], 1)} | {r['failures']} | {fmt(r['goodput'], 2)} "
            f"| {fmt(ratio.get('best'), 3)} | {fmt(ratio.get('off'), 3)} | {fmt(r['lost'], 1)} "
            f"| {fmt(r['recovery'], 2)} | {r['disk_saves']} |"
        )
    if rounds == 1:  # the round column says nothing then
        lines = ["|" + line.split("|", 2)[2] for line in lines]
    return lines


def _summary_table(rows: list[Row], rounds: int, every: list[float]) -> list[str]:
    """Each ratio per round and its mean, per kill rate and configuration."""
    lines = [
        "| faults | configuration | vs best fixed, per round | mean "
        "| vs memory tier off, per round | mean | lost per failure, mean (steps) |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    configs = list(dict.fromkeys(c for _, f, c, _ in rows if f != "no faults"))
    for e in every:
        faults = f"SIGKILL every {e:g} s"
        for config in configs:
            per = [_ratios(rows, faults, n).get(config, {}) for n in range(rounds)]
            cells = []
            for key in ("best", "off"):
                values = [p.get(key) for p in per]
                known = [v for v in values if v is not None]
                cells.append(", ".join(fmt(v, 3) for v in values))
                cells.append(fmt(statistics.mean(known) if known else None, 3))
            lost = [r["lost"] for _, f, c, r in rows if f == faults and c == config]
            lost_known = [v for v in lost if v is not None]
            mean_lost = statistics.mean(lost_known) if lost_known else None
            lines.append(f"| {faults} | {config} | {' | '.join(cells)} | {fmt(mean_lost, 1)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the fault-free job, then each configuration per T, ``--rounds`` times; print
    Markdown tables. Returns 0, or 1 when a run did not complete."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # A kill interval shorter than a recovery kills each attempt at its first step: the run
    # then measures only the restart backoff, not goodput.
    parser.add_argument("--every", type=float, nargs="+", default=[60.0, 30.0],
                        help="seconds between kills (default 60 30)")  # fmt: skip
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="save configurations (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=6000, help="steps per run (default 6000)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each cell, order rotated per round (default 1)")  # fmt: skip
    parser.add_argument("--model", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--micro-batch", type=int, default=8, help="(default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="(default 64)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if any(e <= 0 for e in args.every):
        parser.error(f"--every takes positive seconds, got {' '.join(map(str, args.every))}")
    configs = list(dict.fromkeys(args.configs))

    print(machine_line())
    print(
        f"job: {args.model} preset, 2 ranks (gloo), micro-batch {args.micro_batch} x seq-len "
        f"{args.seq_len}, {args.steps} steps; supervisor --backoff-initial 0.5; kills by "
        "`python -m tools.chaos --fault kill-worker --every T --seed 1`; configurations: "
        + "; ".join(f"{name}: {' '.join(CONFIGS[name]) or 'the defaults'}" for name in configs)
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-goodput-") as tmp:
        plan: list[tuple[int, float | None, str]] = [(0, None, "auto")]
        for n in range(args.rounds):
            order = configs[n % len(configs) :] + configs[: n % len(configs)]
            plan += [(n, e, c) for e in args.every for c in order]
        for i, (n, every, config) in enumerate(plan):
            faults = "no faults" if every is None else f"SIGKILL every {every:g} s"
            result = one_run(Path(tmp) / f"run-{i}", every, CONFIGS[config], args)
            rows.append((n, faults, config, result))
            print(f"  round {n + 1}, {faults}, {config}: goodput {fmt(result['goodput'])} "
                  f"steps/s, {result['failures']} failures, lost {fmt(result['lost'], 1)}",
                  file=sys.stderr, flush=True)  # fmt: skip
    lines = ["", *_cell_table(rows, args.rounds), ""]
    lines.append(
        "Lost per failure: the last step reached before the kill minus the step resumed from "
        "(from events.jsonl). Goodput: the run's final step over its wall time, starts and "
        "recoveries included."
    )
    if args.rounds > 1:
        lines += ["", *_summary_table(rows, args.rounds, args.every)]
    print("\n".join(lines))
    return 0 if all(r["ok"] for *_, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
