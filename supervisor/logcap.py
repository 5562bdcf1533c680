"""Bounded worker logs: no worker can fill the disk through its output.

torchrun writes each rank's stdout and stderr straight into files (``--redirects``), opened
without ``O_APPEND``, and reads none of it back, so no process of ours holds a worker's output in
memory. A file whose space on disk passes the cap keeps its newest part as ``<name>.prev`` and is
emptied: the writer goes on at its own offset, so the file becomes sparse and its disk use starts
again from zero, while its end (what a root cause's log tail shows) stays the newest output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEEP_BYTES = 1 << 20
"""The newest part kept in ``<name>.prev`` when a log is emptied."""


@dataclass
class LogCap:
    """Caps every worker log file under ``root`` at ``max_bytes`` of disk each."""

    root: Path
    max_bytes: int
    truncated: dict[Path, int] = field(default_factory=dict)
    """How many times each file was emptied."""

    def check(self) -> list[dict[str, Any]]:
        """Empty the files over the cap; returns one event's fields for each file emptied for
        the first time (later times are only counted)."""
        if self.max_bytes <= 0:
            return []
        notes = []
        for path in self.root.glob("*/attempt_*/*/std*.log"):
            try:
                used = os.stat(path).st_blocks * 512
                if used <= self.max_bytes:
                    continue
                _keep_tail(path, min(KEEP_BYTES, self.max_bytes // 2))
                os.truncate(path, 0)
            except OSError:
                continue  # gone with its attempt, or unreadable: nothing to bound
            self.truncated[path] = self.truncated.get(path, 0) + 1
            if self.truncated[path] == 1:
                kept = path.with_name(path.name + ".prev")
                notes.append(
                    {"path": str(path), "bytes": used, "cap": self.max_bytes, "kept": str(kept)}
                )
        return notes


def _keep_tail(path: Path, nbytes: int) -> None:
    with open(path, "rb") as src:
        src.seek(0, os.SEEK_END)
        src.seek(max(0, src.tell() - nbytes))
        tail = src.read(nbytes)
    path.with_name(path.name + ".prev").write_bytes(tail)
