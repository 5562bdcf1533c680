"""What a periodic checkpoint costs the training loop under --ckpt-mode sync, async and auto.

For each state size, the same loop (a stack of linear layers, AdamW) trains N stretches of K
steps with a save after each, through the trainer's own ``CheckpointStore`` and ``SavePolicy``,
and once more without any save. A save's cost is the extra wall time over the run without saves
(the last write waited for), divided by N. Every save is made: one due while the last is still
being written waits for it, so a write that cannot keep up is charged to the mode that chose
it. K is chosen so that the stretch lasts twice the slowest of three synchronous saves. The runs
alternate (none, sync, async, auto, rotated each round), so that a change of the machine's load
hits them alike. ``auto`` keeps one policy across the rounds, as a long run would: its first round
holds its two measuring saves (one each way), the later rounds its steady choice.

    python bench/bench_ckpt_mode.py                      # 10 MB, 250 MB and 1 GB states
    python bench/bench_ckpt_mode.py --sizes 10,250 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
from bench_checkpoint import baseline_step, make_model, state_bytes, train_step

from trainer.checkpoint import CheckpointStore
from trainer.save_policy import ASYNC, SYNC, Mtbf, SavePolicy

MODES = ("none", SYNC, ASYNC, "auto")


def width_for(megabytes: float) -> int:
    return 1024 if megabytes <= 50 else 2048 if megabytes <= 500 else 4096


def run_once(
    policy: SavePolicy | None, directory: Path, model: torch.nn.Module,
    opt: torch.optim.Optimizer, x: torch.Tensor, every: int, saves: int,
) -> tuple[float, str]:  # fmt: skip
    """Seconds for ``saves`` stretches of ``every`` steps, each followed by a save written the
    way ``policy`` says (None: no save); and the ways written (``s``/``a``)."""
    ways = ""
    with CheckpointStore(directory, is_writer=True, keep_last=1) as store:
        t0 = time.perf_counter()
        for n in range(1, saves + 1):
            for _ in range(every):
                busy = store.in_flight
                s0 = time.perf_counter()
                train_step(model, opt, x)
                if policy is not None:
                    policy.on_step(time.perf_counter() - s0, writer_busy=busy)
                    if not store.in_flight:
                        policy.writer_done(store.writing_step, store.last_write_seconds)
            if policy is None:
                continue
            how = policy.disk_mode()
            s0 = time.perf_counter()
            store.save(n, model, opt, None, {}, {}, asynchronous=how == ASYNC)
            policy.disk_saved(n, how, time.perf_counter() - s0)
            ways += how[0]
        store.wait()
        return time.perf_counter() - t0, ways


def _policy(mode: str) -> SavePolicy:
    return SavePolicy(
        ckpt_every=1, mem_every=0, mode=mode, mtbf=Mtbf(3600.0), emit=lambda *a, **k: None
    )


def one_size(megabytes: float, saves: int, rounds: int, base_dir: Path) -> dict[str, list[float]]:
    """Per mode, the cost per save of each round (auto: round 0 first)."""
    width = width_for(megabytes)
    layers = max(1, round(megabytes * 1e6 / (12 * width * width)))
    model, opt = make_model(layers, width)
    x = torch.randn(16, width)
    train_step(model, opt, x)
    state_mb = state_bytes(model, opt) / 1e6
    sync_seconds = []
    with CheckpointStore(base_dir / "probe", is_writer=True, keep_last=1, async_save=False) as s:
        for n in range(3):
            t0 = time.perf_counter()
            s.save(n, model, opt, None, {}, {})
            sync_seconds.append(time.perf_counter() - t0)
    shutil.rmtree(base_dir / "probe", ignore_errors=True)
    step = baseline_step(model, opt, x)
    every = max(2, math.ceil(2 * max(sync_seconds) / step))
    print(f"\n{state_mb:.0f} MB state ({layers} x {width}x{width}): step {step:.3f} s, "
          f"sync save {max(sync_seconds):.2f} s at most, a save every {every} steps",
          flush=True)  # fmt: skip
    auto = _policy("auto")
    elapsed: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
            policy = None if mode == "none" else auto if mode == "auto" else _policy(mode)
            directory = base_dir / f"{megabytes:g}-{mode}-{r}"
            seconds, ways = run_once(policy, directory, model, opt, x, every, saves)
            shutil.rmtree(directory, ignore_errors=True)
            elapsed[mode].append(seconds)
            print(f"  round {r} {mode:<5} {seconds:.2f} s {ways}", flush=True)
    return {
        m: [(e - n) / saves for e, n in zip(elapsed[m], elapsed["none"], strict=True)]
        for m in MODES[1:]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,250,1000", help="state sizes, MB (default 10,250,1000)")
    ap.add_argument("--saves", type=int, default=6, help="saves per run (default 6)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the four runs (default 3)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="bench-mode-", dir=args.dir))
    table = []
    try:
        for mb in sizes:
            table.append((mb, one_size(mb, args.saves, args.rounds, base)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median
    print(f"\nmachine: {platform.machine()}, {psutil.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; the loop's cost per save, seconds, median of "
          f"{args.rounds} rounds of {args.saves} saves")  # fmt: skip
    print("| state | sync | async | auto, first round (2 measuring saves) | auto, later rounds | "
          "auto later / cheaper |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for mb, cost in table:
        sync, asyn = med(cost[SYNC]), med(cost[ASYNC])
        first, later = cost["auto"][0], med(cost["auto"][1:] or cost["auto"])
        cheaper = min(sync, asyn)
        ratio = f"{later / cheaper:.2f}" if cheaper > 0 else "-"
        print(f"| {mb:g} MB | {sync:.3f} | {asyn:.3f} | {first:.3f} | {later:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
