"""The run-directory contract: every name that the supervisor, the trainer, the tools, the
benchmarks and the tests must agree on, in one torch-free place.

- ``layout``: file and directory names in ``RUN_DIR`` (per-node names included) and the
  ``step-XXXXXXXX`` checkpoint names;
- ``env``: the ``ROSE_*`` environment variables;
- ``exit_codes``: the launcher's exit codes and the trainer's (a worker's) exit codes;
- ``heartbeat``: the phases a rank reports;
- ``states``: the supervisor's states, as ``supervisor.json`` records them;
- ``events``: every event type of ``events.jsonl``;
- ``cli``: how the command lines report bad input and name their flags after configuration
  fields.

Importing any of them costs nothing: no torch, no numpy, no psutil.
"""
