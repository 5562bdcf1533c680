"""The launcher's flag groups, in the order ``launch.py --help`` shows them. Each configuration
field that is a flag names its group (``option(..., group=RESTARTS)``)."""

WORKERS = "workers"
RESTARTS = "restarts"
DETECTION = "detection and stopping"
MULTI_NODE = "multi-node (passed to torchrun)"
OWN_SCRIPT = "a script that keeps its own checkpoints"
ORDER = (WORKERS, RESTARTS, DETECTION, OWN_SCRIPT, MULTI_NODE)
