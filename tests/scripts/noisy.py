"""A script without heartbeats that talks: each rank prints to stdout and stderr, rank 0 says
``ready``, then every rank waits for ``RUN_DIR/release`` and ends with a long line that has no
newline."""

import os
import sys
import time
from pathlib import Path

from trainer import supervised

supervised.guard_parent()
rank = int(os.environ.get("RANK", "0"))
print(f"hello from rank {rank}", flush=True)
print("a warning on stderr", file=sys.stderr, flush=True)
if rank == 0:
    print("ready", flush=True)
release = Path(os.environ["ROSE_RUN_DIR"]) / "release"
while not release.exists():
    time.sleep(0.05)
sys.stdout.write("x" * 100)
sys.stdout.flush()
