"""The real trainer, with ``{rank}`` in its arguments replaced by this worker's ``RANK``: a
per-rank argument (``--data corpus-{rank}.txt``), as ranks on different nodes can see."""

import os
import runpy
import sys
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[2] / "trainer" / "train.py"

rank = os.environ.get("RANK", "0")
sys.argv = [str(TRAIN_PY), *(arg.replace("{rank}", rank) for arg in sys.argv[1:])]
runpy.run_path(str(TRAIN_PY), run_name="__main__")
