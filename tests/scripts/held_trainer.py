"""The real trainer, frozen at a chosen point so that a test can act while the run is mid-way.

``HOLD_AT="2:5"`` makes rank 0 of attempt 2 (``ROSE_ATTEMPT``) stop itself with SIGSTOP right
after its first heartbeat for step 5; ``HOLD_AT="1:done"`` right after it reports ``done``. The test
then signals whatever it wants and sends SIGCONT: no race with a fast machine finishing the run
first. Every other rank and attempt runs the trainer untouched.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from trainer import supervised

TRAIN_PY = Path(__file__).resolve().parents[2] / "trainer" / "train.py"

attempt, _, point = os.environ.get("HOLD_AT", "").partition(":")
if attempt == os.environ.get("ROSE_ATTEMPT") and os.environ.get("RANK") == "0":
    beat = supervised.Heartbeat.__call__
    held = []

    def held_beat(self: supervised.Heartbeat, step: int, phase: str = "train") -> bool:
        written = beat(self, step, phase)
        if (phase == "done" and point == "done") or (phase == "train" and str(step) == point):
            if not held:  # once: a snapshot at that step beats "train" again after it
                held.append(step)
                if not written:  # throttled: the test waits to see this very step
                    self._last_time = float("-inf")
                    written = beat(self, step, phase)
                os.kill(os.getpid(), signal.SIGSTOP)
        return written

    supervised.Heartbeat.__call__ = held_beat  # type: ignore[method-assign]
sys.argv[0] = str(TRAIN_PY)
runpy.run_path(str(TRAIN_PY), run_name="__main__")
