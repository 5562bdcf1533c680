"""Whole-system fault tests: the real supervisor (``launch.py``) runs the real trainer on 2 CPU
ranks (one test: 3 and 4), the chaos tool (``python -m tools.chaos``) injects faults from
outside, and each test checks what a user would: the exit code, the final step, the final
parameters against an uninterrupted reference run, no process left, the story in events.jsonl,
and no checkpoint lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from runcontract.env import run_dir_of
from tests.scripts.harness import failure_signal, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH = REPO_ROOT / "launch.py"
TRAIN_PY = REPO_ROOT / "trainer" / "train.py"
HERE = Path(__file__).resolve().parent

STEPS = 24
CKPT_EVERY = 4

# Tiny and short: each attempt costs mostly start-up, so the runs are few steps long. Retention
# keeps everything, so "no committed checkpoint lost" can be checked exactly. The memory tier is
# off, so that each disk fault is judged by the choice it forces on disk; the tests that turn it
# on add MEMORY_ARGS (a later flag wins). No periodic save is skipped behind a slow one: the
# tests name the steps that must be on disk.
TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(STEPS),
    "--warmup-steps", "5", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--ckpt-every", str(CKPT_EVERY), "--keep-last", "100", "--mem-every", "0",
    "--no-ckpt-skip-busy",
]  # fmt: skip
MEMORY_ARGS = ["--mem-every", "1"]

# Fast recovery for tests; the crash-loop guard is off (several tests fail attempts on purpose
# before the first checkpoint exists) unless a test asks for it; no report.png (tests/test_report.py
# draws it).
SUPERVISOR_ARGS = [
    "--nproc", "2", "--max-restarts", "8", "--crash-loop", "0", "--backoff-initial", "0.05",
    "--backoff-max", "0.2", "--stop-grace", "1", "--require-heartbeats", "yes", "--no-plot",
]  # fmt: skip


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Live processes of this run: ``ROSE_RUN_DIR`` is the run dir, or the run dir is on the
    command line (the supervisor, the chaos tool). The test process itself is left out."""
    needle = str(run_dir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            cmdline = proc.info["cmdline"] or []
            if any(needle in part for part in cmdline) or run_dir_of(proc.pid) == needle:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def wait_no_processes(run_dir: Path, timeout: float = 20.0) -> list[psutil.Process]:
    """Processes of the run still alive after ``timeout`` seconds (empty: none left)."""
    deadline = time.monotonic() + timeout
    while True:
        left = run_processes(run_dir)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def kill_run(run_dir: Path) -> None:
    """Test cleanup: SIGKILL every process of the run, by pid, and wait for them."""
    procs = run_processes(run_dir)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGCONT)  # a SIGSTOPped one dies as well, but say so
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@dataclass
class Supervised:
    """One ``launch.py`` process on a run directory, output in files beside it."""

    run_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def wait(self, timeout: float = 400.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"supervisor still running after {timeout} s; events: {self.types()}"
            ) from None

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "events.jsonl")

    def types(self) -> list[str]:
        return [e["type"] for e in self.events()]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_event(self, type_: str, timeout: float = 400.0) -> dict[str, Any]:
        """The first event of ``type_``; fails the test when the supervisor exits first or
        ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e["type"] == type_]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"supervisor exited before {type_}: {self.types()}"
            assert time.monotonic() < deadline, f"no {type_} within {timeout} s: {self.types()}"
            time.sleep(0.05)


class Harness:
    """Starts supervisors and chaos tools for one test and cleans up after it."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.run_dir = base / "run"
        self.supervisors: list[Supervised] = []
        self.tools: list[subprocess.Popen[bytes]] = []
        self.tool_logs: dict[int, Path] = {}

    def launch(
        self,
        extra: list[str] = (),  # type: ignore[assignment]
        script: Path = TRAIN_PY,
        script_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Supervised:
        """Start ``launch.py`` on this test's run directory."""
        n = len(self.supervisors) + 1
        log = self.base / f"supervisor-{n}.log"
        cmd = [
            sys.executable, str(LAUNCH), "--run-dir", str(self.run_dir), *SUPERVISOR_ARGS,
            *extra, str(script), *(TRAIN_ARGS if script_args is None else script_args),
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env or self.env, stdout=out, stderr=subprocess.STDOUT
            )
        sup = Supervised(self.run_dir, proc, log)
        self.supervisors.append(sup)
        return sup

    def chaos(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``python -m tools.chaos RUN_DIR ARGS`` (output in chaos-N.log)."""
        log = self.base / f"chaos-{len(self.tools) + 1}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tools.chaos", str(self.run_dir), *args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.tools.append(proc)
        self.tool_logs[proc.pid] = log
        return proc

    def wait_tool(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"chaos tool still running after {timeout} s") from None
        if rc != 0:  # shown with the failure: what the tool saw and did
            print(self.tool_logs[proc.pid].read_text(errors="replace")[-4000:])
            for sup in self.supervisors:
                print(sup.output()[-4000:])
        return rc

    def cleanup(self) -> None:
        for proc in self.tools:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for sup in self.supervisors:
            if sup.proc.poll() is None:
                sup.proc.kill()
            sup.proc.wait()
        kill_run(self.run_dir)


def harness_env(train_env: dict[str, str]) -> dict[str, str]:
    """The trainer's environment, with this repository importable (for the chaos tool)."""
    env = dict(train_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture
def harness(tmp_path: Path, train_env: dict[str, str]) -> Iterator[Harness]:
    """A run directory, and every process started for it killed and reaped at the end."""
    h = Harness(tmp_path, harness_env(train_env))
    try:
        yield h
    finally:
        h.cleanup()


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run every faulted run must match."""

    sha: str
    steps: list[int]
    """Committed checkpoint steps of the reference run."""


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, train_env: dict[str, str]) -> Reference:
    """The same configuration, supervised, without faults: run once per test session."""
    return run_reference(tmp_path_factory.mktemp("chaos-reference"), train_env)


def run_reference(
    base: Path,
    train_env: dict[str, str],
    extra: list[str] = (),  # type: ignore[assignment]
    script_args: list[str] | None = None,
) -> Reference:
    """An uninterrupted supervised run in ``base``: ``launch.py`` with ``extra`` flags (after
    the defaults, so they win) and the trainer with ``script_args`` (default TRAIN_ARGS)."""
    base.mkdir(parents=True, exist_ok=True)
    h = Harness(base, harness_env(train_env))
    try:
        sup = h.launch(extra, script_args=script_args)
        rc = sup.wait()
        assert rc == 0, f"reference run failed ({rc}):\n{sup.output()[-3000:]}"
        sha = final_sha(h.run_dir)
        steps = committed_steps(h.run_dir)
    finally:
        h.cleanup()
    assert steps == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)), steps
    return Reference(sha, steps)


# -- what a finished run left ------------------------------------------------------------------


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of ``checkpoints/step-*`` directories, ascending."""
    out = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        out.append(int(path.name.split("-", 1)[1]))
    return sorted(out)


def last_attempt(run_dir: Path) -> int:
    return max(int(p.name.split("-", 1)[1]) for p in (run_dir / "logs").glob("attempt-*"))


def _rank0_logs(run_dir: Path, attempt: int, name: str) -> list[Path]:
    ranks = run_dir / "logs" / f"attempt-{attempt}" / "ranks"
    return sorted(ranks.glob(f"*/attempt_*/0/{name}"))


def rank0_stdout(run_dir: Path, attempt: int) -> str:
    paths = _rank0_logs(run_dir, attempt, "stdout.log")
    assert paths, f"no rank 0 output for attempt {attempt} in {run_dir / 'logs'}"
    return paths[-1].read_text(errors="replace")


def rank0_stderr(run_dir: Path, attempt: int) -> str:
    paths = _rank0_logs(run_dir, attempt, "stderr.log")
    return "".join(p.read_text(errors="replace") for p in paths)


def final_sha(run_dir: Path) -> str:
    """params_sha256 from the trainer's last line in the last attempt."""
    attempt = last_attempt(run_dir)
    out = rank0_stdout(run_dir, attempt)
    lines = [ln for ln in out.splitlines() if "params_sha256=" in ln]
    assert lines, f"attempt {attempt} printed no final params_sha256:\n{out[-2000:]}"
    return lines[-1].rsplit("params_sha256=", 1)[1].strip()


def manifest(run_dir: Path, step: int) -> dict[str, Any]:
    from trainer.checkpoint import verify

    return verify(run_dir / "checkpoints" / f"step-{step:08d}")


def faults(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "fault_injected"]


def attempt_events(events: list[dict[str, Any]], attempt: int) -> list[dict[str, Any]]:
    return [e for e in events if e.get("attempt") == attempt and e.get("source") != "chaos"]


def relaunch_choice(events: list[dict[str, Any]]) -> int:
    """The step of the checkpoint the newest supervisor of the run chose for its first attempt."""
    starts = [i for i, e in enumerate(events) if e["type"] == "supervisor_started"]
    assert len(starts) >= 2, "the run was not relaunched"
    chosen = [e for e in events[starts[-1] :] if e["type"] == "checkpoint_selected"]
    assert chosen, "the relaunched supervisor chose no checkpoint"
    return int(chosen[0]["step"])


def selected(events: list[dict[str, Any]], attempt: int) -> int:
    """The step of the checkpoint the supervisor chose for ``attempt`` (0: fresh start)."""
    chosen = [e for e in events if e["type"] == "checkpoint_selected" and e["attempt"] == attempt]
    assert len(chosen) == 1, f"attempt {attempt}: {chosen}"
    return int(chosen[0]["step"])


def assert_recovered(
    run_dir: Path,
    rc: int,
    reference: Reference,
    *,
    quarantined: set[int] = frozenset(),  # type: ignore[assignment]
    extra_steps: set[int] = frozenset(),  # type: ignore[assignment]
    missing_steps: set[int] = frozenset(),  # type: ignore[assignment]
    events: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Checks (a)–(d) and (f) of a run that recovered from every fault; returns the events.

    (a) exit 0; (b) the last step reached, every step in metrics.jsonl exactly once; (c) the
    final parameters equal the reference run's; (d) no process of the run left; (f) every
    checkpoint step a complete run commits is there and verifies, plus ``extra_steps``
    (emergency checkpoints), less ``missing_steps`` (never written to disk: resumed from a
    memory snapshot of that step, or lost in flight to a kill that resumed past it from memory),
    and the quarantine holds exactly ``quarantined``.
    """
    events = events if events is not None else read_jsonl(run_dir / "events.jsonl")
    types = [e["type"] for e in events]
    assert rc == 0, f"supervisor exited {rc}; events: {types}"
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 1 and done[0]["step"] == STEPS, done
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"metrics steps: {steps}"
    assert final_sha(run_dir) == reference.sha
    assert manifest(run_dir, STEPS)["params_sha256"] == reference.sha
    left = wait_no_processes(run_dir)
    assert not left, f"processes of the run left: {[(p.pid, p.name()) for p in left]}"
    expected = (set(reference.steps) | set(extra_steps)) - set(missing_steps)
    assert set(committed_steps(run_dir)) == expected
    for step in expected:
        manifest(run_dir, step)  # raises CheckpointInvalid when it does not verify
    for fault in faults(events):
        lost = set(fault.get("committed", [])) - expected
        assert not lost, f"checkpoints committed before {fault['kind']} are gone: {lost}"
    qdir = run_dir / "checkpoints" / "quarantine"
    in_quarantine = {int(p.name.split("-")[1]) for p in qdir.glob("step-*")}
    assert in_quarantine == set(quarantined)
    leftovers = [p.name for p in (run_dir / "checkpoints").glob(".tmp-*")]
    assert not leftovers, f"temp directories left: {leftovers}"
    return events


def assert_detected(events: list[dict[str, Any]], fault: dict[str, Any]) -> dict[str, Any]:
    """(e): the supervisor saw ``fault`` in the attempt it hit; returns the detection event."""
    attempt = fault["attempt"]
    seen = [
        e
        for e in attempt_events(events, attempt)
        if e["type"] in ("worker_failed", "hang_detected") and e["time"] >= fault["time"]
    ]
    assert seen, f"no detection of {fault['kind']} in attempt {attempt}"
    detection = seen[0]
    kind = fault["kind"]
    if kind in ("kill-worker", "kill-writer", "corrupt", "hostile-file"):
        assert detection["type"] == "worker_failed" and detection["pid"] == fault["pid"], detection
        assert failure_signal(events, detection) == "SIGKILL", detection
    elif kind == "kill-torchrun":
        # Its workers die with it (parent-death signal); the supervisor may see torchrun's exit
        # or one of theirs first. Either names a process of the lost node, killed.
        assert detection["type"] == "worker_failed"
        if detection["source"] == "torchrun":
            assert detection["pid"] == fault["pid"], detection
        else:
            assert detection["pid"] in fault["workers"].values(), detection
    elif kind == "hang":
        assert detection["type"] == "hang_detected", detection
    return detection


def assert_resumed_well(events: list[dict[str, Any]], fault: dict[str, Any]) -> int:
    """(e), (f): the next attempt resumed from the newest checkpoint committed before the fault
    (or a newer one that an in-flight write committed).
    Returns the chosen step."""
    chosen = selected(events, fault["attempt"] + 1)
    committed = list(fault.get("committed") or [0])
    if fault["kind"] in ("corrupt", "hostile-file"):
        committed.remove(int(Path(fault["path"]).name.split("-")[1]))
    floor = max(committed, default=0)
    # No upper bound from the fault's "step": heartbeats are throttled (0.2 s), so the step the
    # tool saw may lag the step the workers had reached and checkpointed.
    assert floor <= chosen, (fault, chosen)
    assert chosen % CKPT_EVERY == 0, chosen
    return chosen
