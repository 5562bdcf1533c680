"""A worker that arms guard_parent, prints its pid, then sleeps without end."""

import os
import sys
import time

from trainer import supervised

armed = supervised.guard_parent(poll_interval=0.1)
print(f"{os.getpid()} {int(armed)}", flush=True)
while True:
    time.sleep(0.05)
    sys.stdout.flush()
