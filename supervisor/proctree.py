"""Processes of one attempt: start torchrun, find its workers, stop the whole tree.

torchrun runs in its own session with a parent-death signal, so it dies with the supervisor.
torchrun starts each worker in a session of its own, so signalling torchrun's group does not
reach them: the tree is tracked by pid (psutil, with creation times against pid reuse), and the
supervisor marks itself a child subreaper so that workers of a dead torchrun are re-parented to
it rather than to init, where the walk after each stop still finds them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from supervisor.attempt import StopReport
from trainer.supervised import PR_SET_PDEATHSIG, prctl

_PR_SET_CHILD_SUBREAPER = 36

_torchruns: set[int] = set()
"""Pids of the torchruns whose exit status a ``Popen`` of ours will read (an attempt's and a
standby's may live side by side): never reaped by the blanket reap of adopted workers."""


def set_child_subreaper() -> bool:
    """Make orphaned descendants of this process re-parent to it (Linux). True when set."""
    return prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _preexec_parent_death(parent: int, sig: int) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work.
    prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def start_in_new_session(
    cmd: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
    parent_death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session with stdout and stderr appended to ``log_path``.

    The child receives ``parent_death_signal`` when this process dies (Linux), which for torchrun
    means it stops its workers. Raises OSError when the command cannot be started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _preexec_parent_death(parent, parent_death_signal),
        )


def zombie_exit_status(pid: int) -> int | None:
    """Exit status of a zombie as waitpid(2) would report it, from /proc (Linux 3.5+), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "Z" or len(fields) < 50:
        return None
    try:
        return int(fields[49])  # field 52 of stat(5); fields[0] is field 3
    except ValueError:
        return None


def status_to_exit_code(status: int) -> int:
    """Convert a waitpid(2) status to Popen's convention: the code, or -signal."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Worker:
    """One worker process of an attempt (a direct child of torchrun)."""

    proc: psutil.Process
    rank: int | None
    local_rank: int | None
    exit_code: int | None = None
    gone_at: float | None = None
    """Supervisor monotonic time when it was first seen exited."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_rank(self) -> None:
        """Read RANK and LOCAL_RANK from the process's environment. Seen between torchrun's
        fork and its exec, a worker still has torchrun's environment, without them: the caller
        reads again at its next look until they are there."""
        try:
            environ = self.proc.environ()
            if "RANK" in environ:
                self.rank = int(environ["RANK"])
                self.local_rank = int(environ.get("LOCAL_RANK", "0"))
        except (psutil.Error, ValueError):
            pass


@dataclass
class AttemptTree:
    """torchrun and everything it started, tracked from launch until the final walk."""

    root: subprocess.Popen[bytes]
    workers: dict[int, Worker] = field(default_factory=dict)
    others: dict[int, psutil.Process] = field(default_factory=dict)
    """Descendants that are not workers (torchrun helpers, the workers' own children)."""

    def __post_init__(self) -> None:
        _torchruns.add(self.root.pid)
        try:
            self._root_proc: psutil.Process | None = psutil.Process(self.root.pid)
        except psutil.Error:
            self._root_proc = None

    @property
    def torchrun_pid(self) -> int:
        return self.root.pid

    def refresh(self, find_new: bool = True) -> list[Worker]:
        """Look for new processes under torchrun (unless not ``find_new``) and note exited
        workers.

        Returns the workers newly seen exited, earliest first. Never raises.
        """
        now = time.monotonic()
        if find_new and self._root_proc is not None and self.root.poll() is None:
            try:
                for child in self._root_proc.children(recursive=True):
                    self._track(child)
            except psutil.Error:
                pass
        exited = []
        for worker in self.workers.values():
            if worker.gone_at is not None:
                continue
            if worker.rank is None:
                worker.read_rank()
            if not _alive(worker.proc):
                status = zombie_exit_status(worker.pid)
                if status is not None:
                    worker.exit_code = status_to_exit_code(status)
                worker.gone_at = now
                exited.append(worker)
        return exited

    def _track(self, proc: psutil.Process) -> None:
        pid = proc.pid
        if pid in self.workers or pid in self.others:
            return
        try:
            parent = proc.ppid()
        except psutil.Error:
            return
        if parent != self.root.pid:
            self.others[pid] = proc
            return
        worker = Worker(proc, None, None)
        worker.read_rank()
        self.workers[pid] = worker

    def live_workers(self) -> list[Worker]:
        """Workers seen and not yet exited."""
        return [w for w in self.workers.values() if w.gone_at is None and _alive(w.proc)]

    def all_live(self) -> list[psutil.Process]:
        """Every tracked process still running, plus this process's other descendants
        (workers of a dead torchrun, re-parented here because we are a subreaper)."""
        procs: dict[int, psutil.Process] = {}
        tracked = [w.proc for w in self.workers.values()] + list(self.others.values())
        if self._root_proc is not None:
            tracked.append(self._root_proc)
        for proc in tracked:
            if _alive(proc):
                procs[proc.pid] = proc
        # Only descendants in the attempt's sessions: torchrun's, and each worker's own.
        sessions = {self.root.pid, *self.workers}
        try:
            descendants = psutil.Process().children(recursive=True)
        except psutil.Error:
            descendants = []
        for proc in descendants:
            try:
                if os.getsid(proc.pid) in sessions and _alive(proc):
                    procs.setdefault(proc.pid, proc)
            except (ProcessLookupError, PermissionError):
                continue
        return list(procs.values())

    def signal_workers(self, sig: int) -> int:
        """Send ``sig`` to every live worker and its own process group. Returns how many."""
        count = 0
        for worker in self.live_workers():
            if _send(worker.proc, sig, group=True):
                count += 1
        return count

    def stop(
        self, grace: float, torchrun_grace: float = 3.0, already_signalled: bool = False
    ) -> StopReport:
        """Stop the whole attempt; never leaves a process of it running.

        SIGTERM to the workers (unless ``already_signalled``), up to ``grace`` seconds for them to
        exit, SIGKILL for the rest; then up to ``torchrun_grace`` seconds for torchrun to notice
        and exit on its own (it logs each worker's exit code), SIGTERM and SIGKILL to its group
        after that (``torchrun_grace`` 0: SIGKILL at once, the quickest recovery); finally a walk
        that SIGKILLs anything of the attempt still alive.
        """
        start = time.monotonic()
        self.refresh()
        initial = {p.pid for p in self.all_live()}
        if not already_signalled:
            self.signal_workers(signal.SIGTERM)
        _wait_until(lambda: not self.live_workers(), grace)
        killed = 0
        for worker in self.live_workers():
            if _send(worker.proc, signal.SIGKILL, group=True):
                killed += 1
        _wait_until(lambda: not self.live_workers(), 5.0)
        if self.root.poll() is None and torchrun_grace > 0:
            _wait_until(lambda: self.root.poll() is not None, torchrun_grace)
            if self.root.poll() is None:
                _killpg(self.root.pid, signal.SIGTERM)
                _wait_until(lambda: self.root.poll() is not None, 2.0)
        if self.root.poll() is None:
            # With its workers gone torchrun holds nothing worth a graceful exit.
            _killpg(self.root.pid, signal.SIGKILL)
            try:
                self.root.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        leftovers = 0
        for _ in range(3):
            survivors = [p for p in self.all_live() if p.pid != os.getpid()]
            if not survivors:
                break
            for proc in survivors:
                if _send(proc, signal.SIGKILL, group=False):
                    leftovers += 1
            psutil.wait_procs(survivors, timeout=2.0)
        self._reap_adopted()
        workers = {w.pid for w in self.workers.values()}
        return StopReport(
            terminated=max(0, len(initial & workers) - killed - leftovers),
            killed=killed,
            leftovers=leftovers,
            seconds=time.monotonic() - start,
        )

    def _reap_adopted(self) -> None:
        # Workers re-parented to us stay zombies until waited for. Some die only after this
        # stop has returned (they notice their dead torchrun a moment later), so every stop
        # reaps all adopted zombies, not just this attempt's. Each torchrun is left to its
        # Popen, which expects to read its exit status itself.
        if self.root.poll() is not None:
            _torchruns.discard(self.root.pid)
        reap_zombie_children(exclude={self.root.pid, *_torchruns})


def reap_zombie_children(exclude: set[int]) -> int:
    """Reap this process's zombie children whose pid is not in ``exclude``; returns how many.

    A blanket ``waitpid(-1)`` would steal the exit status a ``Popen`` expects, so each zombie is
    waited for by its own pid.
    """
    reaped = 0
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return 0
    for child in children:
        if child.pid in exclude:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            os.waitpid(child.pid, os.WNOHANG)
            reaped += 1
        except (psutil.Error, ChildProcessError, OSError):
            continue
    return reaped


def _send(proc: psutil.Process, sig: int, group: bool) -> bool:
    try:
        if not proc.is_running():
            return False
        if group:
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, sig)
                    return True
            except (ProcessLookupError, PermissionError):
                pass
        proc.send_signal(sig)
        return True
    except (psutil.Error, ProcessLookupError, PermissionError):
        return False


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
