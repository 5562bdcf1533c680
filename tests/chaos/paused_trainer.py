"""The real trainer, with the checkpoint store's pause hook armed per attempt (test only).

``CHAOS_PAUSE_PLAN="1:payload-mid,2:manifest-mid"`` makes rank 0 of attempt 1 stop itself
(SIGSTOP) halfway through its first checkpoint's model file, rank 0 of attempt 2 halfway through
the manifest, and so on (``ROSE_CKPT_PAUSE_AT``, trainer/checkpoint/fsio.py). The chaos tool then
finds a frozen writer beside its ``.tmp-`` directory and kills it at exactly that phase. Attempts
not in the plan run the trainer untouched.
"""

import os
import runpy
import sys
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[2] / "trainer" / "train.py"

plan = dict(
    item.split(":", 1) for item in os.environ.get("CHAOS_PAUSE_PLAN", "").split(",") if item
)
phase = plan.get(os.environ.get("ROSE_ATTEMPT", ""))
if phase and os.environ.get("RANK") == "0":
    os.environ["ROSE_CKPT_PAUSE_AT"] = phase
else:
    os.environ.pop("ROSE_CKPT_PAUSE_AT", None)
sys.argv[0] = str(TRAIN_PY)
runpy.run_path(str(TRAIN_PY), run_name="__main__")
