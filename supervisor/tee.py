"""``--tee``: chosen ranks' output on the console, prefixed ``[rank0]:`` as torchrun prefixes it.

torchrun writes each rank's stdout and stderr to files (``--redirects 3``) and reads none of it
back; this reads those files of the running attempt incrementally (``supervisor.follow``), so
memory stays bounded whatever a worker prints, and a log emptied by ``--log-max-mb`` is followed
on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from supervisor.follow import Follower

STREAMS = ("stdout.log", "stderr.log")
FIND_INTERVAL = 1.0
"""Seconds between looks for rank files torchrun has not created yet."""


def parse_ranks(text: str) -> frozenset[int] | None:
    """``--tee``'s value: ``all`` (None: every rank), ``none`` (empty), or local ranks
    ``0,2``. Raises ValueError."""
    text = text.strip().lower()
    if text == "all":
        return None
    if text in ("none", ""):
        return frozenset()
    try:
        ranks = frozenset(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"--tee {text!r}: expected local ranks such as 0 or 0,1, 'all' or 'none'"
        ) from None
    if any(r < 0 for r in ranks):
        raise ValueError(f"--tee {text!r}: ranks are >= 0")
    return ranks


class Tee:
    """Follows the chosen local ranks' output files of one attempt at a time."""

    def __init__(
        self,
        ranks: frozenset[int] | None,
        nproc: int,
        rank_of: Callable[[int], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rank_of`` gives a local rank's global rank (for the prefix) when known."""
        wanted = range(nproc) if ranks is None else sorted(r for r in ranks if r < nproc)
        self.local_ranks = list(wanted)
        self._rank_of = rank_of
        self._clock = clock
        self._root: Path | None = None
        self._followers: dict[tuple[int, str], Follower] = {}
        self._next_find = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.local_ranks)

    def start(self, ranks_dir: Path) -> None:
        """Follow the attempt whose rank logs go under ``ranks_dir`` (torchrun's --log-dir)."""
        self._root = ranks_dir
        self._followers = {}
        self._next_find = 0.0

    def read(self) -> list[str]:
        """The new complete lines of every followed file, prefixed."""
        self._find()
        out = []
        for (local, _name), follower in self._followers.items():
            before = follower.skipped
            lines = follower.read()
            if follower.skipped > before:
                lines.insert(0, f"... {follower.skipped - before} bytes of output skipped ...")
            out += [f"{self._prefix(local)} {line}" for line in lines]
        return out

    def drain(self, rounds: int = 32) -> list[str]:
        """What is left to read (bounded: ``rounds`` reads of each file), then the unterminated
        rests; the attempt's workers are gone, or about to be."""
        self._next_find = 0.0
        out = []
        for _ in range(rounds):
            lines = self.read()
            if not lines:
                break
            out += lines
        for (local, _name), follower in self._followers.items():
            out += [f"{self._prefix(local)} {line}" for line in follower.flush()]
        return out

    def stop(self) -> None:
        self._root = None
        self._followers = {}

    def _find(self) -> None:
        if self._root is None or len(self._followers) == 2 * len(self.local_ranks):
            return
        now = self._clock()
        if now < self._next_find:
            return
        self._next_find = now + FIND_INTERVAL
        for local in self.local_ranks:
            for name in STREAMS:
                if (local, name) in self._followers:
                    continue
                found = sorted(self._root.glob(f"*/attempt_*/{local}/{name}"))
                if found:
                    self._followers[(local, name)] = Follower(found[-1])

    def _prefix(self, local: int) -> str:
        rank = self._rank_of(local) if self._rank_of is not None else None
        return f"[rank{local if rank is None else rank}]:"
