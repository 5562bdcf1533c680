"""Helpers for multi-node tests: one ``launch.py`` supervisor per "node" on this machine.

Each node's supervisor writes its own ``events-node<R>.jsonl`` and ``supervisor-node<R>.json``
into the shared run directory; these helpers read them, wait for events, and kill a node's whole
process tree at once (supervisor, torchrun and workers), as a lost machine would vanish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.scripts.harness import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch.py"


class Node:
    """One node's supervisor, started as ``python launch.py ... --node-rank R``."""

    def __init__(
        self,
        run_dir: Path,
        node_rank: int | None,
        args: list[str],
        env: dict[str, str],
        tag: str = "node",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.node_rank = node_rank
        self.tag = tag
        run_dir.mkdir(parents=True, exist_ok=True)
        self.err_path = run_dir.parent / f"{run_dir.name}-{tag}.err"
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(extra_env or {})
        rank_flag = ["--node-rank", str(node_rank)] if node_rank is not None else []
        with open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(LAUNCH), "--run-dir", str(run_dir), *rank_flag, *args],
                stdout=err,
                stderr=err,
                env=env,
                cwd=ROOT,
            )
        self.seen: dict[int, psutil.Process] = {}

    @property
    def name(self) -> str:
        return f"node{self.node_rank}" if self.node_rank is not None else ""

    @property
    def events_path(self) -> Path:
        return self.run_dir / (f"events-{self.name}.jsonl" if self.name else "events.jsonl")

    @property
    def state_path(self) -> Path:
        return self.run_dir / (f"supervisor-{self.name}.json" if self.name else "supervisor.json")

    @property
    def output(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events_path)

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    def note_tree(self) -> list[psutil.Process]:
        """The supervisor and every descendant now alive (remembered for the final cleanup)."""
        try:
            root = psutil.Process(self.proc.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            self.seen.setdefault(p.pid, p)
        return family

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        """Poll ``predicate(events)`` until it returns something truthy; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.note_tree()
            found = predicate(self.events())
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {what} within {timeout} s:\n{self.output[-3000:]}")

    def wait(self, timeout: float) -> int:
        """The supervisor's exit code; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout} s:\n"
                                     f"{self.output[-3000:]}")  # fmt: skip
            self.note_tree()
            time.sleep(0.2)
        return self.proc.returncode

    def kill_node(self) -> list[int]:
        """SIGKILL the supervisor, torchrun and the workers at once; returns their pids."""
        family = self.note_tree()
        for p in family:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=15)
        self.proc.wait(timeout=15)
        return [p.pid for p in family]

    def cleanup(self) -> None:
        """Kill whatever this node started that is still alive, and reap the supervisor."""
        self.note_tree()
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running():
                    p.send_signal(signal.SIGKILL)
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=15)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
