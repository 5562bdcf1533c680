"""Exit codes: the launcher's (``launch.py``, one per way a run can end) and a worker's
(``TrainerExit``: what the built-in trainer, or any script that keeps the contract, tells the
supervisor through its exit status).

Each is distinct so that scripts and CI can tell them apart; the README lists them.
"""

from __future__ import annotations

import enum


class TrainerExit(enum.IntEnum):
    """A worker's exit status."""

    OK = 0
    """Finished every step; the final checkpoint is durable."""
    USAGE = 2
    """A bad flag, bad data or an incompatible checkpoint: no restart can help."""
    PREEMPTED = 75
    """SIGTERM or SIGUSR1: it finished its step, wrote an emergency checkpoint and left."""
    CKPT_FAILED = 76
    """A checkpoint write failed under ``--ckpt-fail-fatal``."""
    CKPT_LOCKED = 77
    """Another process holds the run's checkpoint writer lock."""
    DIVERGED = 74
    """A step's loss or gradient norm was not finite (NaN or infinity): the trainer did not apply
    that step's update and stopped, with a ``diverged`` event naming the step (under
    ``--on-divergence rollback-skip:N``, only once rolling back could not go on). A restart from
    the same checkpoint with the same data would diverge again, so none is made."""
    CKPT_UNLOADABLE = 78
    """The checkpoint to resume from cannot be used: it does not verify, or it verifies but does
    not load (tensors of another shape or dtype than the model its own manifest describes, a
    payload that is not safetensors). The reason is in the checkpoint's ``UNLOADABLE.txt``, which
    makes it invalid: the next search quarantines it with that reason and an older checkpoint
    may load. A model that differs from the checkpoint's recorded configuration is ``USAGE``."""


SUCCESS = 0
"""Every worker finished (torchrun exited 0)."""

INTERNAL_ERROR = 1
"""The supervisor itself failed unexpectedly (a bug: please report it with events.jsonl)."""

BAD_INPUT = 2
"""A bad flag, a missing script or an unusable run directory; nothing was launched."""

BUDGET_EXHAUSTED = 3
"""The restart budget (``--max-restarts``, within ``--restart-window``) is spent."""

CRASH_LOOP = 4
"""``--crash-loop`` consecutive attempts failed without a new valid checkpoint."""

RUN_DIR_LOCKED = 5
"""Another supervisor owns the run directory (``supervisor.lock`` is held)."""

WORKER_BAD_INPUT = 6
"""A worker exited 2 (bad flag, bad data, incompatible checkpoint): retrying cannot help."""

INTERRUPTED_UNSAVED = 7
"""SIGINT/SIGTERM (or SLURM's signals): the workers stopped, but no valid checkpoint holds the
step they had reached (the emergency checkpoint failed or was never written). A relaunch
resumes from the newest durable step, which the message and the event name."""

FINAL_STATE_UNSAVED = 8
"""Every worker finished, but no valid checkpoint holds the final step (a save failed, the disk
is full, ``checkpoints/`` vanished): the final state is lost. The newest durable step is named."""

CHECKPOINTS_LOCKED = 9
"""Another process holds the run's checkpoint writer lock (a second training job on the same run
directory, or a worker of an earlier run still alive); found before a launch, or reported by a
worker's exit 77. Before a relaunch the holder first gets 10 s to let go (a worker of the attempt
just stopped can hold it while its last threads exit). No restart is spent: stop that process, or
use another run directory."""

RUN_DIR_UNWRITABLE = 10
"""The supervisor could no longer write its event log (a full disk, an immutable or replaced
file): it stopped the workers and said why on stderr. Free the space or repair the file, then
relaunch to resume."""

NO_USABLE_CHECKPOINT = 11
"""The workers could not use the checkpoint they were given (a worker's exit 78), and no older
valid one is left: the run stops rather than start over from scratch and discard its history.
The quarantined checkpoints keep their reasons (``checkpoints/quarantine/*/REASON.txt``)."""

DIVERGED = 12
"""A worker exited 74: the training diverged (a non-finite loss or gradient norm; the trainer's
``diverged`` event names the step). No restart is made: the same checkpoint and data would
diverge again. The checkpoints before the divergence are intact; lower the learning rate, or
relaunch with the trainer's ``--on-divergence rollback-skip:N``."""

INTERRUPTED = 75
"""SIGINT/SIGTERM: the workers wrote an emergency checkpoint of the step they had reached (or
none was running) and stopped. Relaunching on the same run directory resumes without loss. Same
value as the trainer's "preempted"."""

REQUEUE = 79
"""Under ``--slurm``: SLURM's pre-timeout SIGUSR1 (``sbatch --signal=USR1@T``) or its SIGTERM
arrived; workers wrote an emergency checkpoint of the step they had reached and stopped. Requeue
the job (``scontrol requeue``, see examples/slurm.sbatch): it resumes from that checkpoint with the
restart count carried over."""

DESCRIPTIONS: dict[int, str] = {
    SUCCESS: "success",
    INTERNAL_ERROR: "internal error",
    BAD_INPUT: "bad input",
    BUDGET_EXHAUSTED: "restart budget exhausted",
    CRASH_LOOP: "crash loop",
    RUN_DIR_LOCKED: "run directory locked by another supervisor",
    WORKER_BAD_INPUT: "worker reported bad input",
    INTERRUPTED_UNSAVED: "interrupted; the emergency checkpoint was not written",
    FINAL_STATE_UNSAVED: "finished, but the final state is not in a valid checkpoint",
    CHECKPOINTS_LOCKED: "checkpoints locked by another process",
    RUN_DIR_UNWRITABLE: "the run directory became unwritable",
    NO_USABLE_CHECKPOINT: "no usable checkpoint left",
    DIVERGED: "the training diverged",
    INTERRUPTED: "interrupted",
    REQUEUE: "preempted by SLURM: requeue to resume",
}


def describe(code: int) -> str:
    """A short human name for a supervisor exit code ("exit N" for an unknown one)."""
    return DESCRIPTIONS.get(code, f"exit {code}")
