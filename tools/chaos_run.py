"""What the chaos tool sees of a supervised run, from outside: the run directory and psutil.

Everything here is read from the files the other parts publish (``supervisor.json``,
``heartbeats/rank-*.json``, ``checkpoints/``) and checked against the live process table before a
signal is sent, so a pid that was reused by an unrelated process is never touched. Nothing here
imports torch: the tool starts in a fraction of a second.

On a run directory shared by several nodes each supervisor names its files after its node
(``supervisor-<tag>.json``, ``supervisor-<tag>.lock``, ``events-<tag>.jsonl``); a view of one
node reads those, and takes as that node's workers only the heartbeats whose pid descends from
the node's own torchrun (heartbeats are named by global rank, so every node's are in one folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from runcontract import env, layout
from runcontract.events import EventType, read_jsonl
from runcontract.heartbeat import Phase
from runcontract.layout import node_tags, valid_node_tag
from runcontract.states import is_final

__all__ = ["RunView", "Snapshot", "TempDir", "node_tags", "valid_node_tag"]


@dataclass(frozen=True)
class TempDir:
    """A checkpoint being written: ``checkpoints/.tmp-step-XXXXXXXX-<host>-<pid>-<token>``."""

    path: Path
    step: int
    pid: int


@dataclass
class Snapshot:
    """One look at a running attempt."""

    attempt: int
    """The supervisor's current attempt number."""
    supervisor_pid: int
    torchrun_pid: int | None
    workers: dict[int, int] = field(default_factory=dict)
    """rank -> pid of the workers of this attempt that are alive and have left start-up."""
    phases: dict[int, str] = field(default_factory=dict)
    """rank -> the phase of its newest heartbeat."""
    step: int | None = 0
    """Highest step any live worker of this attempt reported; None for a script that writes
    no heartbeats (its step is not known)."""
    heartbeats: bool = True
    """False when the script writes no heartbeats: its workers are the supervisor's list."""

    @property
    def ready(self) -> bool:
        """True when every worker of the attempt is alive, past start-up and not finished."""
        return bool(self.workers) and all(
            p not in (Phase.STARTUP, Phase.DONE) for p in self.phases.values()
        )


class RunView:
    """Reads one run directory (one node's files of it, when ``node`` is given) and resolves
    its pids to live processes."""

    def __init__(self, run_dir: Path, node: str | None = None) -> None:
        self.run_dir = run_dir.absolute()
        self.node = node or None
        self.ckpt_dir = self.run_dir / layout.CHECKPOINTS
        self.heartbeat_dir = self.run_dir / layout.HEARTBEATS
        self.state_path = self.run_dir / layout.per_node_name(layout.STATE, self.node)
        self.lock_path = self.run_dir / layout.per_node_name(layout.LOCK, self.node)
        self.events_path = self.run_dir / layout.per_node_name(layout.EVENTS, self.node)
        self._real = os.path.realpath(self.run_dir)
        self.one_node_state = layout.per_node_name(layout.STATE, None)

    def layout_error(self) -> str | None:
        """Why this view does not fit the run directory, or None while it may: no node given
        for a multi-node directory, or a node given for a one-node one. A node whose state file
        is not there yet is not an error here (its supervisor may still be starting)."""
        if self.node is None:
            if (self.run_dir / self.one_node_state).exists():
                return None
            tags = node_tags(self.run_dir)
            if tags:
                return (
                    f"{self.run_dir} is a multi-node run directory (nodes: {', '.join(tags)}): "
                    "choose the node to attack with --node TAG"
                )
            return None
        if not self.state_path.exists() and (self.run_dir / self.one_node_state).exists():
            return (
                f"--node {self.node}: {self.run_dir} is a one-node run directory "
                f"({self.one_node_state}, no {self.state_path.name}); leave out --node"
            )
        return None

    # -- files ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any] | None:
        """The supervisor's ``supervisor.json`` (its node's ``supervisor-<tag>.json``), or None
        while it is absent or half-written."""
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def heartbeats(self) -> dict[int, dict[str, Any]]:
        """rank -> newest heartbeat record (unreadable files are skipped: they are being
        replaced right now, and the next look will see them)."""
        out: dict[int, dict[str, Any]] = {}
        if not self.heartbeat_dir.is_dir():
            return out
        for path in self.heartbeat_dir.glob(layout.HEARTBEAT_GLOB):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                out[int(record["rank"])] = record
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def _checkpoint_entries(self) -> list[os.DirEntry[str]]:
        """What ``checkpoints/`` holds now (nothing while it is absent or unreadable)."""
        try:
            return list(os.scandir(self.ckpt_dir))
        except OSError:
            return []

    def has_checkpoints(self) -> bool:
        """Whether the run has a checkpoint folder of the store."""
        return (self.run_dir / layout.CHECKPOINTS).is_dir()

    def committed(self) -> list[int]:
        """Steps of the committed-looking ``step-XXXXXXXX`` directories, oldest first."""
        steps = []
        for entry in self._checkpoint_entries():
            step = layout.parse_step(entry.name)
            if step is not None and entry.is_dir(follow_symlinks=False):
                steps.append(step)
        return sorted(steps)

    def temp_dirs(self) -> list[TempDir]:
        """Checkpoints being written right now (``.tmp-`` directories)."""
        out = []
        for entry in self._checkpoint_entries():
            work = layout.parse_work_name(entry.name)
            if work is not None and work.prefix == layout.TMP_PREFIX:
                out.append(TempDir(Path(entry.path), work.step, work.pid))
        return out

    def step_dir(self, step: int) -> Path:
        """The committed directory of ``step``."""
        return self.ckpt_dir / layout.step_name(step)

    def committed_since(self, attempt: int) -> list[int]:
        """Committed steps whose files were written after ``attempt`` was launched (its
        ``launch`` event): what that attempt's writer wrote. All committed steps when the
        launch cannot be found."""
        launches = [
            e["time"]
            for e in read_jsonl(self.events_path)
            if e.get("type") == EventType.LAUNCH and e.get("attempt") == attempt
        ]
        steps = self.committed()
        if not launches:
            return steps
        out = []
        for step in steps:
            try:
                # File times come from the kernel's coarse clock, up to a tick behind.
                if self.step_dir(step).stat().st_mtime >= launches[-1] - 0.05:
                    out.append(step)
            except OSError:
                continue  # pruned meanwhile
        return out

    # -- processes -----------------------------------------------------------------------------

    def is_run_process(self, pid: int) -> bool:
        """True when ``pid`` is alive (not a zombie) and runs with this run's ``ROSE_RUN_DIR``."""
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
        except (psutil.Error, OSError):
            return False
        value = env.run_dir_of(pid)
        return value is not None and os.path.realpath(value) == self._real

    def is_supervisor(self, pid: int) -> bool:
        """True when ``pid`` is alive and holds this run's ``supervisor.lock`` (its node's
        ``supervisor-<tag>.lock``) open."""
        lock = os.path.join(self._real, self.lock_path.name)
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return any(f.path == lock for f in proc.open_files())
        except (psutil.Error, OSError):
            return False

    def ended(self) -> bool:
        """True when the run is over: a final state was written, or its supervisor is gone."""
        state = self.state()
        if state is None:
            return False
        if is_final(state.get("state")):
            return True
        pid = int(state.get("supervisor_pid") or 0)
        return not pid or not self.is_supervisor(pid)

    def snapshot(self) -> Snapshot | None:
        """The running attempt as seen now, or None when no attempt is running."""
        state = self.state()
        if state is None or state.get("state") != "running":
            return None
        attempt = int(state.get("attempt") or 0)
        snap = Snapshot(
            attempt=attempt,
            supervisor_pid=int(state.get("supervisor_pid") or 0),
            torchrun_pid=state.get("torchrun_pid"),
        )
        listed = state.get("workers") or {}
        expected = {int(r) for r in listed if str(r).isdigit()}
        beats = self.heartbeats()
        for rank, record in beats.items():
            if record.get("attempt") != attempt:
                continue
            pid = int(record.get("pid") or 0)
            if not self.is_run_process(pid):
                continue
            if self.node is not None and not _descends_from(pid, snap.torchrun_pid):
                continue  # another node's worker
            snap.workers[rank] = pid
            snap.phases[rank] = str(record.get("phase"))
            snap.step = max(snap.step or 0, int(record.get("step") or 0))
        if not snap.workers and state.get("hang_detector") == "process":
            return self._silent_snapshot(snap, listed)
        # The supervisor lists a worker whose rank it could not read as "?<pid>"; then the
        # heartbeats say which rank each is, and only their number can be checked.
        complete = (
            set(snap.workers) == expected
            if len(expected) == len(listed)
            else len(snap.workers) == len(listed)
        )
        if not listed or not complete:
            snap.workers.clear()  # not every worker is up (or one already died): not ready
            snap.phases.clear()
        return snap

    def _silent_snapshot(self, snap: Snapshot, listed: dict[str, Any]) -> Snapshot:
        """A script without heartbeats: its workers are those the supervisor lists, once every
        one has a known rank and is alive; nothing is known of its step or phase."""
        snap.heartbeats, snap.step = False, None
        workers = {int(r): int(p) for r, p in listed.items() if str(r).isdigit()}
        if len(workers) == len(listed) and all(self.is_run_process(p) for p in workers.values()):
            snap.workers = workers
            snap.phases = {rank: "unknown" for rank in workers}
        return snap


def _descends_from(pid: int, ancestor: int | None) -> bool:
    """True when ``ancestor`` is a (grand)parent of the live process ``pid``."""
    if not ancestor:
        return False
    try:
        return any(p.pid == int(ancestor) for p in psutil.Process(pid).parents())
    except (psutil.Error, OSError):
        return False
