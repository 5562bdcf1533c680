"""Exceptions raised by the checkpoint store.

Every error is a :class:`CheckpointError`, so a caller that only wants to know "did the checkpoint
work" catches one type; the subclasses tell a trainer which exit code to use.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every checkpoint store error."""


class CheckpointInvalid(CheckpointError):
    """A checkpoint failed verification (missing file, wrong size or hash, unreadable manifest).

    ``reason`` is a one-line explanation, the same text written to the quarantine ``REASON.txt``.
    """

    def __init__(self, reason: str, path: object = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class CheckpointIncompatible(CheckpointError):
    """A valid checkpoint that this code or this model cannot take.

    Raised for a newer ``format_version`` than this code reads, and for a model or optimizer whose
    tensor names or shapes differ from the saved ones (the message names them).
    """


class CheckpointLocked(CheckpointError):
    """Another process holds the checkpoint directory's writer lock."""


class CheckpointWriteFailed(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error, file too large…).

    Raised only when the store was created with ``fail_fatal=True``; otherwise the failure is
    reported through ``on_event`` and stderr and training goes on.
    """
