"""Where the run lives, what to resume, heartbeats and the ``done`` marker: the supervisor's
environment contract seen from a user's script (thin over ``trainer.supervised``; no torch)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rosetrainer._ours import loaded, trainer_module
from runcontract import env as env_names
from runcontract import layout
from runcontract.heartbeat import Phase

if TYPE_CHECKING:
    from trainer.supervised import Heartbeat, SupervisedEnv

_supervised = trainer_module("supervised")


def from_env() -> SupervisedEnv | None:
    """What the supervisor told this process (``trainer.supervised.from_env``)."""
    env: SupervisedEnv | None = _supervised.from_env()
    return env


# One heartbeat per process, rebuilt when the environment it was made for changes (tests, or a
# script that re-executes itself with another rank).
_beat: Heartbeat | None = None
_beat_key: tuple[str, ...] = ()


def is_supervised() -> bool:
    """True when the supervisor started this process (``ROSE_RUN_DIR`` is set)."""
    return from_env() is not None


def resume_from() -> Path | None:
    """The checkpoint directory the supervisor chose for this attempt (the same for every rank),
    or None for a fresh start or when not supervised.

    The supervisor verified it and quarantined anything newer that did not verify; load it with
    :func:`rosetrainer.load_checkpoint`. Raises ValueError when a ``ROSE_*`` variable is malformed.
    """
    env = from_env()
    return env.resume_from if env is not None else None


def run_dir(default: str | os.PathLike[str] = ".") -> Path:
    """The run directory: ``ROSE_RUN_DIR`` when supervised, else ``default`` (your own choice,
    the working directory unless named). Pass it to :func:`rosetrainer.save_checkpoint`, and keep
    any other state of the script under it, so a fresh run never picks up another run's files."""
    env = from_env()
    return env.run_dir if env is not None else Path(default)


def _heartbeat() -> Heartbeat | None:
    global _beat, _beat_key
    key = tuple(
        os.environ.get(name, "")
        for name in (env_names.RUN_DIR, env_names.ATTEMPT, env_names.HEARTBEAT_DIR, "RANK")
    )
    if key != _beat_key:
        env = from_env()
        rank = int(os.environ.get("RANK") or 0)  # torchrun's global rank
        _beat = _supervised.Heartbeat(rank, env=env) if env is not None else None
        _beat_key = key
    return _beat


def heartbeat(step: int, phase: str = "train") -> bool:
    """Report ``step`` completed optimizer steps to the supervisor's hang detection.

    Call it from the training loop itself, every step (throttled to one write per 0.2 s, so it
    costs nothing measurable); never from a background thread, which would keep beating while
    the loop is stuck. ``phase`` is ``train`` or ``eval`` (an eval gets the longer
    ``--checkpoint-timeout``). Returns True when a heartbeat was written; False when throttled
    or not supervised. Raises ValueError for an unknown phase.
    """
    beat = _heartbeat()
    return beat(step, phase) if beat is not None else False


def done(step: int, wait: float = 60.0) -> bool:
    """Mark this rank finished at ``step``: waits for background checkpoint saves, flushes the
    script's output, writes the ``done`` heartbeat phase, then waits until every rank of the job
    reported it too (at most ``wait`` seconds). Once every rank reported it, an abort at exit
    (gloo sometimes raises SIGABRT while tearing down) does not restart the job; the wait keeps a
    rank that finished first from aborting while a peer still writes its last checkpoint.

    Call it on every rank after the last step and the last save. Returns True when written;
    False when not supervised. Raises CheckpointWriteFailed when a background save failed.
    """
    api = loaded("checkpoint.api")
    if api is not None:  # only when checkpoints were used: no torch import for nothing
        api.wait_checkpoints()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # closed or replaced streams: the marker matters more than the output
    beat = _heartbeat()
    if beat is None or not beat(step, Phase.DONE.value):
        return False
    _wait_for_peers(beat, wait)
    return True


def _wait_for_peers(beat: Heartbeat, wait: float) -> None:
    """Until every rank's heartbeat of this attempt says ``done``, or ``wait`` seconds: a file
    barrier (the heartbeat directory is shared by every node), so no process group is needed
    and a peer that never reports costs at most ``wait``."""
    env = beat.env
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if env is None or world <= 1:
        return
    deadline = time.monotonic() + wait
    pending = [r for r in range(world) if r != beat.rank]
    while pending and time.monotonic() < deadline:
        pending = [r for r in pending if not _reported_done(env, r)]
        if pending:
            time.sleep(0.05)


def _reported_done(env: SupervisedEnv, rank: int) -> bool:
    try:
        record = json.loads((env.heartbeat_dir / layout.heartbeat_name(rank)).read_text())
    except (OSError, ValueError):
        return False  # none yet, or being replaced right now
    return (
        isinstance(record, dict)
        and record.get("attempt") == env.attempt
        and record.get("phase") == Phase.DONE.value
    )


@contextmanager
def checkpoint_phase(step: int) -> Iterator[None]:
    """The ``checkpoint`` phase around a save, then back to the phase before it: the supervisor
    gives a saving rank (and its waiting peers) ``--checkpoint-timeout`` instead of the hang
    timeout, and the next step is judged as a step again even when this rank never beats."""
    beat = _heartbeat()
    if beat is None:
        yield
        return
    before = beat._last_phase or Phase.STARTUP.value
    beat(step, Phase.CHECKPOINT.value)
    try:
        yield
    finally:
        beat(step, before)
