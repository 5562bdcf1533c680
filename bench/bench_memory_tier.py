"""Steps lost per worker SIGKILL, and fault-free speed, with the memory tier on and off.

The same supervised 2-rank job runs with ``--mem-every K`` and with ``--mem-every 0``, side by
side in one invocation: first fault-free, twice per mode in the order on, off, off, on
(wall-clock steps/s over the steady part of the run, which counts the snapshots' cost: the
trainer's own step time does not), then with N SIGKILLs of a random worker, each a random time
after the attempt's first step (the same times in both modes). A kill timed from the previous
one, as the chaos tool's ``--every``, would land on an attempt still starting whenever a
recovery takes longer than the interval, and measure nothing. Steps lost per kill: the last
step rank 0 completed before the kill (its console line for every step, ``--log-every 1``, in
the attempt's log) minus the step the next attempt resumed from (``checkpoint_selected``); the
heartbeats the run report reads are throttled, so they would understate it. The memory tier's
root is a temporary directory, removed at the end.

    python bench/bench_memory_tier.py                        # 20 kills per mode
    python bench/bench_memory_tier.py --kills 5 --after 2 4  # a quick look
    python bench/bench_memory_tier.py --kills 0 --clean-rounds 2  # fault-free speed alone
    python bench/bench_memory_tier.py --in-run 3 6 --clean-steps 3000  # cost, within one run
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

from common import (
    LAUNCH_PY,
    REPO_ROOT,
    belongs_to,
    clean_env,
    fmt,
    job_args,
    machine_line,
    read_jsonl,
    stop_run,
    wait_exit,
)

from runcontract.env import MEM_ALTERNATE, MEM_ROOT
from runcontract.heartbeat import read_heartbeat

_STEP_LINE = re.compile(r"^step (\d+)/", re.MULTILINE)
FLAGS = ["--max-restarts", "1000", "--crash-loop", "0", "--backoff-initial", "0.5"]


def _start(run_dir: Path, train: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.out", "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(LAUNCH_PY), "--run-dir", str(run_dir), "--nproc", "2",
             *FLAGS, "--", *train],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _train_args(args: argparse.Namespace, steps: int, mem_every: int | str) -> list[str]:
    train = job_args(
        model=args.model, steps=steps, ckpt_every=args.ckpt_every, micro_batch=args.micro_batch,
        seq_len=args.seq_len,
    )  # fmt: skip
    budget = ["--mem-budget", str(args.mem_budget)] if args.mem_budget is not None else []
    return [*train, "--mem-every", str(mem_every), *budget, "--log-every", "1"]


def fault_free(
    run_dir: Path, args: argparse.Namespace, mem_every: int | str, env: dict[str, str]
) -> Any:
    """Steps per wall-clock second over the steps after the first 20 (None: the run failed)."""
    proc = _start(run_dir, _train_args(args, args.clean_steps, mem_every), env)
    try:
        code = wait_exit(proc, args.timeout)
    finally:
        stop_run(proc, run_dir)
    steps = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m and m["step"] > 20]
    if code != 0 or len(steps) < 2:
        return None
    return (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["time"] - steps[0]["time"])


def in_run_cost(
    run_dir: Path, args: argparse.Namespace, every: int, env: dict[str, str]
) -> dict[str, float] | None:
    """What snapshots every ``every`` steps cost, measured within one fault-free run: the
    trainer takes them only in every other stretch of ``--stretch`` steps
    (``ROSE_MEM_ALTERNATE``), and the wall time per step of the stretches with snapshots is set
    against that of the stretches without. Separate runs drift by as much as the effect.

    Returns ms per step with and without, and the cost per snapshot (ms), split into the step
    whose snapshot it is and the steps after it (a snapshot leaves the caches cold); None when
    the run failed."""
    # No periodic disk save: one every 2N steps would land in the same kind of stretch each time.
    train = [*_train_args(args, args.clean_steps, every), "--ckpt-every", "0"]
    proc = _start(run_dir, train, {**env, MEM_ALTERNATE: str(args.stretch)})
    try:
        code = wait_exit(proc, args.timeout)
    finally:
        stop_run(proc, run_dir)
    times = {m["step"]: m["time"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m}
    if code != 0 or not times:
        return None
    # (a stretch with snapshots?, step s-1 a snapshot step?) -> wall times per step: the time
    # from step s-1's record to step s's holds the snapshot of s-1, if one was taken.
    gaps: dict[tuple[bool, bool], list[float]] = {
        key: [] for key in product((True, False), repeat=2)
    }
    for step, t in times.items():
        before = step - 1
        if before in times and before > 20:
            with_snapshots = (before // args.stretch) % 2 == 0
            gaps[(with_snapshots, before % every == 0)].append(t - times[before])
    if not all(gaps[key] for key in gaps if key[1] or every > 1):
        return None
    on = [*gaps[(True, True)], *gaps[(True, False)]]
    off = [*gaps[(False, True)], *gaps[(False, False)]]
    mean = statistics.fmean
    in_step = mean(gaps[(True, True)]) - mean(gaps[(False, True)])
    after = (
        (mean(gaps[(True, False)]) - mean(gaps[(False, False)])) * (every - 1) if every > 1 else 0.0
    )
    return {
        "on": mean(on) * 1e3,
        "off": mean(off) * 1e3,
        "snapshot": (mean(on) - mean(off)) * every * 1e3,
        "in_step": in_step * 1e3,
        "after": after * 1e3,
    }


def with_kills(
    run_dir: Path, args: argparse.Namespace, mem_every: int | str, env: dict[str, str]
) -> list[int]:
    """Steps lost per kill, over ``args.kills`` worker SIGKILLs. Each kill lands a random time
    (uniform in ``--after``) after the attempt's first completed step, so that every attempt
    trains before it is killed, whatever its recovery took; the same seed in both modes."""
    rng = random.Random(1)
    proc = _start(run_dir, _train_args(args, args.steps, mem_every), env)
    try:
        for kill in range(args.kills):
            if not _wait_first_steps(run_dir, proc, kill + 1, args.timeout):
                break
            time.sleep(rng.uniform(*args.after))
            rank = rng.randrange(2)
            beat = read_heartbeat(run_dir, rank)
            if beat is None or proc.poll() is not None:
                break
            pid = int(beat["pid"])
            if belongs_to(pid, run_dir):  # never a reused pid of another process
                os.kill(pid, signal.SIGKILL)
        _wait_first_steps(run_dir, proc, args.kills + 1, args.timeout)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the emergency checkpoint; the tier is removed
            wait_exit(proc, 120)
    finally:
        stop_run(proc, run_dir)
    return steps_lost(run_dir)


def _wait_first_steps(run_dir: Path, proc: subprocess.Popen, count: int, timeout: float) -> bool:
    """Wait until ``count`` attempts have completed a step; False when the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        events = read_jsonl(run_dir / "events.jsonl")
        if sum(e["type"] == "first_step" for e in events) >= count:
            return True
        time.sleep(0.05)
    return False


def steps_lost(run_dir: Path) -> list[int]:
    """Per failed attempt that had trained: its rank 0's last completed step minus the step the
    next attempt resumed from."""
    events = read_jsonl(run_dir / "events.jsonl")
    resumed = {e["attempt"]: e["step"] or 0 for e in events if e["type"] == "checkpoint_selected"}
    failed = sorted({e["attempt"] for e in events if e["type"] == "worker_failed"})
    lost = []
    for attempt in failed:
        logs = (run_dir / "logs" / f"attempt-{attempt}").glob("ranks/*/attempt_*/0/stdout.log")
        steps = [
            int(m.group(1))
            for log in logs
            for m in _STEP_LINE.finditer(log.read_text(errors="replace"))
        ]
        if steps and attempt + 1 in resumed:
            lost.append(max(0, max(steps) - resumed[attempt + 1]))
    return lost


def print_in_run(args: argparse.Namespace) -> int:
    """Measure and print the in-run cost of each ``--in-run`` interval; 0, or 1 when a run
    failed."""
    print(
        f"job: {args.model} preset, 2 ranks (gloo), micro-batch {args.micro_batch} x seq-len "
        f"{args.seq_len}, no periodic disk checkpoint, {args.clean_steps} steps per run; "
        f"memory snapshots every K steps, only in every other stretch of {args.stretch} steps"
    )
    print()
    print(
        "| K | ms a step, stretches with snapshots | without | speed with / without "
        "| cost a snapshot, ms | in its own step | in the steps after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp) / "shm"
        root.mkdir()
        env = {**clean_env(), MEM_ROOT: str(root)}
        for every in args.in_run:
            r = in_run_cost(Path(tmp) / f"in-run-{every}", args, every, env)
            if r is None:
                print(f"| {every} | run failed | | | | | |")
                failed = True
                continue
            print(
                f"| {every} | {r['on']:.3f} | {r['off']:.3f} | {r['off'] / r['on']:.3f} "
                f"| {r['snapshot']:.2f} | {r['in_step']:.2f} | {r['after']:.2f} |",
                flush=True,
            )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run both modes; print a Markdown table. Returns 0, or 1 when a run failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="worker SIGKILLs per mode")
    parser.add_argument("--after", type=float, nargs=2, default=[2.0, 8.0],
                        help="each kill: seconds after the attempt's first step, uniform in "
                        "[A, B] (default 2 8)")  # fmt: skip
    parser.add_argument("--mem-every", default="5", help="steps, or auto (default 5)")
    parser.add_argument("--ckpt-every", default="40", help="steps, or auto (default 40)")
    parser.add_argument(
        "--mem-budget", type=float, help="the trainer's --mem-budget (default: the trainer's)"
    )
    parser.add_argument("--steps", type=int, default=200000, help="steps of the faulted runs")
    parser.add_argument("--clean-steps", type=int, default=300, help="steps of fault-free runs")
    parser.add_argument(
        "--clean-rounds",
        type=int,
        default=1,
        help="rounds of fault-free runs, each on, off, off, on (default 1)",
    )
    parser.add_argument(
        "--in-run",
        type=int,
        nargs="+",
        metavar="K",
        help="instead: the cost of a snapshot every K steps, measured within one fault-free run "
        "of --clean-steps per K (stretches with and without snapshots)",
    )
    parser.add_argument("--stretch", type=int, default=20, help="steps per stretch (default 20)")
    parser.add_argument("--model", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--micro-batch", type=int, default=8, help="(default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="(default 64)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args(argv)

    if args.in_run and (min(args.in_run) < 1 or args.stretch < 1):
        parser.error("--in-run intervals and --stretch must be at least 1 step")
    print(machine_line())
    if args.in_run:
        return print_in_run(args)
    budget = f" --mem-budget {args.mem_budget:g}" if args.mem_budget is not None else ""
    print(
        f"job: {args.model} preset, 2 ranks (gloo), micro-batch {args.micro_batch} x seq-len "
        f"{args.seq_len}, async disk checkpoint every {args.ckpt_every} steps; memory tier "
        f"--mem-every {args.mem_every}{budget} vs 0; {args.kills} SIGKILLs of a random worker per "
        f"mode, each {args.after[0]:g}-{args.after[1]:g} s (uniform) after the attempt's first "
        "step, the same random times in both modes"
    )
    modes = {"on": args.mem_every, "off": 0}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp) / "shm"
        root.mkdir()
        env = {**clean_env(), MEM_ROOT: str(root)}
        # Fault-free runs in the order on, off, off, on: a drift in the machine's load over
        # the runs weighs on both modes alike. A first run, not counted, warms the machine: in
        # four samples without it, the first run (always one with the tier on) was 2-4 % slower
        # than the three after it.
        if args.clean_rounds:
            warm = fault_free(Path(tmp) / "clean-warm-up", args, modes["off"], env)
            print(f"  warm-up (not counted): {fmt(warm)} steps/s", file=sys.stderr, flush=True)
        speeds: dict[str, list[float]] = {name: [] for name in modes}
        for i, name in enumerate(["on", "off", "off", "on"] * args.clean_rounds):
            speed = fault_free(Path(tmp) / f"clean-{name}-{i}", args, modes[name], env)
            print(f"  tier {name}: {fmt(speed)} steps/s fault-free", file=sys.stderr, flush=True)
            if speed is not None:
                speeds[name].append(speed)
        runs = 2 * args.clean_rounds
        for name, k in modes.items():
            lost = with_kills(Path(tmp) / f"kills-{name}", args, k, env) if args.kills else []
            print(f"  tier {name}: lost {lost}", file=sys.stderr, flush=True)
            mean = statistics.mean(speeds[name]) if len(speeds[name]) == runs else None
            results[name] = {"speed": mean, "lost": lost}
        left = os.listdir(root)
    on, off = results["on"], results["off"]

    def median(xs: list[int]) -> float | None:
        return statistics.median(xs) if xs else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    print()
    print(
        "| memory tier | kills measured | steps lost: median | mean | max "
        f"| fault-free steps/s (mean of {2 * args.clean_rounds}) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in modes:
        r = results[name]
        lost = r["lost"]
        print(
            f"| {name} | {len(lost)} | {fmt(median(lost), 1)} "
            f"| {fmt(statistics.mean(lost) if lost else None, 1)} "
            f"| {max(lost) if lost else '-'} | {fmt(r['speed'], 2)} |"
        )
    print()
    print(
        f"on / off: steps lost (median) {fmt(ratio(median(on['lost']), median(off['lost'])), 2)}, "
        f"fault-free steps/s {fmt(ratio(on['speed'], off['speed']), 3)}; "
        f"left in the memory root after the runs: {left or 'nothing'}"
    )
    measured = (on["lost"] and off["lost"]) or not args.kills
    ok = on["speed"] is not None and off["speed"] is not None and measured
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
