"""``RUN_DIR/events.jsonl``: the supervisor's log, one JSON object a line, plus the console line.

Every event has ``time`` (seconds since the epoch), ``mono`` (the supervisor's monotonic clock,
for durations that a wall-clock jump cannot distort) and ``type``. The recovery phases are the
gaps between ``worker_failed``/``hang_detected`` → ``stopping`` → ``stopped`` → ``backoff`` →
``launch`` → ``first_step``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from runcontract.events import EventType, EventWriter, read_events

__all__ = ["EventLog", "RunDirUnwritable", "read_events"]

# Field order for the console line; the rest follow alphabetically.
_CONSOLE_FIRST = ("attempt", "rank", "pid", "exit_code", "signal", "step", "reason")


class RunDirUnwritable(Exception):
    """The supervisor cannot write its own record (``events.jsonl``) any more: a full disk, an
    immutable file, a directory in its place. The run stops, its workers with it."""


class EventLog:
    """Appends the supervisor's events to ``events.jsonl`` (``runcontract.events.EventWriter``)
    and prints a concise line for each to the console."""

    def __init__(self, path: Path, console: TextIO | None = sys.stderr) -> None:
        """Open ``path`` for appending (created with its parent). Raises OSError if it cannot."""
        self.path = path
        self._writer = EventWriter(path)
        self._console = console
        self._lock = threading.Lock()
        self._read_to = path.stat().st_size  # others' events are followed from here on

    def emit(self, type_: EventType | str, **fields: Any) -> dict[str, Any]:
        """Write one event (one whole line, fsync'd, so a killed supervisor leaves its story)
        and print it. Raises RunDirUnwritable when the line cannot be written; it is printed
        anyway."""
        with self._lock:
            try:
                record = self._writer.write(type_, **fields)
            except (OSError, ValueError) as e:
                raise RunDirUnwritable(f"cannot write {self.path}: {e}") from e
            finally:
                self._print({"time": time.time(), "type": type_, **fields})
        return record

    def follow(self) -> list[dict[str, Any]]:
        """The events other processes appended since the last call (the workers' and the chaos
        tool's, marked with a ``source``); the workers' are also printed to the console (the
        chaos tool prints its own). Cheap when nothing was added: one ``stat``. A line still
        being written is left for the next call."""
        try:
            size = self.path.stat().st_size
            if size <= self._read_to:
                return []
            with open(self.path, "rb") as f:
                f.seek(self._read_to)
                data = f.read(size - self._read_to)
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._read_to += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("source"):
                records.append(record)
                if record["source"] == "trainer":
                    self._print(record)
        return records

    def _print(self, record: dict[str, Any]) -> None:
        if self._console is None:
            return
        try:
            self._console.write(_console_line(record) + "\n")
            self._console.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Close the file; later emits raise ValueError."""
        with self._lock:
            self._writer.close()


def _console_line(record: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record["time"]))
    if record["type"] == EventType.WORKERS_STARTED:
        workers = ", ".join(f"rank {r} pid {p}" for r, p in (record.get("workers") or {}).items())
        return (
            f"[rose {stamp}] attempt {record.get('attempt')} running: {workers or 'no workers'} "
            f"(torchrun pid {record.get('torchrun_pid')})\n"
            f"    run dir {record.get('run_dir')}; worker output in "
            f"{record.get('log_dir') or 'logs/attempt-' + str(record.get('attempt'))}/"
        )
    parts = []
    keys = [k for k in _CONSOLE_FIRST if k in record]
    keys += sorted(k for k in record if k not in keys and k not in ("time", "mono", "type"))
    for key in keys:
        value = record[key]
        if key == "log_tail" or value is None or value == "":
            continue
        parts.append(f"{key}={value}")
    line = f"[rose {stamp}] {record['type']}: " + " ".join(parts)
    tail = record.get("log_tail")
    if tail:
        line += "\n    " + "\n    ".join(str(tail).splitlines()[-8:])
    return line
