"""A torchrun script that writes no heartbeats, for the process-table hang detector's tests.

    silent_worker.py MODE[,MODE...] [--rank R] [--seconds S] [--done-marker PATH] [--abort]

MODE (one per attempt, from ``ROSE_ATTEMPT``; the last one repeats):

- ``work``: every rank burns CPU for ``--seconds`` seconds, then exits 0;
- ``sleep``: every rank sleeps ``--seconds`` seconds without a word, then exits 0;
- ``talk``: every rank sleeps ``--seconds`` seconds, printing a line every 0.2 s, then exits 0;
- ``save``: every rank burns CPU until stopped; rank 0 rewrites ``--save-to`` every 0.2 s;
- ``stop``: rank R sends itself SIGSTOP; the others burn CPU until stopped;
- ``stuck``: rank R sleeps forever; the others wait for it in a gloo barrier that never ends;
- ``behind``: the other ranks exit 0 at once; rank R sleeps forever, as a rank stuck in its
  teardown after its peers finished does.

``--done-marker PATH``: rank 0 creates PATH once its work is done. ``--abort``: after the work
every rank ends with SIGABRT, as a gloo teardown sometimes does at exit.
"""

import argparse
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("mode")
p.add_argument("--rank", type=int, default=1)
p.add_argument("--seconds", type=float, default=2.0)
p.add_argument("--done-marker", default="")
p.add_argument("--abort", action="store_true")
p.add_argument("--save-to", default="")
args = p.parse_args()

rank = int(os.environ.get("RANK", "0"))
attempt = int(os.environ.get("ROSE_ATTEMPT", "1"))
plan = args.mode.split(",")
mode = plan[min(attempt, len(plan)) - 1]
print(f"rank {rank} attempt {attempt} mode {mode}", flush=True)


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


if mode == "work":
    burn(args.seconds)
elif mode == "sleep":
    time.sleep(args.seconds)
elif mode == "talk":
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        print(f"rank {rank} still here", flush=True)
        time.sleep(0.2)
elif mode == "save":
    while True:
        burn(0.2)
        if rank == 0 and args.save_to:
            with open(args.save_to, "w") as f:
                f.write(f"attempt {attempt}\n")
elif mode == "stop":
    if rank == args.rank:
        os.kill(os.getpid(), signal.SIGSTOP)
    burn(3600)
elif mode == "stuck":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if rank == args.rank:
        while True:
            time.sleep(3600)
    dist.barrier()
elif mode == "behind":
    if rank == args.rank:
        while True:
            time.sleep(3600)
else:
    sys.exit(f"unknown mode {mode!r}")

if args.done_marker and rank == 0:
    with open(args.done_marker, "w") as f:
        f.write("done\n")
if args.abort:
    os.abort()
