"""A standby attempt: the next attempt's torchrun, started while the current one trains.

Its workers run ``supervisor/gate.py``: they import torch and what the script needs, then wait
at the gate. After a failure the supervisor opens the gate with the checkpoint it chose, and the
script starts with its imports done, the most costly part of a cold start already behind it.
Every rank is still a fresh process, and torchrun is still the agent.

A standby serves only on one node (on several, a failure may have taken a node, and the peers'
rendezvous must be joined afresh). One that died or cannot serve is discarded, and the attempt
starts cold, as it would have without it: a standby never delays a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import gate
from supervisor.proctree import AttemptTree, start_in_new_session

GATE_SCRIPT = Path(gate.__file__).resolve()
STANDBY_DIR = "standby"
"""Folder of the run directory that holds each standby's gate (``standby/attempt-<N>/``)."""

# What every standby imports: torch and its distributed parts (torch._dynamo is imported when an
# optimizer is built, by add_param_group: 1.7 s of a cold start on its own).
BASE_PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo")
# What the built-in trainer imports besides: its whole module tree.
TRAINER_PRELOAD = ("trainer.train",)


def gate_dir(run_dir: Path, attempt: int) -> Path:
    return run_dir / STANDBY_DIR / f"attempt-{attempt}"


@dataclass
class Standby:
    """One standby torchrun and its gated workers, prepared for attempt ``attempt``."""

    attempt: int
    tree: AttemptTree
    gate_dir: Path
    nproc: int
    started_at: float
    """Supervisor monotonic time of its launch."""
    preload: tuple[str, ...]
    announced_ready: bool = False
    ready_info: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def launch(
        cls,
        command: list[str],
        env: dict[str, str],
        attempt: int,
        run_dir: Path,
        log_dir: Path,
        nproc: int,
        preload: tuple[str, ...],
        started_at: float,
    ) -> Standby:
        """Start a standby torchrun for ``attempt``. ``command`` is the attempt's torchrun
        command line; its script is wrapped by the gate. Raises OSError if it cannot start."""
        where = gate_dir(run_dir, attempt)
        # Gates of older standbys are of no more use; the running attempt's may still be read
        # by a worker that has not finished its imports.
        keep = gate_dir(run_dir, attempt - 1).name
        for old in where.parent.glob("attempt-*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        where.mkdir(parents=True)
        split = command.index("--")
        gated = [
            *command[: split + 1],
            str(GATE_SCRIPT),
            "--gate-dir",
            str(where),
            "--preload",
            ",".join(preload),
            "--",
            *command[split + 1 :],
        ]
        proc = start_in_new_session(
            gated, env, log_dir / "torchrun.log", parent_death_signal=signal.SIGTERM
        )
        # The workers compare their parent against this pid: one orphaned while it was still
        # importing would otherwise wait at a gate that never opens.
        tree = AttemptTree(proc)
        try:
            _write_atomically(where / gate.TORCHRUN_PID, f"{proc.pid}\n")
        except OSError:
            tree.stop(0.0, torchrun_grace=0.0)
            raise
        return cls(attempt, tree, where, nproc, started_at, preload)

    @property
    def torchrun_pid(self) -> int:
        return self.tree.torchrun_pid

    def problem(self) -> str | None:
        """Why this standby cannot serve now (its torchrun or a worker is gone), else None."""
        rc = self.tree.root.poll()
        if rc is not None:
            return f"its torchrun (pid {self.torchrun_pid}) exited with {rc}"
        exited = self.tree.refresh()
        gone = exited or [w for w in self.tree.workers.values() if w.gone_at is not None]
        if gone:
            w = gone[0]
            return f"its worker pid {w.pid} exited ({w.exit_code})"
        return None

    def read_ready(self) -> dict[int, dict[str, Any]]:
        """The workers that finished their imports, by rank (what each reported)."""
        for rank in range(self.nproc):
            if rank in self.ready_info:
                continue
            try:
                text = (self.gate_dir / gate.ready_name(rank)).read_text(encoding="utf-8")
                self.ready_info[rank] = json.loads(text)
            except (OSError, ValueError):
                continue
        return self.ready_info

    def ready(self) -> bool:
        return len(self.read_ready()) >= self.nproc

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each waiting worker, MB (as it reported once ready)."""
        return {
            str(rank): round(info["rss"] / 1e6, 1)
            for rank, info in sorted(self.read_ready().items())
            if isinstance(info.get("rss"), int)
        }

    def open(self, env: dict[str, str]) -> None:
        """Let the workers run the script with ``env`` added to their environment."""
        record = json.dumps({"env": env, "opened_at": time.time()})
        _write_atomically(self.gate_dir / gate.OPEN, record)

    def discard(self) -> None:
        """Stop the standby's whole tree at once and remove its gate."""
        self.tree.stop(0.0, torchrun_grace=0.0)
        shutil.rmtree(self.gate_dir, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
