"""The console of real runs of ``launch.py``: the status line on a pseudo-terminal and in a pipe,
the recovery block after a killed worker, the end-of-run summary, a script without heartbeats,
--tee and --quiet."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from runcontract import exit_codes
from tests.conftest import kill_tree
from tests.scripts.harness import FAST, FAST_WITH_PLOT, LAUNCH, ROOT, WORKER, Launched

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 300
TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(STEPS),
    "--warmup-steps", "5", "--eval-every", "0", "--log-every", "100", "--threads", "1",
    "--ckpt-every", "20", "--no-ckpt-skip-busy",
]  # fmt: skip
TIMEOUT = 300.0
NOISY = Path(__file__).resolve().parent / "scripts" / "noisy.py"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The status line's step, on a terminal or after "progress:" in a plain line.
STEP = re.compile(r"step (\d+)/(\d+) \(\d+%\)")


def _steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in STEP.finditer(text)]


def _env(train_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(train_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def test_on_a_terminal_the_status_line_is_redrawn_with_rising_steps(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    """A real launch.py on a pseudo-terminal 60 columns wide, with NO_COLOR: the status line is
    redrawn in place (carriage return, erase line) with rising steps, cropped to the width, and
    no colour is used."""
    run_dir = tmp_path / "run"
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCH), "--nproc", "2", "--run-dir", str(run_dir), "--no-plot",
         "--", *TRAIN_ARGS],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
        env=_env(train_env, NO_COLOR="1", TERM="xterm"),
    )  # fmt: skip
    os.close(slave)
    raw = b""
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    break
                if not chunk:
                    break
                raw += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == exit_codes.SUCCESS, raw[-3000:]
    finally:
        os.close(master)
        if proc.poll() is None:
            kill_tree(proc)
    text = raw.decode("utf-8", errors="replace")
    # Each redraw of the line: erase it, write it again.
    redraws = [ANSI.sub("", part).strip() for part in text.split("\x1b[2K")]
    progress = [r for r in redraws if r.startswith("step ")]
    steps = [_steps(r)[0] for r in progress if _steps(r)]
    assert len(set(steps)) >= 3, progress
    assert steps == sorted(steps), steps  # one attempt: the step only rises
    assert all(len(line.splitlines()[0]) <= 60 for line in progress), progress
    assert "\x1b[3" not in text and "\x1b[1;3" not in text  # NO_COLOR: no foreground colour
    plain = ANSI.sub("", text)
    assert "run summary: success (exit 0)" in plain
    assert f"{STEPS}/{STEPS} (100%)" in plain


@pytest.fixture(scope="module")
def recovered(tmp_path_factory: pytest.TempPathFactory, train_env: dict[str, str]) -> Launched:
    """A run without a terminal (its console in a file) whose rank 1 is SIGKILLed once a
    checkpoint exists; it recovers and finishes."""
    run_dir = tmp_path_factory.mktemp("console") / "run"
    run = Launched(
        run_dir,
        ["--nproc", "2", *FAST_WITH_PLOT, "--max-restarts", "5", "--progress-every", "0.3",
         "--", *TRAIN_ARGS],
        env=train_env,
    )  # fmt: skip
    try:
        run.wait_event("checkpoint_saved", TIMEOUT)
        # The state file names the workers from their announcement (before any checkpoint).
        workers = json.loads((run_dir / "supervisor.json").read_text())["workers"]
        victim = int(workers["1"])
        run.seen_pids.add(victim)
        os.kill(victim, signal.SIGKILL)
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        assert run.leftovers(timeout=10.0) == []
        yield run
    finally:
        run.kill_all()


def test_without_a_terminal_plain_progress_lines_show_rising_steps(recovered: Launched) -> None:
    err = recovered.stderr
    assert "\x1b" not in err  # no cursor movement, no colour in a log
    lines = [ln for ln in err.splitlines() if " progress: " in ln]
    steps = [_steps(ln)[0] for ln in lines if _steps(ln)]
    assert len(set(steps)) >= 3, lines
    for attempt in (1, 2):  # within an attempt the step only rises
        seen = [_steps(ln)[0] for ln in lines if _steps(ln) and f"attempt {attempt}" in ln]
        assert seen == sorted(seen), seen
    assert all(f"/{STEPS} " in ln for ln in lines if _steps(ln))
    assert any("ckpt " in ln and "restarts left" in ln and "tok/s" in ln for ln in lines)


def test_a_killed_worker_shows_a_failure_and_recovery_block(recovered: Launched) -> None:
    err = recovered.stderr
    events = recovered.events()
    failed = next(e for e in events if e["type"] == "worker_failed")
    resumed = next(e for e in events if e["type"] == "checkpoint_selected" and e["attempt"] == 2)
    head = re.search(
        r"FAILURE in attempt 1 at step \d+: rank 1 \(pid (\d+)\) (killed by SIGKILL|exited)", err
    )
    assert head is not None, err[-3000:]
    assert int(head.group(1)) == failed["pid"]
    block = err[head.start() :]
    assert f"attempt 2 resumes from checkpoint step {resumed['step']} ({resumed['path']})" in block
    recovered_at = r"RECOVERED: attempt 2 trains again \(step (\d+)\), ([\d.]+) s after"
    recovery = re.search(recovered_at, block)
    assert recovery is not None, block[:3000]
    first = next(e for e in events if e["type"] == "first_step" and e["attempt"] == 2)
    # The first step seen after the resume: on a fast machine a few may pass between looks.
    assert int(recovery.group(1)) == first["step"] > resumed["step"]
    assert float(recovery.group(2)) == pytest.approx(first["mono"] - failed["mono"], abs=0.06)


def test_the_run_ends_with_a_summary(recovered: Launched) -> None:
    err = recovered.stderr
    summary = err[err.index("run summary:") :]
    assert "run summary: success (exit 0)" in summary
    assert f"steps:       0 -> {STEPS}" in summary
    failure = r"failure:     attempt 1, rank 1: worker killed by SIGKILL .*recovered in"
    assert re.search(failure, err)
    final = recovered.run_dir / "checkpoints" / f"step-{STEPS:08d}"
    sha = json.loads((final / "manifest.json").read_text())["params_sha256"]
    assert f"params_sha256={sha}" in summary
    png = recovered.run_dir / "report.png"
    assert png.is_file() and f"{png}" in summary
    assert summary.rstrip().splitlines()[-1].startswith("launch.py: success (exit 0)")


def _noisy(run_dir: Path, env: dict[str, str], *flags: str) -> Launched:
    return Launched(
        run_dir, ["--nproc", "2", *FAST, "--progress-every", "0.2", *flags, str(NOISY)], env=env
    )


def _release_when(run: Launched, pattern: str) -> None:
    """Wait until the console shows ``pattern``, then let the script finish."""
    deadline = time.monotonic() + TIMEOUT
    while pattern not in run.stderr:
        assert run.proc.poll() is None, run.stderr[-3000:]
        assert time.monotonic() < deadline, f"no {pattern!r} in: {run.stderr[-3000:]}"
        time.sleep(0.05)
    (run.run_dir / "release").touch()


def test_a_script_without_heartbeats_shows_what_is_known_and_rank_0s_output(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run = _noisy(tmp_path / "run", train_env)
    try:
        _release_when(run, "[rank0]: ready")
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        err = run.stderr
        lines = [ln for ln in err.splitlines() if " progress: " in ln]
        assert lines and all("step" not in ln for ln in lines), lines
        assert any("attempt 1" in ln and "elapsed" in ln for ln in lines)
        assert "[rank0]: hello from rank 0" in err and "[rank0]: a warning on stderr" in err
        assert "[rank1]:" not in err  # the default streams rank 0 only
        assert "x" * 100 in err  # a long line without a newline, passed on whole
    finally:
        run.kill_all()


def test_quiet_shows_no_progress_and_no_worker_output(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run = _noisy(tmp_path / "run", train_env, "--quiet", "--tee", "all")
    try:
        run.wait_event("workers_started", TIMEOUT)
        (run.run_dir / "release").touch()
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        assert run.stderr.strip().splitlines() == [
            f"launch.py: success (exit 0); run dir {run.run_dir}"
        ]
    finally:
        run.kill_all()


def test_status_watch_follows_a_run_until_it_ends(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    """``status --watch`` started while a run goes on refreshes until the run ends, then exits
    0; without a terminal it prints a block each time the state changes."""
    run = Launched(
        tmp_path / "run",
        ["--nproc", "2", *FAST, str(WORKER), "exit", "--rank", "1", "--steps", "20",
         "--step-time", "0.05", "--until-attempt", "2"],
        env=train_env,
    )  # fmt: skip
    try:
        run.wait_event("launch", TIMEOUT)
        watcher = subprocess.run(
            [sys.executable, str(LAUNCH), "status", str(run.run_dir), "--watch",
             "--interval", "0.1"],
            capture_output=True, text=True, cwd=ROOT, env=_env(train_env), timeout=TIMEOUT,
        )  # fmt: skip
        assert watcher.returncode == 0, watcher.stderr
        assert run.wait(TIMEOUT) == exit_codes.SUCCESS
        states = re.findall(r"^state:\s+(\S+)", watcher.stdout, re.M)
        assert states[-1] == "succeeded" and len(states) >= 2, watcher.stdout
        assert "\x1b" not in watcher.stdout
    finally:
        run.kill_all()
