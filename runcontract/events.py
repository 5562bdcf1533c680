"""Every event type of ``events.jsonl`` (and of a node's ``events-<node>.jsonl``).

Each line is one JSON object with ``time`` (seconds since the epoch), ``mono`` (the writer's
monotonic clock), ``type`` (one of these) and the event's own fields. A recovery's phases are the
gaps between ``worker_failed``/``hang_detected`` → ``stopping`` → ``stopped`` → ``backoff`` →
``launch`` → ``first_step``.
"""

from __future__ import annotations

import enum
import json
import os
import time
from pathlib import Path
from typing import Any


class EventType(str, enum.Enum):
    """The ``type`` of an event. A ``str`` enum: it is written and compared as its value."""

    # The supervisor's lifetime
    SUPERVISOR_STARTED = "supervisor_started"
    INTERNAL_ERROR = "internal_error"
    WARNING = "warning"
    INTERRUPTED = "interrupted"
    EMERGENCY_CHECKPOINT = "emergency_checkpoint"
    DONE = "done"
    FINAL_STATE_UNSAVED = "final_state_unsaved"
    # An attempt
    CHECKPOINT_SELECTED = "checkpoint_selected"
    LAUNCH = "launch"
    RENDEZVOUS_WAIT = "rendezvous_wait"
    WORKERS_STARTED = "workers_started"
    HANG_TIMEOUT = "hang_timeout"
    HEARTBEATS_ABSENT = "heartbeats_absent"
    HANG_DETECTION = "hang_detection"
    STANDBY_STARTED = "standby_started"
    STANDBY_READY = "standby_ready"
    STANDBY_LOST = "standby_lost"
    LOG_TRUNCATED = "log_truncated"
    FIRST_STEP = "first_step"
    # A failure and its recovery
    WORKER_FAILED = "worker_failed"
    HANG_DETECTED = "hang_detected"
    STOPPING = "stopping"
    STOPPED = "stopped"
    BACKOFF = "backoff"
    EXIT_AFTER_DONE = "exit_after_done"
    FATAL = "fatal"
    CRASH_LOOP = "crash_loop"
    BUDGET_EXHAUSTED = "budget_exhausted"
    # The checkpoint store: from the supervisor's choice of a checkpoint, and (``source:
    # trainer``) from the writer and the resume of rank 0
    CHECKPOINT_SAVED = "checkpoint_saved"
    CHECKPOINT_EXISTS = "checkpoint_exists"
    CHECKPOINT_SAVE_SKIPPED = "checkpoint_save_skipped"
    CHECKPOINT_WRITE_FAILED = "checkpoint_write_failed"
    CHECKPOINT_PRUNED = "checkpoint_pruned"
    CHECKPOINT_PRUNE_FAILED = "checkpoint_prune_failed"
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    CHECKPOINT_QUARANTINED = "checkpoint_quarantined"
    CHECKPOINT_TMP_REMOVED = "checkpoint_tmp_removed"
    CHECKPOINT_DIR_RECREATED = "checkpoint_dir_recreated"
    CHECKPOINT_UNLOADABLE = "checkpoint_unloadable"
    CHECKPOINT_NOT_FINITE = "checkpoint_not_finite"
    # The trainer's save policy (``source: trainer``): the way disk saves are written under
    # --ckpt-mode auto, and each interval chosen under --ckpt-every/--mem-every auto
    CHECKPOINT_MODE = "checkpoint_mode"
    CHECKPOINT_INTERVAL = "checkpoint_interval"
    # The memory tier: snapshots in shared memory on the node (``source: trainer`` for the
    # writer's; the supervisor's when it drops an invalid one or removes the tier)
    MEMORY_SAVED = "memory_saved"
    MEMORY_SAVE_FAILED = "memory_save_failed"
    MEMORY_SNAPSHOT_DROPPED = "memory_snapshot_dropped"
    MEMORY_REMOVED = "memory_removed"
    # The trainer's numerics (``source: trainer``): a non-finite step, and the data a rollback
    # skipped
    DIVERGED = "diverged"
    DATA_SKIPPED = "data_skipped"
    # The chaos tool
    CHAOS_STARTED = "chaos_started"
    CHAOS_FINISHED = "chaos_finished"
    FAULT_INJECTED = "fault_injected"
    FAULT_MISSED = "fault_missed"
    DISK_FILLED = "disk_filled"

    def __str__(self) -> str:
        return self.value


CHAOS_SOURCE = "chaos"
"""The ``source`` of the chaos tool's events (the trainer's are ``trainer``)."""


class EventWriter:
    """Appends events to an events file, for the supervisor and the tools alike.

    Each event is one ``os.write`` of one whole line on an ``O_APPEND`` descriptor, fsync'd: the
    kernel places each such write at the end of the file whole, so lines from several processes
    never interleave, and a killed writer leaves its story up to the last event. A file that ends
    in a torn line (a write cut short by a full disk) gets a newline first, so the next event is
    never glued onto it; a line another process is still appending is not torn.
    """

    def __init__(self, path: Path, source: str | None = None) -> None:
        """Open ``path`` for appending (created with its parent). Raises OSError if it cannot;
        ``source`` names the writer in every event it writes (the supervisor's have none)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.source = source
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if _ends_in_a_torn_line(self._fd, path):
            self._write_all(b"\n")

    def write(self, type_: EventType | str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it. Raises OSError when it cannot be written whole, and
        ValueError after ``close``."""
        record: dict[str, Any] = {"time": time.time(), "mono": time.monotonic(), "type": type_}
        if self.source is not None:
            record["source"] = self.source
        record.update(fields)
        self._write_all((json.dumps(record, default=str) + "\n").encode())
        return record

    def _write_all(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: the event writer is closed")
        written = os.write(self._fd, data)
        if written != len(data):  # only a full disk does this: say so rather than tear silently
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        try:
            os.fsync(self._fd)
        except OSError:
            pass  # written, if not yet durable: the next event tries again

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


TORN_LINE_SETTLE = 0.02
"""Seconds a line without its newline must stay unchanged before it counts as torn."""


def _ends_in_a_torn_line(fd: int, path: Path) -> bool:
    # A reader can see another process's append half done (the kernel grows the file a page at
    # a time), so a missing newline at the end is torn only if the file then stays the same
    # size: a line still growing belongs to a live writer, which ends it itself. At worst a
    # writer stalled mid-append costs one blank line, which every reader skips.
    size = os.fstat(fd).st_size
    if not size or _ends_with_newline(path):
        return False
    time.sleep(TORN_LINE_SETTLE)
    return os.fstat(fd).st_size == size and not _ends_with_newline(path)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of a JSON-lines file (events, metrics): ``[]`` while the
    file does not exist; a torn last line (being written as we read) or a foreign line is
    skipped. Raises OSError when the file exists but cannot be read."""
    events = []
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return []
    with f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                events.append(record)
    return events


read_events = read_jsonl
"""``events.jsonl`` is JSON lines: read it as such."""
