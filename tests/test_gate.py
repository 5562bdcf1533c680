"""The standby worker's gate (supervisor/gate.py), run as real processes: it opens with the
supervisor's environment, and a worker whose gate can never open leaves instead of waiting forever
(its gate removed, or its torchrun dead while it was still importing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from supervisor import gate
from supervisor.standby import GATE_SCRIPT

TIMEOUT = 60.0

# The script the gate runs once open: it records the environment it was given.
SCRIPT = """\
import json, os, sys
with open(os.path.join(os.path.dirname(__file__), "ran.json"), "w") as f:
    json.dump({"checkpoint": os.environ.get("ROSE_RESUME_FROM"), "argv": sys.argv[1:]}, f)
"""
# A preload module whose import lasts until the test creates the file named in RELEASE: the
# worker is mid-import for exactly as long as the test needs.
SLOW_IMPORT = """\
import os, time
open(os.environ["RELEASE"] + ".importing", "w").close()
while not os.path.exists(os.environ["RELEASE"]):
    time.sleep(0.01)
"""
# A stand-in torchrun: it starts one gate worker, prints its pid, and exits at once, or once
# the file named in EXIT_WHEN exists.
LAUNCHER = """\
import os, subprocess, sys, time
worker = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(worker.pid, flush=True)
while os.environ.get("EXIT_WHEN") and not os.path.exists(os.environ["EXIT_WHEN"]):
    time.sleep(0.01)
"""


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "script.py").write_text(SCRIPT)
    (tmp_path / "slow_import.py").write_text(SLOW_IMPORT)
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    return tmp_path / "script.py", gate_dir


def _gate_command(gate_dir: Path, script: Path, preload: str) -> list[str]:
    return [
        sys.executable, str(GATE_SCRIPT), "--gate-dir", str(gate_dir), "--preload", preload,
        "--", str(script), "--flag", "1",
    ]  # fmt: skip


def _wait_for(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s"
        time.sleep(0.02)


def _ready(gate_dir: Path) -> dict[str, object]:
    return json.loads((gate_dir / gate.ready_name(0)).read_text())


def test_the_gate_opens_with_the_supervisors_environment(tmp_path: Path) -> None:
    script, gate_dir = _setup(tmp_path)
    worker = subprocess.Popen(_gate_command(gate_dir, script, "json"), env={**os.environ})
    try:
        _wait_for("ready file", (gate_dir / gate.ready_name(0)).exists)
        assert _ready(gate_dir)["pid"] == worker.pid
        assert not (tmp_path / "ran.json").exists()  # still waiting at the gate
        (gate_dir / gate.OPEN).write_text(json.dumps({"env": {"ROSE_RESUME_FROM": "step-7"}}))
        assert worker.wait(TIMEOUT) == 0
        ran = json.loads((tmp_path / "ran.json").read_text())
        assert ran == {"checkpoint": "step-7", "argv": ["--flag", "1"]}
    finally:
        worker.kill()
        worker.wait()


def test_a_worker_leaves_when_its_gate_is_removed(tmp_path: Path) -> None:
    # The supervisor discards a standby by stopping its tree and removing its gate; a worker
    # its stop missed (one torchrun was still forking) must not wait for ever.
    script, gate_dir = _setup(tmp_path)
    worker = subprocess.Popen(_gate_command(gate_dir, script, "json"))
    try:
        _wait_for("ready file", (gate_dir / gate.ready_name(0)).exists)
        assert worker.poll() is None
        for entry in gate_dir.iterdir():
            entry.unlink()
        gate_dir.rmdir()
        assert worker.wait(TIMEOUT) == 1
        assert not (tmp_path / "ran.json").exists()
    finally:
        worker.kill()
        worker.wait()


@pytest.mark.parametrize(
    "recorded", [True, False], ids=["pid-recorded-gone-before-start", "pid-not-recorded"]
)
def test_a_worker_orphaned_while_importing_leaves(tmp_path: Path, recorded: bool) -> None:
    # Its torchrun dies while the worker is still importing: by the time it reaches the gate
    # its parent is whoever adopted it, and the gate will never open. With the pid the
    # supervisor records, it leaves even if its torchrun died before its interpreter started;
    # without it, it falls back on the parent it had when it started.
    script, gate_dir = _setup(tmp_path)
    release = tmp_path / "release"
    exit_when = tmp_path / "launcher-may-exit"
    env = {**os.environ, "RELEASE": str(release), "EXIT_WHEN": "" if recorded else str(exit_when)}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *_gate_command(gate_dir, script, "slow_import")],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    worker: psutil.Process | None = None
    try:
        assert launcher.stdout is not None
        worker = psutil.Process(int(launcher.stdout.readline()))
        if recorded:
            (gate_dir / gate.TORCHRUN_PID).write_text(f"{launcher.pid}\n")
        else:
            _wait_for("worker in its import", Path(f"{release}.importing").exists)
            exit_when.touch()
        assert launcher.wait(TIMEOUT) == 0  # the stand-in torchrun is gone
        assert worker.ppid() != launcher.pid
        release.touch()
        _wait_for("ready file", (gate_dir / gate.ready_name(0)).exists)
        assert _ready(gate_dir)["pid"] == worker.pid
        _wait_for("orphaned worker to exit", lambda: _gone(worker))
        assert not (tmp_path / "ran.json").exists()
        assert gate_dir.is_dir()  # it left because its torchrun is gone, not its gate
    finally:
        if worker is not None and not _gone(worker):
            worker.kill()
        launcher.kill()
        launcher.wait()


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
