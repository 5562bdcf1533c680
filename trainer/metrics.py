"""``RUN_DIR/metrics.jsonl``: one JSON object per line, written by global rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any


class MetricsLog:
    """The metrics file, kept consistent with the checkpoints.

    Each checkpoint records the file's length (:attr:`offset`); a resumed run cuts the file back
    to that length, so the steps about to be redone appear once. A disabled log (every rank but
    0) writes nothing.
    """

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._offset = 0

    def open(self, truncate_to: int | None = None) -> None:
        """Open for appending; first cut the file back to ``truncate_to`` bytes when it is
        longer (None: keep it whole, e.g. when resuming from another run's checkpoint)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        if truncate_to is not None and 0 <= truncate_to < size:
            with open(self.path, "r+b") as f:
                f.truncate(truncate_to)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed by close()
        self._offset = self._file.tell()

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and flush it (a crash loses at most the line being
        written, which readers skip)."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._offset = self._file.tell()

    @property
    def offset(self) -> int:
        """The file's length in bytes after the last record written (0 when disabled)."""
        return self._offset

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
