"""Standby at rest: the CPU and memory a standby attempt uses while it waits at its gate.

Starts one supervised run of the overhead benchmark's job (standby on, its default), waits for
its ``standby_ready`` event, then measures over ``--seconds`` the CPU time (user + system, from
psutil) and the voluntary context switches (wake-ups) of the standby's torchrun and of each of
its workers, and, beside them for scale, of the supervisor and of the training attempt's
torchrun and workers. Then it reports each standby worker's CPU seconds before the windows
(its start and imports: the one-time cost of a standby) and its resident memory (RSS, and PSS
and USS: the libraries torch maps are shared between processes).

    python bench/bench_standby_idle.py                  # 3 windows of 10 s
    python bench/bench_standby_idle.py --windows 1 --seconds 30
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from subprocess import Popen
from typing import Any

import psutil
from common import fmt, job_args, machine_line, read_jsonl, start_supervised, stop_run

from runcontract import layout
from runcontract.events import EventType

START_TIMEOUT = 300.0


def wait_event(run_dir: Path, proc: Popen, kind: str, timeout: float) -> dict[str, Any] | None:
    """The first ``kind`` event of the run; None when the run ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for event in read_jsonl(run_dir / "events.jsonl"):
            if event["type"] == kind:
                return event
        time.sleep(0.2)
    return None


def family(label: str, torchrun_pid: int) -> dict[str, psutil.Process]:
    """A torchrun and its descendants, by label."""
    root = psutil.Process(torchrun_pid)
    procs = {f"{label} torchrun (pid {root.pid})": root}
    for child in root.children(recursive=True):
        rank = child.environ().get("RANK", "?")
        procs[f"{label} worker rank {rank} (pid {child.pid})"] = child
    return procs


def sample(procs: dict[str, psutil.Process]) -> dict[str, tuple[float, int]]:
    """CPU seconds (user + system) and voluntary context switches of each process so far."""
    out = {}
    for name, p in procs.items():
        with p.oneshot():
            t = p.cpu_times()
            out[name] = (t.user + t.system, p.num_ctx_switches().voluntary)
    return out


def measure(procs: dict[str, psutil.Process], seconds: float) -> dict[str, tuple[float, float]]:
    """CPU % and wake-ups per second of each process over ``seconds``."""
    before, t0 = sample(procs), time.monotonic()
    time.sleep(seconds)
    after, wall = sample(procs), time.monotonic() - t0
    return {
        name: (
            100 * (after[name][0] - before[name][0]) / wall,
            (after[name][1] - before[name][1]) / wall,
        )
        for name in procs
    }


def cpu_table(
    procs: dict[str, psutil.Process], windows: list[dict[str, tuple[float, float]]]
) -> str:
    """CPU % (mean and highest window) and wake-ups/s of each process, with each group's sum."""
    lines = ["| process | CPU % (mean) | CPU % (highest window) | wake-ups/s |"]
    lines.append("|---|---:|---:|---:|")
    groups = ("standby", "training", "supervisor")
    for group in groups:
        names = [n for n in procs if n.startswith(group)]
        rows = [(n, [w[n] for w in windows]) for n in names]
        if len(names) > 1:
            sums = [(sum(w[n][0] for n in names), sum(w[n][1] for n in names)) for w in windows]
            rows.append((f"**{group}: all**", sums))
        for name, values in rows:
            cpu = [v[0] for v in values]
            wakes = sum(v[1] for v in values) / len(values)
            lines.append(f"| {name} | {sum(cpu) / len(cpu):.2f} | {max(cpu):.2f} | {wakes:.1f} |")
    return "\n".join(lines)


def memory_table(procs: dict[str, psutil.Process], before: dict[str, tuple[float, int]]) -> str:
    """Each standby worker's CPU seconds before the windows (its start and imports, the
    one-time cost), and its resident memory: RSS, PSS and USS, MB."""
    lines = ["| standby worker | CPU s before waiting | RSS (MB) | PSS (MB) | USS (MB) |"]
    lines.append("|---|---:|---:|---:|---:|")
    for name, p in procs.items():
        if name.startswith("standby worker"):
            m = p.memory_full_info()
            lines.append(
                f"| {name} | {before[name][0]:.1f} | {m.rss / 1e6:.0f} | {m.pss / 1e6:.0f} | "
                f"{m.uss / 1e6:.0f} |"
            )
    return "\n".join(lines)


def observe(run_dir: Path, proc: Popen, args: argparse.Namespace) -> int:
    """Wait for the standby, measure it, print the tables; 1 when it was never ready."""
    ready = wait_event(run_dir, proc, EventType.STANDBY_READY, START_TIMEOUT)
    launch = wait_event(run_dir, proc, EventType.LAUNCH, 1.0)
    if ready is None or launch is None:
        print(f"the standby was never ready; see {run_dir}", file=sys.stderr)
        return 1
    time.sleep(args.settle)
    procs = {
        **family("standby", int(ready["torchrun_pid"])),
        **family("training", int(launch["torchrun_pid"])),
        f"supervisor (pid {proc.pid})": psutil.Process(proc.pid),
    }
    before = sample(procs)
    windows = [measure(procs, args.seconds) for _ in range(args.windows)]
    step = max((m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "step" in m), default=0)
    print(
        f"standby ready {fmt(ready.get('seconds'), 1)} s after its start (its imports); then "
        f"{args.settle:.0f} s later, {args.windows} window(s) of {args.seconds:.0f} s while the "
        f"attempt trained (step {step} at the end); load average "
        + " / ".join(f"{x:.1f}" for x in psutil.getloadavg())
        + " (1/5/15 min) at the end"
    )
    print()
    print(cpu_table(procs, windows))
    print()
    print(memory_table(procs, before))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Start the run, observe its standby, stop the run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="one window (default 10)")
    parser.add_argument("--windows", type=int, default=3, help="windows measured (default 3)")
    parser.add_argument("--settle", type=float, default=2.0, help="wait after ready (default 2)")
    parser.add_argument("--model", default="small", help="model preset (default small)")
    args = parser.parse_args(argv)
    print(machine_line())
    print(
        f"job: {args.model} preset, 2 ranks (gloo, 1 thread each), micro-batch 16 x seq-len 64, "
        "async checkpoint every 10 steps, supervisor defaults (standby on)"
    )
    train = job_args(model=args.model, steps=100_000, ckpt_every=10, micro_batch=16, seq_len=64)
    with tempfile.TemporaryDirectory(prefix="bench-standby-idle-") as tmp:
        run_dir = Path(tmp) / "run"
        proc = start_supervised(run_dir, [*train, "--ckpt-mode", "async"], ["--max-restarts", "0"])
        try:
            return observe(run_dir, proc, args)
        finally:
            stop_run(proc, run_dir)
            # Killed, the run could not remove its memory snapshots.
            shutil.rmtree(layout.memory_dir(run_dir), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
