"""Goodput under failures: useful steps per wall-clock second with a worker SIGKILL every T s.

The same supervised 2-rank job runs once without faults and once per T, with the chaos tool
(``python -m tools.chaos --fault kill-worker --every T``) killing a random worker every T
seconds (each kill waits until the new attempt is training). Goodput and the work lost per
failure come from the run report (``tools.report``); the loss per failure is compared with
half the checkpoint interval, what a kill at a uniformly random moment costs on average.

    python bench/bench_goodput.py                      # T = 30, 15 s
    python bench/bench_goodput.py --every 20 --steps 300
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


def one_run(run_dir: Path, every: float | None, args: argparse.Namespace) -> dict[str, Any]:
    """One supervised run, with a kill every ``every`` seconds (None: no faults)."""
    train = job_args(
        steps=args.steps, ckpt_every=args.ckpt_every, micro_batch=args.micro_batch,
        seq_len=args.seq_len,
    )  # fmt: skip
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
    """Run the fault-free job and one per T; print a Markdown table. Returns 0, or 1 when the
    fault-free run failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # A kill interval shorter than a recovery (about 11 s here) kills each attempt at its first
    # step: the run then measures only the restart backoff, not goodput.
    parser.add_argument("--every", type=float, nargs="+", default=[60.0, 30.0],
                        help="seconds between kills, one run each (default 60 30)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1500, help="steps per run (default 1500)")
    parser.add_argument("--ckpt-every", type=int, default=20, help="(default 20)")
    parser.add_argument("--micro-batch", type=int, default=8, help="(default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="(default 64)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    args = parser.parse_args(argv)

    print(machine_line())
    print(
        f"job: tiny preset, 2 ranks (gloo), micro-batch {args.micro_batch} x seq-len "
        f"{args.seq_len}, {args.steps} steps, async checkpoint every {args.ckpt_every} steps; "
        "supervisor --backoff-initial 0.5; kills by `python -m tools.chaos --fault "
        "kill-worker --every T --seed 1`"
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-goodput-") as tmp:
        for every in [None, *args.every]:
            name = "no faults" if every is None else f"SIGKILL every {every:g} s"
            result = one_run(Path(tmp) / f"every-{every}", every, args)
            rows.append((name, result))
            print(f"  {name}: goodput {fmt(result['goodput'])} steps/s, "
                  f"{result['failures']} failures", file=sys.stderr, flush=True)  # fmt: skip
    base = rows[0][1]["goodput"]
    half = args.ckpt_every / 2
    print()
    lines = [
        "| faults | completed | wall (s) | failures | goodput (steps/s) | vs no faults | "
        "lost per failure (steps) | vs half the interval | median recovery (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        rel = r["goodput"] / base if base and r["goodput"] else None
        lost_rel = r["lost"] / half if r["lost"] is not None else None
        done = (
            "yes"
            if r["ok"]
            else "no (timed out)"
            if r["code"] is None
            else f"no (exit {r['code']})"
        )
        lines.append(
            f"| {name} | {done} | {fmt(r['wall'], 1)} "
            f"| {r['failures']} | {fmt(r['goodput'], 2)} | {fmt(rel, 2)} | {fmt(r['lost'], 1)} "
            f"| {fmt(lost_rel, 2)} | {fmt(r['recovery'], 2)} |"
        )
    step_time = rows[0][1]["step_time"]
    lines.append("")
    lines.append(
        f"Half the checkpoint interval is {half:g} steps"
        + (
            f" (≈ {half * step_time:.1f} s at the median step time of {step_time:.3f} s)."
            if step_time
            else "."
        )  # fmt: skip
        + " Lost per failure: last step reached before the kill minus the step resumed from "
        "(from events.jsonl); an asynchronous checkpoint still being written when the kill "
        "lands does not count, so the loss can exceed half the interval."
    )
    print("\n".join(lines))
    return 0 if rows[0][1]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
