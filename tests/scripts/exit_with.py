"""A worker that beats a few steps, then exits with the code in ``sys.argv[1]`` (rank ``--rank``
only; the other ranks wait to be stopped, or exit 0 with ``--others-exit``)."""

import argparse
import os
import sys
import time

from trainer import supervised

p = argparse.ArgumentParser()
p.add_argument("code", type=int)
p.add_argument("--rank", type=int, default=0, help="the rank that exits with CODE")
p.add_argument("--steps", type=int, default=3, help="steps to beat before exiting")
p.add_argument("--others-exit", action="store_true", help="other ranks exit 0 at once")
args = p.parse_args()

rank = int(os.environ.get("RANK", "0"))
supervised.guard_parent()
beat = supervised.Heartbeat(rank, min_interval=0.0)
beat(0, phase="startup")
print(f"rank {rank} pid {os.getpid()} attempt {os.environ.get('ROSE_ATTEMPT')}", flush=True)
for step in range(1, args.steps + 1):
    time.sleep(0.05)
    beat(step)
if rank == args.rank:
    print(f"rank {rank} exiting with {args.code}", file=sys.stderr, flush=True)
    sys.exit(args.code)
if args.others_exit:
    beat(args.steps, phase="done")
    sys.exit(0)
while True:
    time.sleep(0.05)
