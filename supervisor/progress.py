"""The run's progress as the console's status line shows it: step of total, loss, tokens/s,
ETA, the newest checkpoint, the attempt and the restarts left.

Fed only from what the supervisor already reads: its own events and those the workers append
(``checkpoint_saved``), the step of the heartbeats at each poll, and the trainer's
``metrics.jsonl`` read incrementally. What is not known is left out, never shown as zero: a
script without heartbeats shows its attempt, restarts and elapsed time only.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runcontract.events import EventType
from supervisor.follow import CHUNK, Follower

RATE_WINDOW = 60.0
"""Seconds of step history the ETA is measured over."""
TOKENS_WINDOW = 10
"""Steps the tokens/s figure is averaged over."""


@dataclass
class Progress:
    """What the status line shows; ``now`` is the monotonic clock."""

    total: int | None = None
    """The run's last step, when known (the built-in trainer's ``--steps``)."""
    started: float = field(default_factory=time.monotonic)
    attempt: int | None = None
    restarts_left: int | None = None
    phase: str = "starting"
    """``starting`` (until an attempt's first step), ``training``, ``stopping``, ``restarting``."""
    step: int | None = None
    resume_step: int = 0
    loss: float | None = None
    checkpoint_step: int | None = None
    _tokens: deque[float] = field(default_factory=lambda: deque(maxlen=TOKENS_WINDOW))
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def on_event(self, record: dict[str, Any]) -> None:
        """Take in one event of the supervisor or of a worker."""
        kind = record.get("type")
        if kind == EventType.CHECKPOINT_SELECTED:
            self.resume_step = _int(record.get("step")) or 0
            if record.get("path"):
                self.checkpoint_step = self.resume_step
        elif kind == EventType.LAUNCH:
            self.attempt = _int(record.get("attempt"))
            self.restarts_left = _int(record.get("restarts_left"))
            self.phase = "starting"
            self.step = None
            self._samples.clear()
        elif kind == EventType.FIRST_STEP:
            self.phase = "training"
        elif kind == EventType.CHECKPOINT_SAVED:
            step = _int(record.get("step"))
            if step is not None and (self.checkpoint_step is None or step > self.checkpoint_step):
                self.checkpoint_step = step
        elif kind in (EventType.WORKER_FAILED, EventType.HANG_DETECTED, EventType.INTERRUPTED):
            self.phase = "stopping"
        elif kind == EventType.BACKOFF:
            self.phase = "restarting"
            self.restarts_left = _int(record.get("restarts_left"))

    def on_step(self, step: int | None, now: float) -> None:
        """The highest step the heartbeats report (None: none yet, or a script without)."""
        if step is None or (self.step is not None and step < self.step):
            return  # within an attempt the step only rises (the heartbeats lag the metrics)
        if self.phase == "starting" and step > self.resume_step:
            self.phase = "training"
        if self.step != step:
            self.step = step
            self._samples.append((now, step))
            while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
                self._samples.popleft()

    def on_metrics(self, record: dict[str, Any], now: float) -> None:
        """One record of ``metrics.jsonl``: a training step's (with ``loss``) or an eval's. Its
        step is newer than the heartbeats' (they are throttled); it counts only once this
        attempt trains (the file may still end in the failed attempt's steps)."""
        loss = record.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self.loss = float(loss)
            step = _int(record.get("step"))
            if self.phase == "training" and step is not None and step > (self.step or 0):
                self.on_step(step, now)
        tokens = record.get("tokens_per_s")
        if isinstance(tokens, (int, float)) and math.isfinite(tokens) and tokens > 0:
            self._tokens.append(float(tokens))

    @property
    def tokens_per_s(self) -> float | None:
        return sum(self._tokens) / len(self._tokens) if self._tokens else None

    def eta(self) -> float | None:
        """Seconds to the last step at the pace of this attempt's recent steps."""
        if self.total is None or self.step is None or len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 2.0 or s1 <= s0:  # too little to go on yet
            return None
        return max(0, self.total - s1) * (t1 - t0) / (s1 - s0)

    def line(self, now: float) -> str:
        """The status line: the known fields, most telling first."""
        parts = []
        if self.phase == "training" and self.step is not None:
            if self.total:
                pct = 100 * min(self.step, self.total) // self.total
                parts.append(f"step {self.step}/{self.total} ({pct}%)")
            else:
                parts.append(f"step {self.step}")
        elif self.phase == "training":
            parts.append("running")
        elif self.phase == "starting" and self.resume_step:
            parts.append(f"starting from step {self.resume_step}")
        else:
            parts.append(self.phase)
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.tokens_per_s is not None:
            parts.append(f"{_si(self.tokens_per_s)} tok/s")
        eta = self.eta() if self.phase == "training" else None
        if eta is not None:
            parts.append(f"ETA {clock(eta)}")
        if self.checkpoint_step is not None:
            parts.append(f"ckpt {self.checkpoint_step}")
        if self.attempt is not None:
            parts.append(f"attempt {self.attempt}")
        if self.restarts_left is not None:
            parts.append(f"restarts left {self.restarts_left}")
        parts.append(f"elapsed {clock(now - self.started)}")
        return "  ".join(parts)


class MetricsTail:
    """The trainer's ``metrics.jsonl``, read from its newest records on, incrementally."""

    def __init__(self, path: Path) -> None:
        # Only the newest records matter: never more than one read behind.
        self._follower = Follower(path, from_end=True, max_backlog=CHUNK)

    def records(self) -> list[dict[str, Any]]:
        """The records appended since the last call (a torn or foreign line is skipped)."""
        out = []
        for line in self._follower.read():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
