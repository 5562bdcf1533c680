"""A stand-in supervised run made of real processes, for testing the chaos tool's targeting fast.

``python fake_run.py RUN_DIR [--nproc N]``: this process plays the supervisor (holds
``supervisor.lock``, writes ``supervisor.json``) and starts N "workers" that run with
``ROSE_RUN_DIR`` set and beat ``heartbeats/rank-<R>.json`` every 0.05 s with a growing step.
It exits (killing its workers) on SIGTERM, or when every worker is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock

WORKER = """
import json, os, sys, time
rank, hb = int(sys.argv[1]), sys.argv[2]
step = 0
while True:
    step += 1
    tmp = f"{hb}/.rank-{rank}.tmp"
    with open(tmp, "w") as f:
        json.dump({"rank": rank, "pid": os.getpid(), "attempt": 1, "step": step,
                   "phase": "train", "time": time.time()}, f)
    os.replace(tmp, f"{hb}/rank-{rank}.json")
    time.sleep(0.05)
"""


def main() -> int:
    run_dir = Path(sys.argv[1]).absolute()
    nproc = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--nproc" else 2
    hb = run_dir / "heartbeats"
    hb.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(run_dir / "supervisor.lock"))
    lock.acquire(timeout=0)
    env = dict(os.environ, ROSE_RUN_DIR=str(run_dir))
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(hb)], env=env)
        for r in range(nproc)
    ]
    state = {
        "state": "running",
        "supervisor_pid": os.getpid(),
        "attempt": 1,
        "torchrun_pid": None,
        "workers": {str(r): w.pid for r, w in enumerate(workers)},
    }
    tmp = run_dir / ".supervisor.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, run_dir / "supervisor.json")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop and any(w.poll() is None for w in workers):
        time.sleep(0.05)
    for w in workers:
        if w.poll() is None:
            w.kill()
        w.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
