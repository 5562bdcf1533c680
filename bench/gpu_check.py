"""Device check: what one GPU must settle before the first GPU user, printed as one table.

* determinism: two uninterrupted runs and one SIGTERMed (it stops after step 1) and resumed, with
  ``--amp`` off, bf16 and fp16 (CUDA only), each without and with ``--deterministic``; the three
  must end with the same params_sha256. Every CPU row must be equal, and on CPU
  ``--deterministic`` must not change a bit; on CUDA the rows with ``--deterministic`` must be
  equal, the others report what they found.
* host reads, tokens/s: the ``host_reads`` of the trainer's final line per optimizer step, and
  its median tokens/s, for a fresh run, a run resumed from its middle checkpoint, and a fresh run
  with ``--deterministic`` (the flag's cost); ``small`` and ``gpt2`` presets.
* checkpoint stall: the loop stall of an asynchronous save against a synchronous one (the
  measurement of bench/bench_checkpoint.py), and the peak growth of host memory during a save.
* GPU memory after SIGKILL: how long a SIGKILLed process's GPU memory takes to show as free in
  ``torch.cuda.mem_get_info``.

CPU rows always run; a CUDA row needs a CUDA device, and without one prints one line saying it
was skipped and why. Sized to finish within 10 minutes on one GPU; the CPU part alone takes
1-2 minutes on 2 cores. Exit status 1 when a run failed or a row that must hold does not, else 0.

    python bench/gpu_check.py                # every row this machine can run
    python bench/gpu_check.py --quick        # fewer steps and repeats
    python bench/gpu_check.py --device cpu   # CPU rows only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import bench_checkpoint
import torch
from common import (
    REPO_ROOT,
    TRAIN_PY,
    clean_env,
    job_args,
    machine_line,
    median,
    tokens_per_s,
)

from runcontract.exit_codes import TrainerExit
from runcontract.layout import CHECKPOINTS, step_name

SKIPPED = "skipped"


@dataclass
class Row:
    """One line of the table; ``ok`` False when it shows something that must not happen."""

    check: str
    case: str
    result: str
    detail: str = ""
    ok: bool = True


@dataclass(frozen=True)
class Job:
    """One trainer configuration (1 rank, the random corpus: nothing to download or cache)."""

    device: str
    model: str
    steps: int
    micro_batch: int
    seq_len: int
    amp: str = "off"
    deterministic: bool = False
    dropout: float = 0.0
    ckpt_every: int = 0

    @property
    def name(self) -> str:
        det = " --deterministic" if self.deterministic else ""
        return f"{self.device} {self.model}, amp {self.amp}{det}"

    def argv(self, run_dir: Path, extra: Sequence[str]) -> list[str]:
        args = job_args(self.model, self.steps, self.ckpt_every, self.micro_batch, self.seq_len)
        args += ["--data", "random", "--device", self.device, "--amp", self.amp]
        args += ["--dropout", str(self.dropout), "--run-dir", str(run_dir)]
        if self.device == "cpu":
            args += ["--threads", "1"]  # CPU bits depend on the thread count; runs share cores
        if self.deterministic:
            args.append("--deterministic")
        return [sys.executable, str(TRAIN_PY), *args, *extra]


@dataclass
class Run:
    """A finished trainer process and what its output says."""

    code: int | None
    stdout: str
    stderr: str

    def done(self, key: str) -> str | None:
        """A value from the final ``done step=… host_reads=… params_sha256=…`` line."""
        match = re.search(rf"^done .*\b{key}=(\S+)", self.stdout, re.MULTILINE)
        return match.group(1) if match else None

    def failure(self, expected: int = TrainerExit.OK) -> str | None:
        if self.code == expected:
            return None
        last = (self.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return f"exit {self.code} (expected {expected}): {last[-160:]}"


def train(job: Job, run_dir: Path, *extra: str, timeout: float) -> Run:
    """Run the trainer to its end."""
    try:
        proc = subprocess.run(
            job.argv(run_dir, extra),
            cwd=REPO_ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return Run(None, "", f"timed out after {timeout:.0f} s")
    return Run(proc.returncode, proc.stdout, proc.stderr)


def preempt(job: Job, run_dir: Path, timeout: float) -> tuple[Run, int | None]:
    """Run the trainer and SIGTERM it as soon as it catches SIGTERM (its preemption handler is
    in place, before its first step): it must stop after step 1 with a checkpoint, whatever
    the speed of the device. Returns the run and the step its checkpoint holds."""
    proc = subprocess.Popen(
        job.argv(run_dir, ()),
        cwd=REPO_ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if catches(proc.pid, signal.SIGTERM):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    stopped = re.search(r"preempted: checkpoint at step (\d+) written", out)
    return Run(proc.returncode, out, err), int(stopped.group(1)) if stopped else None


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: SigCgt in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


# -- determinism ----------------------------------------------------------------------------


@dataclass
class Repeat:
    """Two uninterrupted runs and a preempted-and-resumed one of the same job."""

    job: Job
    shas: list[str | None] = dataclasses.field(default_factory=list)
    stopped_at: int | None = None
    error: str | None = None


def repeat(job: Job, base: Path, timeout: float) -> Repeat:
    """Run ``job`` twice uninterrupted and once preempted and resumed (in ``base``)."""
    out = Repeat(job)
    for i in (1, 2):
        run = train(job, base / f"run-{i}", timeout=timeout)
        if (error := run.failure()) is not None:
            out.error = f"run {i}: {error}"
            return out
        out.shas.append(run.done("params_sha256"))
    stopped, out.stopped_at = preempt(job, base / "preempted", timeout)
    if (error := stopped.failure(TrainerExit.PREEMPTED)) is not None:
        out.error = f"preempted run: {error}"
        return out
    resumed = train(job, base / "preempted", "--resume", "auto", timeout=timeout)
    if (error := resumed.failure()) is not None:
        out.error = f"resumed run: {error}"
        return out
    out.shas.append(resumed.done("params_sha256"))
    return out


RUN_NAMES = ("run 1", "run 2", "resumed")


def determinism_row(r: Repeat, without: Repeat | None) -> Row:
    """The row of one job; ``without``: the same job without --deterministic."""
    must = r.job.device == "cpu" or r.job.deterministic
    if r.error is not None:
        return Row("determinism", r.job.name, "FAILED", r.error, ok=False)
    if len(set(r.shas)) != 1 or r.shas[0] is None:
        shown = ", ".join(f"{n} {(s or '-')[:12]}" for n, s in zip(RUN_NAMES, r.shas, strict=True))
        return Row("determinism", r.job.name, "DIFFER" if must else "differ", shown, ok=not must)
    detail = f"run 1 = run 2 = stopped at step {r.stopped_at} + resumed: {r.shas[0][:12]}"
    ok = True
    if without is not None and without.error is None and len(set(without.shas)) == 1:
        same = without.shas[0] == r.shas[0]
        detail += "; same bits as without" if same else "; other bits than without"
        ok = same or r.job.device != "cpu"  # on CPU the flag must change nothing
    return Row("determinism", r.job.name, "equal" if ok else "FLAG CHANGED BITS", detail, ok=ok)


# -- host reads and tokens/s ------------------------------------------------------------------


def throughput_rows(
    job: Job, base: Path, warmup: int, timeout: float, skip: str | None = None
) -> list[Row]:
    """Fresh, resumed from the middle checkpoint, and fresh with --deterministic: host reads
    per optimizer step and median tokens/s after ``warmup`` steps of each attempt. ``skip``:
    why these cannot run here (each row then says so)."""
    half = job.steps // 2
    job = dataclasses.replace(job, ckpt_every=half)
    middle = base / "fresh" / CHECKPOINTS / step_name(half)
    det = dataclasses.replace(job, deterministic=True)
    cases = [
        ("fresh", job, base / "fresh", (), 0),
        ("resumed", job, base / "resumed", ("--resume-from", str(middle)), half),
        ("fresh --deterministic", det, base / "det", (), 0),
    ]
    rows: list[Row] = []
    speeds: dict[str, float | None] = {}
    for what, case_job, run_dir, extra, first in cases:
        case = f"{job.name} {what}"
        if skip is not None:
            rows.append(Row("host reads, tokens/s", case, SKIPPED, skip))
            continue
        run = train(case_job, run_dir, *extra, timeout=timeout)
        if (error := run.failure()) is not None:
            rows.append(Row("host reads, tokens/s", case, "FAILED", error, ok=False))
            continue
        reads = int(run.done("host_reads") or -1)
        steps = job.steps - first
        speed = speeds[what] = tokens_per_s(run_dir, warmup, first)
        detail = (
            f"{reads} reads in {steps} steps; {speed or 0:.0f} tokens/s (median after "
            f"{warmup} warm-up steps; {job.micro_batch} x {job.seq_len} tokens per step)"
        )
        base_speed = speeds.get("fresh")
        if what != "fresh" and speed and base_speed:
            detail += f" = {speed / base_speed:.2f} x fresh"
        # The loop's budget: one read per optimizer step (no eval, no fp16 scaler here).
        rows.append(Row("host reads, tokens/s", case, f"{reads / steps:.2f}/step", detail,
                        ok=reads == steps))  # fmt: skip
    return rows


# -- checkpoint stall and save memory ---------------------------------------------------------

STALL_CHECKS = ("checkpoint stall", "save host memory")


def stall_rows(
    device: str,
    layers: int,
    width: int,
    batch: int,
    repeats: int,
    base: Path,
    skip: str | None = None,
) -> list[Row]:
    """The async save's loop stall against a sync save, and a sync save's peak host memory,
    with bench_checkpoint's model (``layers`` linear layers ``width`` wide) on ``device``."""
    case = f"{device}, {layers} linear layers {width} wide"
    if skip is not None:
        return [Row(check, case, SKIPPED, skip) for check in STALL_CHECKS]
    model, opt = bench_checkpoint.make_model(layers, width, device)
    x = torch.randn(batch, width, device=device)
    bench_checkpoint.train_step(model, opt, x)  # AdamW moments exist from here on
    state = bench_checkpoint.state_bytes(model, opt)
    syncs = list(bench_checkpoint.sync_saves(base / "sync", model, opt, range(1, repeats + 1)))
    steps = range(repeats + 1, 2 * repeats + 1)
    stalls = list(bench_checkpoint.thread_stalls(base / "thread", model, opt, x, steps))
    sync = median(s.seconds for s in syncs) or 0.0
    call, stall = median(c for c, _ in stalls) or 0.0, median(s for _, s in stalls) or 0.0
    peak = median(s.peak_host_bytes for s in syncs)
    rows = [
        Row(
            STALL_CHECKS[0],
            case,
            f"{stall / sync:.2f} x sync",
            f"{state / 1e6:.0f} MB of params + AdamW; async: save() {call:.3f} s, loop stall "
            f"{stall:.3f} s; sync save {sync:.3f} s (median of {repeats})",
        ),
        Row(
            STALL_CHECKS[1],
            case,
            "-" if peak is None else f"+{peak / 1e6:.0f} MB",
            "peak resident growth during a sync save (VmHWM)"
            + ("" if peak is None else f": {peak / state:.2f} x the state"),
        ),
    ]
    del model, opt, x
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# -- GPU memory after SIGKILL -----------------------------------------------------------------

_HOLDER = (
    "import sys, torch; x = torch.ones(int(sys.argv[1]), dtype=torch.uint8, device='cuda'); "
    "torch.cuda.synchronize(); print('ready', flush=True); sys.stdin.read()"
)


def release_row(gib: float, timeout: float, skip: str | None = None) -> Row:
    """SIGKILL a process that holds ``gib`` GiB of GPU memory; time until it shows as free."""
    case = f"cuda, a process holding {gib:g} GiB"
    if skip is not None:
        return Row("GPU memory after SIGKILL", case, SKIPPED, skip)
    progress("GPU memory after SIGKILL")
    free_before = torch.cuda.mem_get_info()[0]  # this process's own context is counted already
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(int(gib * 2**30))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != "ready":
        holder.kill()
        holder.wait()
        return Row("GPU memory after SIGKILL", case, "FAILED", "the holder did not start", False)
    held = free_before - torch.cuda.mem_get_info()[0]
    t0 = time.monotonic()
    holder.kill()
    holder.wait()
    reaped = time.monotonic() - t0
    # Freed when no more than a sliver of what it held is still missing.
    while torch.cuda.mem_get_info()[0] < free_before - held // 100:
        if time.monotonic() - t0 > timeout:
            return Row("GPU memory after SIGKILL", case, "NOT FREED",
                       f"within {timeout:.0f} s", ok=False)  # fmt: skip
        time.sleep(0.002)
    freed = time.monotonic() - t0
    return Row(
        "GPU memory after SIGKILL",
        case,
        f"{freed:.3f} s",
        f"{held / 2**30:.2f} GiB held (its context included); SIGKILL to reaped {reaped:.3f} s, "
        f"to free in mem_get_info {freed:.3f} s",
    )


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much each check runs (``--quick`` lowers the counts, never the set of rows)."""

    det_steps: int = 40
    cpu_steps: int = 16
    cuda_small_steps: int = 60
    cuda_gpt2_steps: int = 40
    warmup: int = 3
    repeats: int = 3


QUICK = Sizes(cpu_steps=10, cuda_small_steps=30, cuda_gpt2_steps=20, warmup=2, repeats=1)


def determinism_jobs(device: str, det_steps: int) -> list[Job]:
    """tiny preset. On CUDA with dropout: the per-step RNG replay is part of what must repeat,
    and the fused attention kernels take it. On CPU without: with dropout CPU attention takes
    the math kernel anyway, and the fused one, which --deterministic must leave alone, would go
    unchecked (the tests cover CPU dropout)."""
    amps = ("off", "bf16") if device == "cpu" else ("off", "bf16", "fp16")
    dropout = 0.0 if device == "cpu" else 0.1
    return [
        Job(device, "tiny", det_steps, 8, 64, amp=amp, deterministic=det, dropout=dropout)
        for amp in amps
        for det in (False, True)
    ]


def throughput_jobs(device: str, s: Sizes) -> list[Job]:
    """The speed jobs: amp bf16 on CUDA, as a GPU user would train."""
    if device == "cpu":
        return [Job("cpu", "small", s.cpu_steps, 8, 64)]
    return [
        Job("cuda", "small", s.cuda_small_steps, 16, 256, amp="bf16"),
        Job("cuda", "gpt2", s.cuda_gpt2_steps, 8, 1024, amp="bf16"),
    ]


def cuda_skip_reason(device_flag: str) -> str | None:
    """Why CUDA rows cannot run here; None when they can."""
    if device_flag == "cpu":
        return "--device cpu"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def run_all(args: argparse.Namespace, base: Path) -> list[Row]:
    """Every row, in table order; CUDA rows say why they were skipped when they were."""
    s = QUICK if args.quick else Sizes()
    skip = cuda_skip_reason(args.device)
    devices = ["cpu"] if skip else ["cpu", "cuda"]

    def skip_on(device: str) -> str | None:
        return f"needs CUDA: {skip}" if device not in devices else None

    # Determinism: independent processes, so several at once (CPU ones use one thread each).
    jobs = [j for dev in devices for j in determinism_jobs(dev, s.det_steps)]
    progress(f"determinism: {len(jobs)} jobs x 4 processes, {args.jobs} at a time")
    with ThreadPoolExecutor(args.jobs) as pool:
        repeats = list(
            pool.map(lambda j: repeat(j, base / "det" / slug(j.name), args.timeout), jobs)
        )
    by_job = {r.job: r for r in repeats}
    rows: list[Row] = []
    for dev in ("cpu", "cuda"):
        for job in determinism_jobs(dev, s.det_steps):
            if job not in by_job:
                rows.append(Row("determinism", job.name, SKIPPED, skip_on(dev) or ""))
                continue
            plain = dataclasses.replace(job, deterministic=False)
            rows.append(determinism_row(by_job[job], by_job[plain] if job.deterministic else None))

    # Speed: one run at a time, nothing else of ours running.
    for dev in ("cpu", "cuda"):
        for job in throughput_jobs(dev, s):
            if dev in devices:
                progress(f"host reads, tokens/s: {job.name}")
            run_dir = base / "speed" / slug(job.name)
            rows += throughput_rows(job, run_dir, s.warmup, args.timeout, skip_on(dev))

    stall_sizes = {"cpu": (2, 1024, 16), "cuda": (8, 4096, 64)}
    for dev, (layers, width, batch) in stall_sizes.items():
        if dev in devices:
            progress(f"checkpoint stall: {dev}")
        run_dir = base / "stall" / dev
        rows += stall_rows(dev, layers, width, batch, s.repeats, run_dir, skip_on(dev))
    rows.append(release_row(args.release_gib, args.timeout, skip_on("cuda")))
    return rows


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def progress(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def header(args: argparse.Namespace) -> list[str]:
    """What ran where: the machine, the GPU and its software, the jobs' shape."""
    sizes = QUICK if args.quick else Sizes()
    lines = [machine_line()]
    if cuda_skip_reason(args.device) is None:
        lines.append(
            f"GPU: {torch.cuda.get_device_name(0)}; CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}"
        )
    lines.append(
        "jobs: 1 rank each, random corpus, CPU runs with 1 thread; determinism: tiny preset, "
        f"{sizes.det_steps} steps, micro-batch 8 x seq-len 64, dropout 0.1 on CUDA and none on "
        "CPU, SIGTERM as soon as the trainer catches it (it stops after step 1)"
    )
    return lines


def table(rows: Sequence[Row]) -> list[str]:
    """The rows as a Markdown table (a ``|`` inside a cell, from an error message, becomes
    ``/``)."""
    out = ["| check | case | result | detail |", "|---|---|---|---|"]
    for r in rows:
        cells = (c.replace("|", "/") for c in (r.check, r.case, r.result, r.detail))
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every check this machine can and print the table; the exit status (see above)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument(
        "--device", choices=("auto", "cpu"), default="auto", help="cpu: skip the CUDA rows"
    )
    parser.add_argument(
        "--jobs", type=int, default=min(6, os.cpu_count() or 1),
        help="determinism runs at once (default: CPU cores, at most 6)",
    )  # fmt: skip
    parser.add_argument(
        "--release-gib", type=float, default=8.0, help="GiB the killed process holds"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per trainer run")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    head = header(args)  # the machine's load before the checks add to it
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.dir) as tmp:
        rows = run_all(args, Path(tmp))
    print("\n".join([*head, "", *table(rows)]))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} rows, {sum(r.result == SKIPPED for r in rows)} skipped, {len(bad)} "
          f"failed; {time.monotonic() - started:.0f} s")  # fmt: skip
    for r in bad:
        print(f"failed: {r.check}, {r.case}: {r.result}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
