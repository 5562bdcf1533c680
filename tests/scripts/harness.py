"""Helpers for tests that run the real supervisor (``launch.py``) as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runcontract.env import run_dir_of
from runcontract.events import read_jsonl
from runcontract.heartbeat import read_heartbeat

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch.py"
WORKER = Path(__file__).resolve().parent / "worker.py"

# Fast settings for tests: quick backoff, short grace, no crash-loop guard unless asked, and no
# report.png at the end (importing matplotlib and drawing cost each run about a second of CPU;
# the tests of the plot draw it).
FAST = ["--backoff-initial", "0.05", "--backoff-max", "0.2", "--stop-grace", "1", "--no-plot"]
FAST_WITH_PLOT = [flag for flag in FAST if flag != "--no-plot"]


class Launched:
    """A supervisor started as ``python launch.py ...``, with its output in files."""

    def __init__(
        self, run_dir: Path, args: list[str], env: dict[str, str] | None = None, tag: str = ""
    ) -> None:
        self.run_dir = run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.out_path = run_dir.parent / f"{run_dir.name}{tag}.out"
        self.err_path = run_dir.parent / f"{run_dir.name}{tag}.err"
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(LAUNCH), "--run-dir", str(run_dir), *args],
                stdout=out,
                stderr=err,
                env=env,
                cwd=ROOT,
            )
        self.seen_pids: set[int] = set()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = read_jsonl(self.run_dir / "events.jsonl")
        self._note_pids(out)
        return out

    def types(self) -> list[str]:
        return [e["type"] for e in self.events()]

    def _note_pids(self, events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            if e.get("torchrun_pid"):
                self.seen_pids.add(int(e["torchrun_pid"]))
            for pid in (e.get("workers") or {}).values():
                self.seen_pids.add(int(pid))

    def wait_event(self, type_: str, timeout: float, count: int = 1) -> dict[str, Any]:
        """The ``count``-th event of ``type_``; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = [e for e in self.events() if e["type"] == type_]
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.poll() is not None:
                matches = [e for e in self.events() if e["type"] == type_]
                if len(matches) >= count:
                    return matches[count - 1]
                raise AssertionError(
                    f"supervisor exited {self.proc.returncode} before event {type_!r}; "
                    f"events: {self.types()}\n{self.stderr[-3000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no event {type_!r} within {timeout} s; events: {self.types()}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"supervisor still running after {timeout} s; events: {self.types()}"
            ) from None

    def kill_all(self) -> None:
        """Test cleanup: SIGKILL the supervisor and every run process seen, by pid."""
        self.events()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pid in self.seen_pids | heartbeat_pids(self.run_dir):
            if belongs_to(pid, self.run_dir):  # never a reused pid of someone else's process
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def leftovers(self, timeout: float = 10.0) -> list[int]:
        """Processes of this run still alive after ``timeout`` seconds."""
        self.events()
        pids = self.seen_pids | heartbeat_pids(self.run_dir)
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in pids if alive(p) and belongs_to(p, self.run_dir)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)


def belongs_to(pid: int, run_dir: Path) -> bool:
    """True when process ``pid`` runs with ``ROSE_RUN_DIR`` set to ``run_dir``."""
    return run_dir_of(pid) == str(run_dir)


def heartbeat_pids(run_dir: Path) -> set[int]:
    pids = set()
    for path in (run_dir / "heartbeats").glob("rank-*.json"):
        try:
            pids.add(int(json.loads(path.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return pids


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_heartbeat(
    run: Launched, rank: int, attempt: int, min_step: int, timeout: float
) -> dict[str, Any]:
    """Wait until ``rank`` of ``attempt`` reports at least ``min_step`` in the train phase."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat = read_heartbeat(run.run_dir, rank)
        if (
            beat is not None
            and beat["attempt"] == attempt
            and beat["step"] >= min_step
            and beat["phase"] == "train"
        ):
            run.seen_pids.add(int(beat["pid"]))
            return beat
        if run.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {run.proc.returncode}: {run.stderr[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"rank {rank} of attempt {attempt} never reached step {min_step}")


def failure_signal(events: list[dict[str, Any]], failed: dict[str, Any]) -> str | None:
    """The signal that ended the process a ``worker_failed`` event names.

    When torchrun reaped the worker before the supervisor looked, the event has no exit status
    yet; the supervisor fills it in once the attempt is stopped, in that "stopped" event's root
    cause, so read it there.
    """
    if failed["signal"] is not None:
        return failed["signal"]
    stopped = next(
        e for e in events if e["type"] == "stopped" and e["attempt"] == failed["attempt"]
    )
    root = stopped["root_cause"]
    assert root is not None and root["pid"] == failed["pid"], stopped
    return root["signal"]
