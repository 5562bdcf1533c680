"""An example script, then SIGABRT at exit, as gloo sometimes does after training finished.

``abort_after_done.py EXAMPLE ARGS...`` runs EXAMPLE (a path) as ``__main__`` with ARGS.
"""

from __future__ import annotations

import os
import runpy
import sys

if __name__ == "__main__":
    example = sys.argv.pop(1)
    runpy.run_path(example, run_name="__main__")
    os.abort()
