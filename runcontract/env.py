"""The environment variables that carry the contract between the supervisor and its workers."""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "ROSE_"
"""Every variable of the contract starts with it."""

RUN_DIR = "ROSE_RUN_DIR"
"""The run directory (its presence means: this worker is supervised)."""
ATTEMPT = "ROSE_ATTEMPT"
"""The attempt number, 1-based; heartbeats carry it so that old files are never mistaken."""
RESUME_FROM = "ROSE_RESUME_FROM"
"""The checkpoint every rank must load; empty for a fresh start."""
HEARTBEAT_DIR = "ROSE_HEARTBEAT_DIR"
"""Where ``rank-<R>.json`` heartbeats go."""
SUPERVISOR_PID = "ROSE_SUPERVISOR_PID"
"""The supervisor's pid: a worker exits when it is gone (``supervised.guard_parent``)."""
EVENTS_FILE = "ROSE_EVENTS_FILE"
"""This node's events file (``events.jsonl``, ``events-<node>.jsonl``): rank 0 of the built-in
trainer appends its checkpoint events there, marked ``source: trainer``. Unset, it appends to
``RUN_DIR/events.jsonl`` when that file exists (a one-node supervisor made it) and nowhere else."""
DATA_CACHE = "ROSE_DATA_CACHE"
"""Where the built-in trainer caches its tokenized corpus."""
MEM_ROOT = "ROSE_MEM_ROOT"
"""Where the memory tier keeps its snapshots (default ``/dev/shm``): ``<root>/rose-<id>/``. The
supervisor and its workers must see the same value; tests point it at a temporary directory."""
FAILURES = "ROSE_FAILURES"
"""How many failures (a worker that failed, a hang) the run has seen before this attempt: the
built-in trainer's auto checkpoint intervals estimate the mean time between failures from it."""
RUN_SECONDS = "ROSE_RUN_SECONDS"
"""How many seconds the run's attempts ran before this one (with ``ROSE_FAILURES``)."""
MEMORY_RECOVERIES = "ROSE_MEMORY_RECOVERIES"
"""How many of those failures the next attempt resumed from the memory tier: the built-in
trainer's disk interval counts only the others while its memory tier is on, since a failure the
memory tier recovers costs no disk checkpoint's work."""
CKPT_PAUSE_AT = "ROSE_CKPT_PAUSE_AT"
"""Test only: the checkpoint writer stops itself (SIGSTOP) at this phase of a write."""
DIVERGE_AT_STEP = "ROSE_DIVERGE_AT_STEP"
"""Test only: ``STEP`` or ``STEP:RANK``. The built-in trainer makes the loss NaN (on every rank,
or on RANK only) of the step that reads the data step STEP reads in a run that skipped nothing,
so a divergence happens at a chosen step, deterministically; once a rollback skipped that data it
does not happen again."""

MEM_ALTERNATE = "ROSE_MEM_ALTERNATE"
"""Benchmark only: ``N``. The built-in trainer takes memory snapshots only in every other
stretch of N steps (steps 1 to N-1 on, N to 2N-1 off, ...), so that one run measures what the
tier costs, stretch against stretch, free of the drift between separate runs."""

SUPERVISED = (
    RUN_DIR, ATTEMPT, RESUME_FROM, HEARTBEAT_DIR, SUPERVISOR_PID, EVENTS_FILE,
    FAILURES, RUN_SECONDS, MEMORY_RECOVERIES,
)  # fmt: skip
"""The variables the supervisor sets for every worker."""


def unsupervised(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without any ``ROSE_*`` variable: a process started with it is not
    supervised, whatever started the caller."""
    return {k: v for k, v in environ.items() if not k.startswith(PREFIX)}


def run_dir_of(pid: int) -> str | None:
    """The ``ROSE_RUN_DIR`` process ``pid`` runs with, as its environment says (Linux
    ``/proc``); None when it has none, or cannot be read (gone, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{RUN_DIR}=".encode()
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace") or None
    return None
