"""A worker that fails at once, every attempt: what a broken script looks like to the supervisor."""

import sys

sys.stderr.write("always_crash.py: failing on purpose\n")
sys.exit(1)
