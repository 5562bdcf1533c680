"""The supervisor against hostile and unlucky conditions around it: another writer holding the
checkpoint lock, a worker's exit 77, SIGHUP, a corrupt state file, a dead predecessor named in
it, and an event log that becomes unwritable mid-run. Real launch.py, torchrun and workers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import psutil
import pytest
import torch

from runcontract import exit_codes
from runcontract.heartbeat import read_heartbeat
from tests.scripts.ckpt_tamper import replace_tensors
from tests.scripts.harness import FAST, LAUNCH, WORKER, Launched

pytestmark = pytest.mark.distributed

ATTEMPT_TIMEOUT = 60.0


def _run(run_dir: Path, *args: str) -> Launched:
    return Launched(run_dir, ["--nproc", "2", *FAST, *args])


def test_a_held_checkpoint_writer_lock_stops_the_run_before_any_launch(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".writer.owner").write_text(json.dumps({"pid": 4242, "host": "elsewhere"}))
    lock = filelock.FileLock(str(ckpts / ".writer.lock"), timeout=0, thread_local=False)
    holder = subprocess.Popen(  # another process, as a second training job would be
        [sys.executable, "-c", HOLD_LOCK, str(ckpts / ".writer.lock")], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        run = _run(run_dir, str(WORKER), "finish")
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.CHECKPOINTS_LOCKED, run.stderr[-2000:]
        assert "launch" not in run.types()
        assert "pid 4242 on elsewhere" in run.stderr
        state = json.loads((run_dir / "supervisor.json").read_text())
        assert state["restarts_used"] == 0 and state["exit_code"] == exit_codes.CHECKPOINTS_LOCKED
    finally:
        holder.kill()
        holder.wait()
    lock.acquire()  # released by the holder's death
    lock.release()


HOLD_LOCK = """
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1], timeout=0, thread_local=False)
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_relaunch_waits_for_a_stopped_attempts_lock_to_be_let_go(tmp_path: Path) -> None:
    """The writer lock outlives the failed attempt by 2 s (a killed writer's last threads can
    hold it for a moment after its main thread is reaped): the relaunch waits for it instead of
    calling it another job's (exit 9), and the run goes on. (This worker writes no checkpoint
    into the ``checkpoints/`` the lock lives in, so the finished run says its final state is not
    saved, exit 8: never a success without one.)"""
    run = _run(
        tmp_path / "run",
        *("--max-restarts", "3", str(WORKER), "exit", "--until-attempt", "2"),
        *("--lock-straggler", "2"),
    )
    try:
        code = run.wait(ATTEMPT_TIMEOUT)
        assert code == exit_codes.FINAL_STATE_UNSAVED, run.stderr[-2000:]
        types = run.types()
        assert types.count("launch") == 2 and "fatal" not in types
        assert "attempt 2 running" in run.stderr
        stopped = next(e for e in run.events() if e["type"] == "stopped")
        second = [e for e in run.events() if e["type"] == "launch"][1]
        assert second["time"] - stopped["time"] >= 1.0  # it waited for the straggler
    finally:
        run.kill_all()
        pid_file = run.run_dir / "straggler.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_workers_exit_77_stops_the_run_at_once_and_spends_no_restart(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", "--max-restarts", "5", str(WORKER), "exit", "--code", "77")
    try:
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.CHECKPOINTS_LOCKED, run.stderr[-2000:]
        types = run.types()
        assert types.count("launch") == 1 and "backoff" not in types
        fatal = next(e for e in run.events() if e["type"] == "fatal")
        assert fatal["exit_code"] == 77 and "writer lock" in fatal["reason"]
        state = json.loads((run.run_dir / "supervisor.json").read_text())
        assert (state["restarts_used"], state["restarts_left"]) == (0, 5)
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_sighup_is_handled_like_sigterm(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", str(WORKER), "forever")
    try:
        run.wait_event("workers_started", ATTEMPT_TIMEOUT)
        run.proc.send_signal(signal.SIGHUP)
        # worker.py exits 75 on SIGTERM and keeps no checkpoint store: taken at its word.
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.INTERRUPTED, run.stderr[-2000:]
        interrupted = next(e for e in run.events() if e["type"] == "interrupted")
        assert interrupted["signal"] == "SIGHUP"
        assert (run.run_dir / "report.txt").is_file()
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def test_a_corrupt_state_file_does_not_refill_the_restart_budget(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _run(run_dir, "--max-restarts", "3", str(WORKER), "exit,finish", "--code", "3")
    try:
        assert first.wait(2 * ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, first.stderr[-2000:]
    finally:
        first.kill_all()
    (run_dir / "supervisor.json").write_text('{"restarts_used": ')  # torn
    again = _run(run_dir, "--max-restarts", "3", str(WORKER), "finish")
    try:
        assert again.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, again.stderr[-2000:]
        starts = [e for e in again.events() if e["type"] == "supervisor_started"]
        assert starts[-1]["restarts_carried"] == 1
        assert "1 restart(s) already used, counted from events.jsonl" in again.stderr
    finally:
        again.kill_all()


def test_the_refusal_names_the_live_lock_holder_not_a_dead_predecessor(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "supervisor.json").write_text(json.dumps({"supervisor_pid": dead.pid}))
    owner = _run(run_dir, str(WORKER), "forever")
    try:
        owner.wait_event("workers_started", ATTEMPT_TIMEOUT)
        refused = subprocess.run(
            [sys.executable, str(LAUNCH), "--run-dir", str(run_dir), str(WORKER), "finish"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == exit_codes.RUN_DIR_LOCKED
        assert f"pid {owner.proc.pid}" in refused.stderr
        assert f"pid {dead.pid}" not in refused.stderr
    finally:
        owner.kill_all()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return res.returncode == 0


def test_an_event_log_that_fills_the_disk_stops_the_workers_with_its_own_code(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    if not _tmpfs(run_dir, "4m"):
        pytest.skip("mounting a tmpfs is not permitted here: no real full disk to test with")
    run = None
    try:
        run = _run(run_dir, str(WORKER), "forever")
        started = run.wait_event("workers_started", ATTEMPT_TIMEOUT)
        with open(run_dir / "ballast", "wb") as f:  # fill it: the next event cannot be written
            while True:
                try:
                    f.write(b"\0" * 65536)
                    f.flush()
                except OSError:
                    break
        os.kill(int(started["workers"]["1"]), signal.SIGKILL)  # something to report
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.RUN_DIR_UNWRITABLE, run.stderr[-2000:]
        assert "cannot write" in run.stderr and "the workers were stopped" in run.stderr
        assert "Traceback" not in run.stderr
        assert run.leftovers(timeout=5.0) == []
    finally:
        if run is not None:
            run.kill_all()
        deadline = time.monotonic() + 10
        while subprocess.run(["umount", str(run_dir)]).returncode and time.monotonic() < deadline:
            time.sleep(0.2)


PAUSED_TRAINER = Path(__file__).parent / "chaos" / "paused_trainer.py"
SLOW_SAVE_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", "12",
    "--warmup-steps", "2", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--mem-every", "0", "--no-ckpt-skip-busy", "--ckpt-every", "4", "--ckpt-sync",
]  # fmt: skip


def _stopped_by_itself(run: Launched, pid: int, timeout: float = 240) -> psutil.Process:
    """Worker ``pid`` of ``run`` once it has stopped itself (SIGSTOP) at its test hook."""
    worker = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while worker.status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline and run.proc.poll() is None, run.stderr[-2000:]
        time.sleep(0.1)
    return worker


@pytest.mark.slow
def test_ranks_waiting_for_a_slow_checkpoint_are_not_called_hung(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    # Rank 0's first checkpoint write stalls (the writer stops itself halfway through the model
    # file: a disk that has gone slow); rank 1 waits for it in its next collective. Both are
    # judged by the checkpoint allowance, not by the 5 s hang timeout.
    env = {**train_env, "CHAOS_PAUSE_PLAN": "1:payload-mid"}
    run = Launched(
        tmp_path / "run",
        ["--nproc", "2", *FAST, "--hang-timeout", "5", "--checkpoint-timeout", "120",
         str(PAUSED_TRAINER), *SLOW_SAVE_ARGS],
        env=env,
    )  # fmt: skip
    try:
        started = run.wait_event("workers_started", 240)
        writer = _stopped_by_itself(run, int(started["workers"]["0"]))
        deadline = time.monotonic() + 240
        time.sleep(10.0)  # well past the hang timeout: nothing may be declared hung meanwhile
        assert "hang_detected" not in run.types(), run.stderr[-2000:]
        while run.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):  # it pauses at every save
                if writer.status() == psutil.STATUS_STOPPED:
                    writer.send_signal(signal.SIGCONT)
            time.sleep(0.1)
        assert run.wait(240) == exit_codes.SUCCESS, run.stderr[-2000:]
        assert "hang_detected" not in run.types(), run.stderr[-3000:]
    finally:
        run.kill_all()


FLOODER = Path(__file__).parent / "scripts" / "flooder.py"


def test_a_worker_flooding_its_output_cannot_fill_the_disk_or_the_memory(tmp_path: Path) -> None:
    run = Launched(
        tmp_path / "run", ["--nproc", "1", *FAST, "--log-max-mb", "4", str(FLOODER), "60"]
    )
    try:
        run.wait_event("log_truncated", ATTEMPT_TIMEOUT)
        deadline = time.monotonic() + ATTEMPT_TIMEOUT
        state = None
        while time.monotonic() < deadline and (state is None or state["phase"] != "done"):
            state = read_heartbeat(run.run_dir, 0)
            time.sleep(0.1)
        assert state is not None and state["phase"] == "done", run.stderr[-2000:]
        (log,) = (run.run_dir / "logs" / "attempt-1" / "ranks").glob("*/attempt_*/0/stdout.log")
        # 60 MB written; at most the cap plus what one second between looks lets through stays.
        on_disk = log.stat().st_blocks * 512 + log.with_name("stdout.log.prev").stat().st_size
        assert on_disk < 40 * 1e6, on_disk
        torchrun = psutil.Process(int(run.wait_event("launch", 5)["torchrun_pid"]))
        assert torchrun.memory_info().rss < 600 * 1e6  # it reads none of the output
        run.proc.send_signal(signal.SIGTERM)  # it reported done: a finished run, not a stop
        assert run.wait(ATTEMPT_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-2000:]
        assert run.leftovers(timeout=5.0) == []
    finally:
        run.kill_all()


def _wider_tensor(tensors: dict) -> None:
    name = next(k for k, t in sorted(tensors.items()) if t.dim() == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])


@pytest.mark.slow
def test_an_unloadable_checkpoint_is_set_aside_and_the_run_resumes_from_an_older_one(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    args = ["--nproc", "1", *FAST, "--", *SLOW_SAVE_ARGS[:-1]]  # 12 steps, a checkpoint every 4
    first = Launched(tmp_path / "run", args, env=train_env)
    try:
        assert first.wait(240) == exit_codes.SUCCESS, first.stderr[-2000:]
    finally:
        first.kill_all()
    newest = tmp_path / "run" / "checkpoints" / "step-00000012"
    replace_tensors(newest, "model.safetensors", _wider_tensor)  # resealed: verifies, won't load
    again = Launched(tmp_path / "run", args, env=train_env, tag="-again")
    try:
        assert again.wait(240) == exit_codes.SUCCESS, again.stderr[-2000:]
        events = again.events()
        launches = [e for e in events if e["type"] == "launch"]
        assert [e["resume_step"] for e in launches[-2:]] == [12, 8]
        failed = [e for e in events if e["type"] == "worker_failed"][-1]
        if failed["exit_code"] is None:  # torchrun reaped it first: the stop filled it in
            stopped = [e for e in events if e["type"] == "stopped"][-1]
            failed = stopped["root_cause"]
        assert failed["exit_code"] == 78
        assert events[-1]["type"] == "done" and events[-1]["restarts_used"] == 0
        reason = (newest.parent / "quarantine" / newest.name / "REASON.txt").read_text()
        assert "unloadable" in reason and "shape mismatch" in reason
        assert again.leftovers(timeout=5.0) == []
    finally:
        again.kill_all()


HELD_TRAINER = Path(__file__).parent / "scripts" / "held_trainer.py"


@pytest.mark.slow
def test_failing_checkpoint_writes_reach_the_console_the_state_and_status(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    args = [*SLOW_SAVE_ARGS[:-2], "2"]  # 12 steps, a checkpoint every 2
    run = Launched(
        run_dir,
        ["--nproc", "1", *FAST, str(HELD_TRAINER), *args],
        env={**train_env, "HOLD_AT": "1:5"},
    )
    try:
        started = run.wait_event("workers_started", 240)
        worker = _stopped_by_itself(run, int(started["workers"]["0"]))
        shutil.rmtree(run_dir / "checkpoints")  # where the store must write lies a plain file
        (run_dir / "checkpoints").write_text("not a directory")
        worker.send_signal(signal.SIGCONT)
        assert run.wait(240) == exit_codes.FINAL_STATE_UNSAVED, run.stderr[-2000:]
        assert "checkpoint_write_failed:" in run.stderr and "source=trainer" in run.stderr
        state = json.loads((run_dir / "supervisor.json").read_text())
        assert state["checkpoint_write_failures"] >= 3  # steps 6, 8, 10 and the final 12
        assert state["last_checkpoint_failure"].startswith("step 12: ")
        status = subprocess.run(
            [sys.executable, str(LAUNCH), "status", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "CHECKPOINTS:" in status.stdout and "write(s) failed" in status.stdout
    finally:
        run.kill_all()
