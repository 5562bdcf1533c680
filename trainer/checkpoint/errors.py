"""Exceptions raised by the checkpoint store.

Every error is a :class:`CheckpointError`, so a caller that only wants to know "did the checkpoint
work" catches one type; the subclasses tell a trainer which exit code to use.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

#: errno values that say this process or machine ran short, not that a checkpoint is bad: they
#: propagate instead of condemning the checkpoint being read.
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


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


class CheckpointUnloadable(CheckpointInvalid):
    """A checkpoint that verifies but cannot be loaded: a payload that is not safetensors,
    tensors of another shape or dtype than the model its own manifest describes, state that does
    not decode or does not fit. An older checkpoint may load: the trainer writes ``reason`` to
    the checkpoint's ``UNLOADABLE.txt`` (which makes it invalid from then on) and exits
    ``CKPT_UNLOADABLE``."""


def describe(e: BaseException) -> str:
    """One line about an error: an OSError's message without the path (the caller names the
    file), or the first line of any other."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def invalid_on_error(ckpt: Any, name: str) -> Iterator[None]:
    """Turn an OSError or ValueError met while reading file ``name`` of checkpoint ``ckpt`` into
    CheckpointInvalid: anything odd about one checkpoint makes it invalid, never crashes the
    reader. Shortages of the process itself (``SHORTAGE_ERRNOS``) propagate."""
    try:
        yield
    except FileNotFoundError:
        raise CheckpointInvalid(f"missing file {name}", ckpt) from None
    except OSError as e:
        if e.errno in SHORTAGE_ERRNOS:
            raise
        raise CheckpointInvalid(f"cannot read {name}: {describe(e)}", ckpt) from e
    except ValueError as e:  # our own messages name the file; UnicodeError and JSON errors too
        raise CheckpointInvalid(describe(e), ckpt) from e
    except RecursionError:
        raise CheckpointInvalid(f"{name} is nested too deeply", ckpt) from None
