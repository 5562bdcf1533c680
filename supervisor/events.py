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
from typing import Any, Protocol, TextIO, runtime_checkable

from runcontract.events import CHAOS_SOURCE, EventType, EventWriter, read_events

__all__ = ["EventLog", "EventSink", "RunDirUnwritable", "read_events"]


@runtime_checkable
class EventSink(Protocol):
    """What shows the events (``supervisor.console.Console``)."""

    def event(self, record: dict[str, Any]) -> None: ...


class RunDirUnwritable(Exception):
    """The supervisor cannot write its own record (``events.jsonl``) any more: a full disk, an
    immutable file, a directory in its place. The run stops, its workers with it."""


class EventLog:
    """Appends the supervisor's events to ``events.jsonl`` (``runcontract.events.EventWriter``)
    and hands each one to the console, which decides what to show."""

    def __init__(self, path: Path, console: EventSink | TextIO | None = sys.stderr) -> None:
        """Open ``path`` for appending (created with its parent). Raises OSError if it cannot.
        ``console`` is an EventSink, or a stream that gets one line per event."""
        self.path = path
        self._writer = EventWriter(path)
        self._console: EventSink | None
        if console is None or isinstance(console, EventSink):
            self._console = console
        else:
            self._console = _Lines(console)
        self._lock = threading.Lock()
        self._read_to = path.stat().st_size  # others' events are followed from here on

    def emit(self, type_: EventType | str, **fields: Any) -> dict[str, Any]:
        """Write one event (one whole line, fsync'd, so a killed supervisor leaves its story)
        and print it. Raises RunDirUnwritable when the line cannot be written; it is printed
        anyway."""
        with self._lock:
            record = {"time": time.time(), "mono": time.monotonic(), "type": type_, **fields}
            try:
                record = self._writer.write(type_, **fields)
            except (OSError, ValueError) as e:
                raise RunDirUnwritable(f"cannot write {self.path}: {e}") from e
            finally:
                self._show(record)
        return record

    def follow(self) -> list[dict[str, Any]]:
        """The events other processes appended since the last call (the workers' and the chaos
        tool's, marked with a ``source``); each is also handed to the console. Cheap when
        nothing was added: one ``stat``. A line still being written is left for the next
        call."""
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
                # The supervisor's own worker_failed has a source too (the failed process's
                # kind): it was shown when it was emitted.
                if record.get("type") != EventType.WORKER_FAILED:
                    self._show(record)
        return records

    def _show(self, record: dict[str, Any]) -> None:
        if self._console is not None:
            self._console.event(record)

    def close(self) -> None:
        """Close the file; later emits raise ValueError."""
        with self._lock:
            self._writer.close()


class _Lines:
    """A plain stream as a console: one line per event of the supervisor or of a worker."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def event(self, record: dict[str, Any]) -> None:
        if record.get("source") == CHAOS_SOURCE:
            return  # the chaos tool prints its own
        from supervisor.console import event_line

        try:
            self.stream.write(event_line(record) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass
