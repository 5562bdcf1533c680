"""The supervisor's states. Depends on nothing, so anything may import it.

Transitions (one attempt per pass)::

    INIT -> STARTING -> RUNNING -> SUCCEEDED
                        RUNNING -> STOPPING -> BACKOFF -> STARTING   (failure or hang, budget left)
                                   STOPPING -> FAILED                 (budget spent, crash loop)
                        RUNNING -> STOPPING -> INTERRUPTED            (SIGINT/SIGTERM)
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    """Where the supervisor is; written to ``supervisor.json`` for ``launch.py status``."""

    INIT = "init"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        """True for states the supervisor exits in."""
        return self in (State.SUCCEEDED, State.FAILED, State.INTERRUPTED)


class Outcome(str, enum.Enum):
    """How one attempt ended, as the monitor saw it."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HUNG = "hung"
    INTERRUPTED = "interrupted"
    """A signal asked the run to stop; the attempt has been stopped."""
