"""What a periodic checkpoint costs the training loop under --ckpt-mode sync, async and auto.

For each state size, the same loop (a stack of linear layers, AdamW) trains with a save every K
steps through the trainer's own ``CheckpointStore`` and ``SavePolicy`` (a save due while the last
is still being written is skipped, as in the trainer). The cost per save is the loop's extra wall
time over the same steps without saves (the last write waited for), divided by the saves made:
``(elapsed - steps x baseline step) / saves``. K is chosen so that a synchronous save takes at
most two thirds of the steps between two saves. The modes run in turn, each in its own directory,
so that a change of the machine's load hits them alike. ``auto`` is shown over all its saves
(its first two measure both ways) and over the saves after those two.

    python bench/bench_ckpt_mode.py                      # 10 MB, 250 MB and 1 GB states
    python bench/bench_ckpt_mode.py --sizes 10,250 --saves 8
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from bench_checkpoint import baseline_step, make_model, state_bytes, train_step

from trainer.checkpoint import CheckpointStore
from trainer.save_policy import ASYNC, SYNC, Mtbf, SavePolicy

MODES = (SYNC, ASYNC, "auto")


@dataclass
class Result:
    """One mode's loop costs, one per save made, seconds."""

    costs: list[float] = field(default_factory=list)
    skipped: int = 0
    chosen: list[str] = field(default_factory=list)


def width_for(megabytes: float) -> int:
    return 1024 if megabytes <= 50 else 2048 if megabytes <= 500 else 4096


def run_mode(
    mode: str, directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
    x: torch.Tensor, every: int, saves: int,
) -> Result:  # fmt: skip
    """Train ``every x saves`` steps with a save every ``every`` steps written ``mode``."""
    result = Result()
    policy = SavePolicy(
        ckpt_every=every, mem_every=0, mode=mode, mtbf=Mtbf(3600.0), emit=lambda *a, **k: None
    )
    base = baseline_step(model, opt, x)
    with CheckpointStore(directory, is_writer=True, keep_last=1) as store:
        for n in range(1, saves + 1):
            t0 = time.perf_counter()
            for _ in range(every):
                busy = store.in_flight
                s0 = time.perf_counter()
                train_step(model, opt, x)
                policy.on_step(time.perf_counter() - s0, writer_busy=busy)
                if not store.in_flight:
                    policy.writer_done(store.writing_step, store.last_write_seconds)
            how = policy.disk_mode()
            s0 = time.perf_counter()
            made = store.save(n, model, opt, None, {}, {}, skip_if_busy=True,
                              asynchronous=how == ASYNC)  # fmt: skip
            if made:
                policy.disk_saved(n, how, time.perf_counter() - s0)
                result.chosen.append(how)
            else:
                result.skipped += 1
            # This stretch's extra time: its save's call, and what the previous asynchronous
            # write slowed its steps by.
            result.costs.append(time.perf_counter() - t0 - every * base)
        t0 = time.perf_counter()
        store.wait()
        result.costs[-1] += time.perf_counter() - t0  # the last write, not overlapped
    return result


def per_save(result: Result, first: int = 0) -> float:
    """The loop's extra time over the stretches from ``first`` on, per save made there."""
    made = max(1, len(result.costs[first:]) - (result.skipped if first == 0 else 0))
    return sum(result.costs[first:]) / made


def one_size(megabytes: float, saves: int, base_dir: Path) -> dict[str, Result]:
    width = width_for(megabytes)
    layers = max(1, round(megabytes * 1e6 / (12 * width * width)))
    model, opt = make_model(layers, width)
    x = torch.randn(16, width)
    train_step(model, opt, x)
    state_mb = state_bytes(model, opt) / 1e6
    with CheckpointStore(base_dir / "probe", is_writer=True, keep_last=1, async_save=False) as s:
        t0 = time.perf_counter()
        s.save(0, model, opt, None, {}, {})
        sync_seconds = time.perf_counter() - t0
    step = baseline_step(model, opt, x)
    every = max(2, math.ceil(1.5 * sync_seconds / step))
    print(f"\n{state_mb:.0f} MB state ({layers} x {width}x{width}): step {step:.3f} s, "
          f"sync save {sync_seconds:.2f} s, a save every {every} steps", flush=True)  # fmt: skip
    results = {}
    for mode in MODES:
        directory = base_dir / f"{megabytes:g}-{mode}"
        results[mode] = run_mode(mode, directory, model, opt, x, every, saves)
        shutil.rmtree(directory, ignore_errors=True)
        r = results[mode]
        ways = "".join(w[0] for w in r.chosen)
        print(f"  {mode:<5} cost/save {per_save(r):.3f} s, skipped {r.skipped}, ways {ways}",
              flush=True)  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,250,1000", help="state sizes, MB (default 10,250,1000)")
    ap.add_argument("--saves", type=int, default=6, help="saves per mode and size (default 6)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="bench-mode-", dir=args.dir))
    table = []
    try:
        for mb in sizes:
            r = one_size(mb, args.saves, base)
            med = {m: per_save(r[m]) for m in MODES}
            settled = per_save(r["auto"], first=2)
            table.append((mb, med[SYNC], med[ASYNC], med["auto"], settled, r["auto"].chosen))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nmachine: {platform.machine()}, {psutil.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; loop cost per save made, seconds; "
          f"{args.saves} saves per mode")  # fmt: skip
    print("| state | sync | async | auto (all) | auto (after its 2 measuring saves) | "
          "auto / cheaper | ways auto wrote |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---|")
    for mb, sync, asyn, auto, settled, ways in table:
        cheaper = min(sync, asyn)
        ratio = settled / cheaper if cheaper > 0 else float("nan")
        print(f"| {mb:g} MB | {sync:.3f} | {asyn:.3f} | {auto:.3f} | {settled:.3f} | "
              f"{ratio:.2f} | {''.join(w[0] for w in ways)} |")  # fmt: skip


if __name__ == "__main__":
    main()
