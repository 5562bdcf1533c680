"""Run a torchrun script (default: the built-in trainer) under the rosetrainer supervisor.

    python launch.py --nproc 2 --max-restarts 5 [SCRIPT [ARGS...]]
    python launch.py status RUN_DIR

See docs/supervisor.md.
"""

import sys

from supervisor.cli import main

if __name__ == "__main__":
    sys.exit(main())
