"""A tiny supervised worker for the supervisor's tests: beats heartbeats, then misbehaves.

    worker.py MODE[,MODE...] [--rank R] [--steps N] [--code C] [--signal NAME] [--until-attempt K]

Every rank beats one step every ``--step-time`` seconds. After ``--steps`` steps rank R does
MODE (the others keep beating until stopped):

- ``finish``: no fault; every rank exits 0 after the steps.
- ``exit``: rank R exits with ``--code``.
- ``signal``: rank R kills itself with ``--signal`` (e.g. SIGKILL, SIGSEGV).
- ``hang-sleep``: rank R stops beating and sleeps (a stuck loop).
- ``hang-stop``: rank R sends itself SIGSTOP (a frozen process).
- ``forever``: no fault and no end.

A comma-separated list gives one MODE per attempt (``ROSE_ATTEMPT``; the last one repeats).
From attempt ``--until-attempt`` on (``ROSE_ATTEMPT``), MODE becomes ``finish``: a run that
recovers. ``--ignore-sigterm`` makes every rank ignore SIGTERM; otherwise SIGTERM makes a rank
exit with ``--term-code`` (75, like the trainer's emergency checkpoint exit). With
``--peers-exit C`` the other ranks exit with C a few milliseconds after rank R's fault, as peers
do when a collective breaks under them. ``--abort-at-exit R``: rank R ends with SIGABRT after
reporting ``done``. ``--lock-straggler S``: before its fault rank R starts a process outside the
attempt (its own session, which a stop does not walk) that holds the run's checkpoint writer
lock for S seconds, as a killed writer's last threads can for a moment; its pid goes to
``straggler.pid`` in the run directory.
"""

import argparse
import os
import signal
import sys
import time

from trainer import supervised

p = argparse.ArgumentParser()
MODES = ("finish", "exit", "signal", "hang-sleep", "hang-stop", "forever")
p.add_argument("mode", help="one of " + ", ".join(MODES) + ", or a comma-separated list")
p.add_argument("--rank", type=int, default=0)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--step-time", type=float, default=0.05)
p.add_argument("--code", type=int, default=1)
p.add_argument("--signal", default="SIGKILL")
p.add_argument("--until-attempt", type=int, default=0)
p.add_argument("--ignore-sigterm", action="store_true")
p.add_argument("--term-code", type=int, default=75)
p.add_argument("--no-guard", action="store_true", help="do not watch the supervisor")
p.add_argument("--peers-exit", type=int, default=None)
p.add_argument("--abort-at-exit", type=int, default=None, help="rank that aborts after done")
p.add_argument("--lock-straggler", type=float, default=None, help="seconds the lock outlives R")
args = p.parse_args()

rank = int(os.environ.get("RANK", "0"))
attempt = int(os.environ.get("ROSE_ATTEMPT", "1"))
plan = args.mode.split(",")
if any(m not in MODES for m in plan):
    p.error(f"unknown mode in {args.mode!r}")
mode = plan[min(attempt, len(plan)) - 1]
if args.until_attempt and attempt >= args.until_attempt:
    mode = "finish"

if args.ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(args.term_code))
if not args.no_guard:
    supervised.guard_parent()

beat = supervised.Heartbeat(rank, min_interval=0.0)
beat(0, phase="startup")
print(f"rank {rank} pid {os.getpid()} attempt {attempt} mode {mode}", flush=True)
step = 0
while step < args.steps:
    time.sleep(args.step_time)
    step += 1
    beat(step)

if mode == "finish":
    beat(step, phase="done")
    if rank == args.abort_at_exit:  # as a gloo teardown sometimes does after the work is done
        os.abort()
    sys.exit(0)
fault_marker = os.path.join(os.environ.get("ROSE_RUN_DIR", "."), f"fault-{attempt}")
STRAGGLER = """
import os, sys, time, filelock
lock = filelock.FileLock(sys.argv[1], timeout=0, thread_local=False, preserve_lock_file=True)
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def start_lock_straggler(seconds: float) -> None:
    import subprocess

    run_dir = os.environ.get("ROSE_RUN_DIR", ".")
    lock = os.path.join(run_dir, "checkpoints", ".writer.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", STRAGGLER, lock, str(seconds)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    with open(os.path.join(run_dir, "straggler.pid"), "w") as f:
        f.write(str(proc.pid))
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"


if rank == args.rank and mode != "forever":
    print(f"rank {rank}: {mode} at step {step}", file=sys.stderr, flush=True)
    if args.lock_straggler is not None:
        start_lock_straggler(args.lock_straggler)
    open(fault_marker, "w").close()
    if mode == "exit":
        sys.exit(args.code)
    if mode == "signal":
        os.kill(os.getpid(), signal.Signals[args.signal])
    if mode == "hang-stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:  # hang-sleep, or after SIGCONT
        time.sleep(0.1)
while True:
    time.sleep(args.step_time)
    step += 1
    beat(step)
    if args.peers_exit is not None and os.path.exists(fault_marker):
        time.sleep(0.005)  # the faulty rank goes first
        sys.exit(args.peers_exit)
