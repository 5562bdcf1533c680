"""Training throughput (tokens/s) of the trainer for 1 and 2 ranks, printed as a table.

Each case is a real training run (`trainer/train.py`, under torchrun for several ranks) with
checkpoints and eval off; the figure is the median of the per-step `tokens_per_s` that the
trainer writes to metrics.jsonl, after the first warm-up steps.

    python bench/bench_throughput.py                    # small preset, 1 and 2 ranks
    python bench/bench_throughput.py --model tiny --steps 30 --nproc 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from common import REPO_ROOT, TRAIN_PY

from runcontract.env import unsupervised


def run_case(args: argparse.Namespace, nproc: int, run_dir: Path) -> dict[str, float]:
    """Train once with `nproc` ranks; return median tokens/s and step time after warm-up.

    Raises RuntimeError with the trainer's stderr when the run fails.
    """
    flags = [
        "--model", args.model, "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
        "--seq-len", str(args.seq_len), "--data", args.data, "--ckpt-every", "0",
        "--eval-every", "0", "--log-every", "0", "--run-dir", str(run_dir),
    ]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN_PY), *flags]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            str(TRAIN_PY), *flags,
        ]  # fmt: skip
    env = unsupervised(os.environ)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-rank run failed ({proc.returncode}):\n{proc.stderr}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "tokens_per_s" in r][args.warmup :]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_ms": 1000 * statistics.median(r["step_time"] for r in steady),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every case and print a Markdown table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="model preset (default: small)")
    parser.add_argument("--steps", type=int, default=25, help="steps per case (default: 25)")
    parser.add_argument("--warmup", type=int, default=5, help="steps not counted (default: 5)")
    parser.add_argument("--micro-batch", type=int, default=16, help="(default: 16)")
    parser.add_argument("--seq-len", type=int, default=64, help="(default: 64)")
    parser.add_argument("--data", default="stdlib", help="training data (default: stdlib)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="(default: 1 2)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")

    cores = os.cpu_count() or 1
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} CPU cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}; "
        f"{args.model} preset, micro-batch {args.micro_batch} x seq-len {args.seq_len}, "
        f"{args.steps} steps ({args.warmup} warm-up)"
    )
    print()
    print("| ranks | threads/rank | tokens/s (all ranks) | step time (ms) |")
    print("|---:|---:|---:|---:|")
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
            result = run_case(args, nproc, Path(tmp))
        # The trainer's default: all cores alone; torchrun gives each of several ranks one.
        threads = cores if nproc == 1 else 1
        print(f"| {nproc} | {threads} | {result['tokens_per_s']:.0f} | {result['step_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
