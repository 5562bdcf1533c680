"""Goodput under failures: useful steps per wall-clock second with a worker SIGKILL every T s.

The same supervised 2-rank job runs under each save configuration, side by side in one
invocation: once without faults (the default configuration), then per T and configuration with
the chaos tool (``python -m tools.chaos --fault kill-worker --every T``) killing a random worker
every T seconds (each kill waits until the new attempt is training). The configurations are the
defaults (``--ckpt-every auto``, memory tier on), fixed disk intervals of 5, 20 and 100 steps
(memory tier on), and the defaults with the memory tier off. Goodput and the work lost per
failure come from the run report (``tools.report``).

    python bench/bench_goodput.py                      # T = 60, 30 s; 6000 steps a run
    python bench/bench_goodput.py --every 30 --steps 3000 --configs auto "disk 20"
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
}
FIXED = ("disk 5", "disk 20", "disk 100")


def one_run(
    run_dir: Path, every: float | None, flags: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """One supervised run with trainer ``flags``, a kill every ``every`` seconds (None: none)."""
    train = [
        *job_args(
            steps=args.steps, ckpt_every="auto", micro_batch=args.micro_batch,
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
    return {
        "ok": code == 0 and report.final_step == args.steps,
        "code": code,
        "goodput": report.goodput,
        "wall": report.wall_seconds,
        "failures": len(report.failures),
        "lost": statistics.mean(lost) if lost else None,
        "recovery": statistics.median(recoveries) if recoveries else None,
        "step_time": statistics.median(step_times) if step_times else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the fault-free job, then each configuration per T; print a Markdown table. Returns
    0, or 1 when a run did not complete."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # A kill interval shorter than a recovery kills each attempt at its first step: the run
    # then measures only the restart backoff, not goodput.
    parser.add_argument("--every", type=float, nargs="+", default=[60.0, 30.0],
                        help="seconds between kills (default 60 30)")  # fmt: skip
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="save configurations (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=6000, help="steps per run (default 6000)")
    parser.add_argument("--micro-batch", type=int, default=8, help="(default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="(default 64)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args(argv)

    print(machine_line())
    print(
        f"job: tiny preset, 2 ranks (gloo), micro-batch {args.micro_batch} x seq-len "
        f"{args.seq_len}, {args.steps} steps; supervisor --backoff-initial 0.5; kills by "
        "`python -m tools.chaos --fault kill-worker --every T --seed 1`; configurations: "
        + "; ".join(f"{name}: {' '.join(CONFIGS[name]) or 'the defaults'}" for name in args.configs)
    )
    rows: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-goodput-") as tmp:
        plan = [(None, "auto"), *[(e, c) for e in args.every for c in args.configs]]
        for i, (every, config) in enumerate(plan):
            faults = "no faults" if every is None else f"SIGKILL every {every:g} s"
            result = one_run(Path(tmp) / f"run-{i}", every, CONFIGS[config], args)
            rows.append((faults, config, result))
            print(f"  {faults}, {config}: goodput {fmt(result['goodput'])} steps/s, "
                  f"{result['failures']} failures, lost {fmt(result['lost'], 1)}",
                  file=sys.stderr, flush=True)  # fmt: skip
    print()
    lines = [
        "| faults | configuration | completed | wall (s) | failures | goodput (steps/s) | "
        "vs best fixed | vs memory tier off | lost per failure (steps) | median recovery (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for faults, config, r in rows:
        same = {c: x["goodput"] for f, c, x in rows if f == faults and x["goodput"]}
        fixed = [g for c, g in same.items() if c in FIXED]
        best = max(fixed) if fixed else None
        off = same.get("auto, memory tier off")
        good = r["goodput"]
        done = (
            "yes"
            if r["ok"]
            else "no (timed out)"
            if r["code"] is None
            else f"no (exit {r['code']})"
        )
        lines.append(
            f"| {faults} | {config} | {done} | {fmt(r['wall'], 1)} | {r['failures']} "
            f"| {fmt(good, 2)} | {fmt(good / best if good and best else None, 3)} "
            f"| {fmt(good / off if good and off else None, 3)} | {fmt(r['lost'], 1)} "
            f"| {fmt(r['recovery'], 2)} |"
        )
    lines.append("")
    lines.append(
        "Lost per failure: the last step reached before the kill minus the step resumed from "
        "(from events.jsonl). Goodput: the run's final step over its wall time, starts and "
        "recoveries included."
    )
    print("\n".join(lines))
    return 0 if all(r["ok"] for _, _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
