"""The worker side of supervision: environment contract, heartbeats, parent watch.

Any torchrun script can take part in a supervised run in two or three lines::

    from trainer import supervised
    env = supervised.from_env()          # None when not supervised
    supervised.guard_parent()            # exit when the supervisor (or torchrun) is gone
    beat = supervised.Heartbeat(rank)    # no-op when not supervised
    beat(step, phase="train")            # throttled; always written on a phase change

The supervisor sets the ``ROSE_*`` variables documented in ``docs/architecture.md``; this module
only reads them. It imports nothing heavy (no torch), so tiny scripts start fast.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runcontract import env as env_names
from runcontract import layout
from runcontract.events import EventWriter
from runcontract.heartbeat import PHASES

ORPHAN_EXIT_CODE = 1
"""Exit status of a worker that found its supervisor or torchrun gone."""

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SupervisedEnv:
    """What the supervisor told this worker."""

    run_dir: Path
    """Absolute run directory."""
    attempt: int
    """Attempt number, 1-based."""
    resume_from: Path | None
    """Checkpoint directory every rank must load, or None for a fresh start."""
    heartbeat_dir: Path
    """Where ``rank-<R>.json`` heartbeats go."""
    supervisor_pid: int
    """The supervisor's pid."""
    events_file: Path | None = None
    """Where rank 0 appends its checkpoint events (``ROSE_EVENTS_FILE``, else the one-node
    ``RUN_DIR/events.jsonl`` when the supervisor made it); None: nowhere."""


def from_env(environ: Mapping[str, str] | None = None) -> SupervisedEnv | None:
    """Read the supervisor's environment contract.

    Returns None when ``ROSE_RUN_DIR`` is unset or empty (the run is not supervised).
    Raises ValueError, naming the variable, when a variable is present but malformed.
    """
    env = os.environ if environ is None else environ
    run_dir = env.get(env_names.RUN_DIR, "")
    if not run_dir:
        return None
    attempt = _int_var(env, env_names.ATTEMPT, default=1)
    if attempt < 1:
        raise ValueError(f"{env_names.ATTEMPT}={attempt} is not a positive attempt number")
    resume = env.get(env_names.RESUME_FROM, "")
    heartbeat_dir = env.get(env_names.HEARTBEAT_DIR, "") or os.path.join(run_dir, layout.HEARTBEATS)
    events = env.get(env_names.EVENTS_FILE, "")
    if not events:
        # Never create the one-node name in a run directory whose supervisors use per-node ones.
        one_node = os.path.join(run_dir, layout.per_node_name(layout.EVENTS, None))
        events = one_node if os.path.isfile(one_node) else ""
    return SupervisedEnv(
        run_dir=Path(run_dir).absolute(),
        attempt=attempt,
        resume_from=Path(resume).absolute() if resume else None,
        heartbeat_dir=Path(heartbeat_dir).absolute(),
        supervisor_pid=_int_var(env, env_names.SUPERVISOR_PID, default=0),
        events_file=Path(events).absolute() if events else None,
    )


def _int_var(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


class Events:
    """A worker's events, appended to the supervisor's events file beside its own (one
    ``EventWriter`` line each, so lines never interleave), marked ``source: trainer``.

    Call it with a dict holding ``type`` and the event's fields: it fits a checkpoint store's
    ``on_event``, and may be called from its writer thread. A no-op where ``env`` names no events
    file (not supervised, or not the rank that reports). An event that cannot be written (a full
    disk) costs one line on stderr, never the run.
    """

    def __init__(self, env: SupervisedEnv | None, source: str = "trainer") -> None:
        self._writer: EventWriter | None = None
        path = env.events_file if env is not None else None
        if path is None:
            return
        try:
            self._writer = EventWriter(path, source=source)
        except OSError as e:
            print(f"warning: cannot append events to {path}: {e}", file=sys.stderr, flush=True)

    def __call__(self, event: dict[str, Any]) -> None:
        writer = self._writer
        if writer is None:
            return
        fields = {k: v for k, v in event.items() if k not in ("type", "time")}
        try:
            writer.write(event["type"], **fields)
        except (OSError, ValueError) as e:
            print(
                f"warning: event {event['type']} not recorded in {writer.path}: {e}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        """Close the file (idempotent); later events are dropped."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def prctl(option: int, arg: int) -> bool:
    """``prctl(option, arg)`` on Linux; True when it succeeded, False elsewhere. Never raises."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    Returns True when armed, False where prctl is unavailable. Never raises.
    """
    return prctl(PR_SET_PDEATHSIG, int(sig))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


_guard_started = False
_guard_lock = threading.Lock()


def guard_parent(poll_interval: float = 0.5) -> bool:
    """Make this worker exit when its supervisor or its parent (torchrun) is gone: no orphans.

    Arms the parent-death signal (SIGKILL) where Linux offers it, and starts one daemon thread
    that checks every ``poll_interval`` seconds that the parent is unchanged and that
    ``ROSE_SUPERVISOR_PID`` is alive, and calls ``os._exit(ORPHAN_EXIT_CODE)`` when not. The
    thread watches liveness only; progress is reported by heartbeats from the training loop.
    Idempotent. Returns True when armed, False when not supervised (then it does nothing).
    """
    global _guard_started
    env = from_env()
    if env is None:
        return False
    with _guard_lock:
        if _guard_started:
            return True
        parent = os.getppid()
        set_parent_death_signal(signal.SIGKILL)
        # The parent may have died before prctl took effect; then we were re-parented already.
        supervisor = env.supervisor_pid
        if parent == 1 or (supervisor and not pid_alive(supervisor)):
            os._exit(ORPHAN_EXIT_CODE)
        thread = threading.Thread(
            target=_watch_parent,
            args=(parent, supervisor, poll_interval),
            name="rose-guard-parent",
            daemon=True,
        )
        thread.start()
        _guard_started = True
    return True


def _watch_parent(parent: int, supervisor: int, poll_interval: float) -> None:
    while True:
        time.sleep(poll_interval)
        if os.getppid() != parent or (supervisor and not pid_alive(supervisor)):
            try:
                sys.stderr.write(
                    f"rank process {os.getpid()}: supervisor or torchrun is gone; exiting\n"
                )
                sys.stderr.flush()
            finally:
                os._exit(ORPHAN_EXIT_CODE)


class Heartbeat:
    """Per-rank progress reports for the supervisor's hang detection.

    ``beat(step, phase)`` replaces ``heartbeats/rank-<R>.json`` atomically. Writes are throttled to
    one per ``min_interval`` seconds unless the phase changes, so calling it every step costs
    nothing measurable. Call it from the training loop itself: a beat from a background thread
    would hide a stuck loop. A no-op when the run is not supervised.
    """

    def __init__(
        self,
        rank: int,
        *,
        min_interval: float = 0.2,
        env: SupervisedEnv | None = None,
    ) -> None:
        """Prepare rank ``rank``'s heartbeat; ``env`` defaults to :func:`from_env`.

        Raises ValueError for a negative rank or interval.
        """
        if rank < 0:
            raise ValueError(f"rank={rank} must be >= 0")
        if min_interval < 0:
            raise ValueError(f"min_interval={min_interval} must be >= 0")
        self.rank = rank
        self.min_interval = min_interval
        self.env = env if env is not None else from_env()
        self._pid = os.getpid()
        self._last_time = float("-inf")
        self._last_phase: str | None = None
        self._last_step: int | None = None
        self._dir_ready = False
        if self.env is not None:
            self.path: Path | None = self.env.heartbeat_dir / layout.heartbeat_name(rank)
            self._tmp = self.env.heartbeat_dir / f".rank-{rank}.json.{self._pid}.tmp"
        else:
            self.path = None

    @property
    def enabled(self) -> bool:
        """True when the run is supervised and beats are written."""
        return self.env is not None

    def __call__(self, step: int, phase: str = "train") -> bool:
        """Report ``step`` completed optimizer steps in ``phase``.

        Returns True when a file was written, False when throttled or unsupervised.
        Raises ValueError for an unknown phase. I/O errors are swallowed: a full disk must not
        stop training (the supervisor then sees a stale heartbeat and treats it as a hang).
        """
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is not one of {', '.join(PHASES)}")
        if self.env is None:
            return False
        now = time.monotonic()
        if phase == self._last_phase and now - self._last_time < self.min_interval:
            return False
        record = {
            "rank": self.rank,
            "pid": self._pid,
            "attempt": self.env.attempt,
            "step": int(step),
            "phase": phase,
            "time": time.time(),
        }
        try:
            if not self._dir_ready:
                self.env.heartbeat_dir.mkdir(parents=True, exist_ok=True)
                self._dir_ready = True
            with open(self._tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(record))
            os.replace(self._tmp, self.path)  # type: ignore[arg-type]
        except OSError:
            return False
        self._last_time = now
        self._last_phase = phase
        self._last_step = int(step)
        return True

    beat = __call__


def write_owner(path: Path) -> None:
    """Record this process as a lock's holder in ``path`` (``{pid, host, since}``), replaced
    atomically: the supervisor's lock and the checkpoint writer lock each keep one, so that a
    process refused the lock can name who holds it."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, path)


def read_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) that ``write_owner`` recorded in ``path``; None when it is missing or torn."""
    try:
        info = json.loads(path.read_text())
        return int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
