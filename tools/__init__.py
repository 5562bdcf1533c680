"""Tools that work on a supervised run from outside, through its run directory only.

- ``chaos``: inject real faults into a running run (``python -m tools.chaos``);
- ``report``: what happened to a run, as text and a plot (``python -m tools.report``).

They depend on the run-directory contract (``runcontract``) and the checkpoint store's read
side, never on the supervisor: they read what it publishes, as a user would.
"""
