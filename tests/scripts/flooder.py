"""A supervised worker that floods its stdout: ``flooder.py MB`` writes MB megabytes without a
single newline (the worst case for anything that reads output line by line), reports a
heartbeat per megabyte, reports ``done`` and idles until SIGTERM."""

import os
import signal
import sys
import time

from trainer import supervised

rank = int(os.environ.get("RANK", "0"))
signal.signal(signal.SIGTERM, lambda *_: os._exit(75))
supervised.guard_parent()
beat = supervised.Heartbeat(rank, min_interval=0.0)
beat(0, phase="startup")
chunk = b"x" * (1 << 20)
for mb in range(int(sys.argv[1])):
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    beat(mb + 1)
beat(int(sys.argv[1]), phase="done")
print(f"\nflooded {sys.argv[1]} MB", flush=True)
while True:
    time.sleep(0.1)
