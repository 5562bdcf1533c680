"""Supervision overhead: tokens/s of the same job under the supervisor vs bare torchrun.

Both run the trainer on 2 ranks with asynchronous checkpoints on; under the supervisor the
workers also write heartbeats and the supervisor polls them. Runs alternate (bare, supervised,
bare, …) so that a change in the machine's load hits both alike. The figure per run is the median
of the per-step ``tokens_per_s`` in metrics.jsonl after the warm-up steps.

    python bench/bench_overhead.py                     # small preset, 3 pairs
    python bench/bench_overhead.py --pairs 1 --steps 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import (
    fmt,
    job_args,
    machine_line,
    start_supervised,
    start_torchrun,
    stop_run,
    tokens_per_s,
    wait_exit,
)

TARGET = 0.98


def one_run(kind: str, run_dir: Path, args: argparse.Namespace) -> float | None:
    """Train once, bare (``torchrun``) or ``supervised``; its tokens/s."""
    train = job_args(
        model=args.model,
        steps=args.steps,
        ckpt_every=args.ckpt_every,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
    )
    if kind == "supervised":
        proc = start_supervised(run_dir, train, ["--max-restarts", "0"])
    else:
        proc = start_torchrun(run_dir, train, ["--max-restarts", "0"])
    try:
        code = wait_exit(proc, args.timeout)
    finally:
        stop_run(proc, run_dir)
    if code != 0:
        print(f"  {kind} run failed (exit {code}); see {run_dir}", file=sys.stderr)
        return None
    return tokens_per_s(run_dir, args.warmup)


def main(argv: list[str] | None = None) -> int:
    """Run the pairs and print a Markdown table; returns 0 (1 when no pair completed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="bare/supervised pairs (default 3)")
    parser.add_argument("--model", default="small", help="model preset (default small)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
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
        f"warm-up not counted), async checkpoint every {args.ckpt_every} steps; {args.pairs} "
        "pairs, alternating"
    )
    bare: list[float | None] = []
    supervised: list[float | None] = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for i in range(args.pairs):
            # Alternate which goes first, so neither always gets the warmer machine.
            order = ("torchrun", "supervised") if i % 2 == 0 else ("supervised", "torchrun")
            for kind in order:
                value = one_run(kind, Path(tmp) / f"{kind}-{i}", args)
                (bare if kind == "torchrun" else supervised).append(value)
            print(
                f"  pair {i + 1}: torchrun {fmt(bare[-1], 0)} tok/s, supervised "
                f"{fmt(supervised[-1], 0)} tok/s",
                file=sys.stderr,
                flush=True,
            )
    print()
    lines = ["| pair | bare torchrun (tokens/s) | supervised (tokens/s) | ratio |"]
    lines.append("|---:|---:|---:|---:|")
    ratios = []
    for i, (b, s) in enumerate(zip(bare, supervised, strict=True)):
        ratio = s / b if b and s else None
        if ratio is not None:
            ratios.append(ratio)
        lines.append(f"| {i + 1} | {fmt(b, 0)} | {fmt(s, 0)} | {fmt(ratio, 3)} |")
    b_med = statistics.median([b for b in bare if b]) if any(bare) else None
    s_med = statistics.median([s for s in supervised if s]) if any(supervised) else None
    overall = s_med / b_med if b_med and s_med else None
    lines.append(f"| **median** | **{fmt(b_med, 0)}** | **{fmt(s_med, 0)}** | "
                 f"**{fmt(overall, 3)}** |")  # fmt: skip
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    met = overall is not None and overall >= TARGET
    per_pair = f"; per pair {min(ratios):.3f}–{max(ratios):.3f}" if ratios else ""
    lines.append(
        f"| supervised ≥ {TARGET:.0%} of bare tokens/s | {fmt(overall, 3)} (ratio of medians"
        f"{per_pair}) | {'yes' if met else '**no**'} |"
    )
    print("\n".join(lines))
    return 0 if ratios else 1


if __name__ == "__main__":
    sys.exit(main())
