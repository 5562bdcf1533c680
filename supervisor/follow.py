"""Reading a file that another process keeps appending to, a bounded piece at a time.

The console follows the workers' logs (``--tee``) and the trainer's ``metrics.jsonl`` with it.
Whatever the writer does, this reader's memory and the time of one read stay bounded: it reads
at most ``chunk`` bytes a call, holds at most ``max_line`` bytes of a line still unterminated
(a longer one is passed on in pieces), and when it falls more than ``max_backlog`` bytes behind
it jumps to the newest output and says how much it skipped. A log that ``supervisor.logcap``
emptied under the cap keeps its size (the writer goes on at its own offset over a hole); the
hole reads as nothing here, and a file cut back (a resumed trainer's metrics) is read again
from its start.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 64 * 1024
MAX_LINE = 16 * 1024
MAX_BACKLOG = 1 << 20


@dataclass
class Follower:
    """Complete lines appended to ``path`` since the last read."""

    path: Path
    from_end: bool = False
    """Start at the file's newest complete lines (the last ``max_backlog`` bytes) rather than
    its beginning: for a file an earlier run already filled."""
    chunk: int = CHUNK
    max_line: int = MAX_LINE
    max_backlog: int = MAX_BACKLOG
    offset: int = 0
    skipped: int = 0
    """Bytes passed over so far, to catch up with a writer that outran the reader."""
    _partial: bytes = field(default=b"", repr=False)
    _started: bool = field(default=False, repr=False)
    _resync: bool = field(default=False, repr=False)
    """Drop bytes up to the next newline: the read landed inside a line."""

    def read(self) -> list[str]:
        """The lines completed since the last call, without their newlines; ``[]`` while the
        file does not exist. Never raises for a file that vanishes or cannot be read."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if not self._started:
                    self._started = True
                    if self.from_end and size > self.max_backlog:
                        self._jump(size - self.max_backlog, counted=False)
                if size < self.offset:  # cut back (a resumed trainer's metrics) or emptied
                    self._jump(max(0, size - self.max_backlog), counted=False)
                self.offset = _past_hole(f.fileno(), self.offset, size)
                if size - self.offset > self.max_backlog:
                    self._jump(size - self.max_backlog)
                f.seek(self.offset)
                data = f.read(min(self.chunk, size - self.offset))
        except OSError:
            return []
        self.offset += len(data)
        return self._lines(data.replace(b"\0", b""))

    def flush(self) -> list[str]:
        """The unterminated rest, as a last line (when its writer is gone)."""
        rest, self._partial = self._partial, b""
        return [_text(rest)] if rest and not self._resync else []

    def _jump(self, to: int, counted: bool = True) -> None:
        if counted:
            self.skipped += to - self.offset + len(self._partial)
        self.offset = to
        self._partial = b""
        self._resync = to > 0

    def _lines(self, data: bytes) -> list[str]:
        if self._resync:
            cut = data.find(b"\n")
            if cut < 0:
                return []
            data, self._resync = data[cut + 1 :], False
        out = []
        buf = self._partial + data
        *whole, rest = buf.split(b"\n")
        for line in whole:
            out += self._pieces(line)
        # A line still being written is kept, up to max_line bytes: past that it is passed on
        # in pieces, so one endless line never grows the reader.
        while len(rest) > self.max_line:
            out.append(_text(rest[: self.max_line]))
            rest = rest[self.max_line :]
        self._partial = rest
        return out

    def _pieces(self, line: bytes) -> list[str]:
        return [
            _text(line[i : i + self.max_line]) for i in range(0, max(len(line), 1), self.max_line)
        ]


def _past_hole(fd: int, offset: int, size: int) -> int:
    """Where the next data is at or after ``offset``: a log emptied by the cap reads as a hole
    up to where its writer went on."""
    try:
        return min(os.lseek(fd, offset, os.SEEK_DATA), size)
    except OSError as e:
        return size if e.errno == errno.ENXIO else offset  # only a hole left; or no SEEK_DATA


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")
