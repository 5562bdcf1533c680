"""Checkpoint store benchmark: loop stall of an async save, and write throughput vs the disk.

For a model whose saved state (parameters + AdamW moments) is at least 200 MB:

* **disk**: this disk's own sequential write + fsync bandwidth, a file of the checkpoint's size
  written in 8 MB chunks into the same directory (the ceiling a checkpoint write can reach);
* **sync save**: ``CheckpointStore(async_save=False).save`` — serialise, hash, write, fsync,
  commit — the time the loop would stand still without async saving;
* **async (thread)**: the store's own background writer;
* **async (process)**: the same commit run by a separate writer process, the snapshot handed over
  through shared memory (for comparison; the store uses the thread).

The *stall* of an async save is the extra wall time the training loop loses: the ``save()`` call
itself plus the slowdown of the steps that run while the write is in flight
(``elapsed - steps × baseline step time``). Each figure is the median of ``--repeats`` runs.

    python bench/bench_checkpoint.py                     # ~250 MB of state, in a temp dir
    python bench/bench_checkpoint.py --dir /mnt/ckpt --layers 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import torch
import torch.multiprocessing as mp
from torch import nn

from trainer.checkpoint import CheckpointStore
from trainer.checkpoint import state as ckpt_state
from trainer.checkpoint.commit import write_checkpoint
from trainer.checkpoint.fsio import dir_size
from trainer.checkpoint.store import BACKGROUND_NICE

CHUNK = 8 << 20
T = TypeVar("T")


def make_model(
    layers: int, width: int, device: torch.device | str = "cpu"
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    # One host read per step, as the trainer makes: on a GPU the step is timed to its end, not
    # to the moment its kernels were queued.
    loss.item()


def disk_bandwidth(directory: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` sequentially and fsync them, in the checkpoint directory."""
    buf = memoryview(os.urandom(CHUNK))
    path = directory / "disk-probe.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[: min(CHUNK, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def baseline_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, n: int = 5
) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        train_step(model, opt, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_stall(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    start_save: Callable[[], object],
    in_flight: Callable[[], bool],
) -> tuple[float, float]:
    """(save() call seconds, total loop stall seconds) of one async save."""
    base = baseline_step(model, opt, x)
    t0 = time.perf_counter()
    start_save()
    blocked = time.perf_counter() - t0
    steps = 0
    while in_flight():
        train_step(model, opt, x)
        steps += 1
    elapsed = time.perf_counter() - t0
    return blocked, max(blocked, elapsed - steps * base)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of what a checkpoint saves: the parameters and the optimizer's tensors."""
    return sum(p.nbytes for p in model.parameters()) + sum(
        t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_host_growth(fn: Callable[[], T]) -> tuple[T, int | None]:
    """Run ``fn``; return its result and how far this process's resident memory rose above its
    level before the call at its peak (bytes; None where Linux's peak counter cannot be reset).

    Exact rather than sampled: the kernel's high-water mark (VmHWM) is reset to the current
    resident size first (``/proc/self/clear_refs``, Linux 4.0+)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
    except OSError:
        return fn(), None
    result = fn()
    return result, (_status_kb("VmHWM") - before) * 1024


@dataclass
class SyncSave:
    """One synchronous save: its seconds, the checkpoint's bytes on disk, and the peak growth
    of host memory while it ran (None where that cannot be measured)."""

    seconds: float
    ckpt_bytes: int
    peak_host_bytes: int | None


def sync_saves(
    run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, steps: Iterable[int]
) -> Iterator[SyncSave]:
    """Save ``model`` and ``opt`` synchronously once per step of ``steps`` into ``run_dir``."""
    with CheckpointStore(run_dir, is_writer=True, keep_last=1, async_save=False) as store:
        for step in steps:

            def save(step: int = step) -> float:
                t0 = time.perf_counter()
                store.save(step, model, opt, None, {}, {})
                return time.perf_counter() - t0

            seconds, peak = peak_host_growth(save)
            assert store.last_path is not None
            yield SyncSave(seconds, dir_size(store.last_path), peak)


def thread_stalls(
    run_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    steps: Iterable[int],
) -> Iterator[tuple[float, float]]:
    """(save() call, loop stall) seconds of one save by the store's background thread per step
    of ``steps``, training on ``x`` meanwhile."""
    with CheckpointStore(run_dir, is_writer=True, keep_last=1) as store:
        for step in steps:
            yield measure_stall(
                model,
                opt,
                x,
                lambda s=step: store.save(s, model, opt, None, {}, {}),
                lambda: store.in_flight,
            )


# -- the process writer, for comparison only ----------------------------------------------------


def _shm_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype).share_memory_()
    out.copy_(t.detach())
    return out


def _writer_main(ckpt_dir: str, jobs, done) -> None:
    os.nice(BACKGROUND_NICE)  # same priority as the store's writer thread, for a fair comparison
    while True:
        snap = jobs.get()
        if snap is None:
            return
        write_checkpoint(Path(ckpt_dir), snap)
        done.put(snap.step)


class ProcessWriter:
    """Capture into shared memory in the loop; a persistent child process commits."""

    def __init__(self, run_dir: Path) -> None:
        ctx = mp.get_context("spawn")
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.jobs, self.done = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=_writer_main, args=(str(self.ckpt_dir), self.jobs, self.done)
        )
        self.proc.start()
        self.pending = 0

    def save(self, step, model, opt) -> None:
        real = ckpt_state._host_copy
        ckpt_state._host_copy = _shm_copy
        try:
            snap = ckpt_state.capture(step, model, opt, None, {}, {})
        finally:
            ckpt_state._host_copy = real
        self.jobs.put(snap)
        self.pending += 1

    def in_flight(self) -> bool:
        while self.pending:
            try:
                self.done.get_nowait()
            except Exception:
                return True
            self.pending -= 1
        return False

    def close(self) -> None:
        self.jobs.put(None)
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    model, opt = make_model(args.layers, args.width)
    x = torch.randn(args.batch, args.width)
    train_step(model, opt, x)  # AdamW moments exist from here on
    state_mb = state_bytes(model, opt) / 1e6
    step = 0
    try:
        sync_s, disk_s, peak_b = [], [], []
        sync_dir = base / "sync"
        for save in sync_saves(sync_dir, model, opt, range(1, args.repeats + 1)):
            ckpt_bytes = save.ckpt_bytes
            sync_s.append(save.seconds)
            peak_b.append(save.peak_host_bytes)
            disk_s.append(disk_bandwidth(sync_dir / "checkpoints", ckpt_bytes))
            print(f"sync save {sync_s[-1]:.2f} s, disk write+fsync {disk_s[-1]:.2f} s", flush=True)
        step = args.repeats

        thread_block, thread_stall = [], []
        thread_steps = range(step + 1, step + args.repeats + 1)
        for b, s in thread_stalls(base / "thread", model, opt, x, thread_steps):
            thread_block.append(b)
            thread_stall.append(s)
            print(f"async thread: save() {b:.3f} s, stall {s:.3f} s", flush=True)
        step += args.repeats

        proc_block, proc_stall = [], []
        writer = ProcessWriter(base / "process")
        try:
            for _ in range(args.repeats):
                step += 1
                b, s = measure_stall(
                    model,
                    opt,
                    x,
                    lambda s=step: writer.save(s, model, opt),
                    writer.in_flight,
                )
                proc_block.append(b)
                proc_stall.append(s)
                print(f"async process: save() {b:.3f} s, stall {s:.3f} s", flush=True)
        finally:
            writer.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = statistics.median
    sync, disk = med(sync_s), med(disk_s)
    mb = ckpt_bytes / 1e6
    peaks = [b for b in peak_b if b is not None]
    peak_mb = f"{med(peaks) / 1e6:.0f} MB" if peaks else "-"
    rows = [
        ("saved state (params + AdamW)", f"{state_mb:.0f} MB", ""),
        ("checkpoint on disk", f"{mb:.0f} MB", ""),
        ("disk: sequential write + fsync", f"{disk:.2f} s", f"{mb / disk:.0f} MB/s"),
        ("sync save (serialise+hash+write+fsync+commit)", f"{sync:.2f} s", f"{mb / sync:.0f} MB/s"),
        ("sync save: peak host memory growth", peak_mb, ""),
        ("async thread: save() call", f"{med(thread_block):.3f} s", ""),
        ("async thread: loop stall", f"{med(thread_stall):.3f} s", ""),
        ("async process: save() call", f"{med(proc_block):.3f} s", ""),
        ("async process: loop stall", f"{med(proc_stall):.3f} s", ""),
    ]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'measure':<48} {'value':>10} {'rate':>10}")
    for name, value, rate in rows:
        print(f"{name:<48} {value:>10} {rate:>10}")
    ratios = [
        ("throughput / disk bandwidth (target >= 0.70)", disk / sync),
        ("async thread save() call / sync save", med(thread_block) / sync),
        ("async thread stall / sync save (target <= 0.10)", med(thread_stall) / sync),
        ("async process save() call / sync save", med(proc_block) / sync),
        ("async process stall / sync save", med(proc_stall) / sync),
    ]
    print()
    for name, r in ratios:
        print(f"{name:<52} {r:6.2f}")


if __name__ == "__main__":
    main()
