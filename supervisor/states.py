"""How one attempt ended, as the runner saw it. (The supervisor's own states, which
``supervisor.json`` records, are ``runcontract.states.State``.)"""

from __future__ import annotations

import enum


class Outcome(str, enum.Enum):
    """How one attempt ended, as the monitor saw it."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HUNG = "hung"
    INTERRUPTED = "interrupted"
    """A signal asked the run to stop; the attempt has been stopped."""
