"""What the benchmarks share: the job, starting and cleaning up real runs, the machine line.

Every benchmark runs real processes (the supervisor, torchrun, the trainer) on this machine and
kills only processes it started, by pid.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python bench/x.py`: the project is importable
    sys.path.insert(0, str(REPO_ROOT))

from runcontract.env import run_dir_of, unsupervised  # noqa: E402
from runcontract.events import read_jsonl as read_jsonl  # noqa: E402 - re-exported
from runcontract.heartbeat import read_heartbeat  # noqa: E402

LAUNCH_PY = REPO_ROOT / "launch.py"
TRAIN_PY = REPO_ROOT / "trainer" / "train.py"


def job_args(
    model: str = "tiny",
    steps: int = 30,
    ckpt_every: int | str = 5,
    micro_batch: int = 4,
    seq_len: int = 32,
) -> list[str]:
    """The trainer flags of a benchmark job: eval and console lines off, async checkpoints on."""
    return [
        "--model", model, "--steps", str(steps), "--micro-batch", str(micro_batch),
        "--seq-len", str(seq_len), "--warmup-steps", "5", "--eval-every", "0",
        "--log-every", "0", "--ckpt-every", str(ckpt_every),
    ]  # fmt: skip


def clean_env() -> dict[str, str]:
    """This environment without supervisor variables (a worker would think it is supervised)."""
    env = unsupervised(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    return env


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_supervised(
    run_dir: Path, train_args: Sequence[str], flags: Sequence[str] = (), nproc: int = 2
) -> subprocess.Popen:
    """Start ``launch.py`` on ``run_dir`` (output to ``run_dir``.out/.err beside it)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(run_dir.parent / f"{run_dir.name}.out", "ab") as out,
        open(run_dir.parent / f"{run_dir.name}.err", "ab") as err,
    ):
        return subprocess.Popen(
            [
                sys.executable,
                str(LAUNCH_PY),
                "--run-dir",
                str(run_dir),
                "--nproc",
                str(nproc),
                *flags,
                "--",
                *train_args,
            ],  # fmt: skip
            cwd=REPO_ROOT,
            env=clean_env(),
            stdout=out,
            stderr=err,
        )


def start_torchrun(
    run_dir: Path, train_args: Sequence[str], torchrun_flags: Sequence[str] = (), nproc: int = 2
) -> subprocess.Popen:
    """Start bare ``torchrun --standalone`` running the trainer on ``run_dir``, unsupervised
    (stdout and stderr together in ``run_dir``.log beside it)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(nproc),
                *torchrun_flags,
                str(TRAIN_PY),
                *train_args,
                "--run-dir",
                str(run_dir),
            ],  # fmt: skip
            cwd=REPO_ROOT,
            env=clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_heartbeat(
    run_dir: Path, proc: subprocess.Popen, rank: int, attempt: int, min_step: int, timeout: float
) -> dict[str, Any] | None:
    """The heartbeat of ``rank`` once ``attempt`` reached ``min_step`` while training; None when
    the supervisor exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        beat = read_heartbeat(run_dir, rank)
        if (
            beat is not None
            and beat.get("attempt") == attempt
            and beat.get("phase") == "train"
            and int(beat.get("step", 0)) >= min_step
        ):
            return beat
        time.sleep(0.01)
    return None


def belongs_to(pid: int, run_dir: Path) -> bool:
    """True when ``pid`` is a process of this run (``ROSE_RUN_DIR`` or the run dir in its
    command line); a reused pid of another process is never touched."""
    try:
        if str(run_dir) in " ".join(psutil.Process(pid).cmdline()):
            return True
    except (psutil.Error, OSError):
        return False
    return run_dir_of(pid) == str(run_dir)


def stop_run(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL ``proc``, its descendants and any process of ``run_dir`` it left, then reap."""
    family: list[psutil.Process] = []
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        pass
    pids = {p.pid for p in family}
    for beat_file in (run_dir / "heartbeats").glob("rank-*.json"):
        try:
            pids.add(int(json.loads(beat_file.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    for pid in pids:
        if pid == proc.pid or belongs_to(pid, run_dir) or pid in {p.pid for p in family}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    psutil.wait_procs([p for p in family if p.pid != proc.pid], timeout=5)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None when ``proc`` still runs after ``timeout`` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def tokens_per_s(run_dir: Path, warmup: int, first_step: int = 0) -> float | None:
    """Median tokens/s of a run's metrics.jsonl over the steps after ``first_step + warmup``
    (``first_step``: the step a resumed attempt started from); None when there are none."""
    records = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "tokens_per_s" in m]
    steady = [m["tokens_per_s"] for m in records if m["step"] > first_step + warmup]
    return statistics.median(steady) if steady else None


def median(values: Iterable[float | None]) -> float | None:
    """Median of the known values (None when there is none)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def quantile(values: Iterable[float | None], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of the known values."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    return known[min(len(known) - 1, max(0, round(q * (len(known) - 1))))]


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """A table cell: ``-`` for unknown."""
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def machine_line() -> str:
    """One line describing this machine and software, for every benchmark's output."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = os.getloadavg()
    return (
        f"machine: {cpu}, {os.cpu_count()} CPU cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the start"
    )
