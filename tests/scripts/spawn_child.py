"""Stand-in for torchrun: start ``sys.argv[1:]`` as a child, print its pid, then wait on it."""

import subprocess
import sys

child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
child.wait()
