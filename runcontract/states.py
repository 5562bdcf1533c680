"""The supervisor's states, as ``supervisor.json`` records them for ``launch.py status``.

Transitions (one attempt per pass)::

    INIT -> STARTING -> RUNNING -> SUCCEEDED
                        RUNNING -> STOPPING -> BACKOFF -> STARTING   (failure or hang, budget left)
                                   STOPPING -> FAILED                 (budget spent, crash loop)
                        RUNNING -> STOPPING -> INTERRUPTED            (SIGINT/SIGTERM)
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    """Where the supervisor is."""

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
        return self in FINAL_STATES


FINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.INTERRUPTED})


def is_final(value: object) -> bool:
    """Whether a state read back from ``supervisor.json`` (a string) is final."""
    return value in {s.value for s in FINAL_STATES}
