"""The supervisor's configuration: what to run, where, and how to watch it."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from runcontract import layout
from runcontract.cli import option
from supervisor.flag_groups import DETECTION, MULTI_NODE, OWN_SCRIPT, WORKERS
from supervisor.heartbeat import HangConfig
from supervisor.policy import PolicyConfig

_NNODES = re.compile(r"^[1-9]\d*(:[1-9]\d*)?$")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_TRAINER = PROJECT_ROOT / "trainer" / "train.py"
"""The script supervised when none is given."""


@dataclass(frozen=True)
class LaunchConfig:
    """One supervised run. Validation names the bad value; the CLI turns it into exit 2."""

    script: Path
    """The torchrun script every rank runs."""
    run_dir: Path
    """The run directory (absolute)."""
    script_args: tuple[str, ...] = ()
    """Arguments after the script."""
    nproc: int = option(
        1, "worker processes on this node", flags=("--nproc", "--nproc-per-node"), group=WORKERS
    )
    """Worker processes on this node (torchrun's ``--nproc-per-node``)."""
    nnodes: str = option("1", "nodes, N or MIN:MAX", group=MULTI_NODE)
    """Nodes, ``N`` or ``MIN:MAX``; more than one needs ``rdzv_endpoint``."""
    node_rank: int | None = option(None, "this node's rank", group=MULTI_NODE)
    """This node's rank among the nodes (None: assigned by the rendezvous)."""
    rdzv_endpoint: str | None = option(None, "rendezvous HOST:PORT", group=MULTI_NODE)
    """``HOST:PORT`` of the rendezvous; None on one node (a fresh local port each attempt)."""
    rdzv_backend: str = option("c10d", "rendezvous backend", group=MULTI_NODE)
    """torchrun's rendezvous backend for multi-node runs."""
    rdzv_id: str | None = option(
        None, "rendezvous id (default: the run dir's name)", group=MULTI_NODE
    )
    """Rendezvous id shared by all nodes (default: the run directory's name)."""
    rdzv_timeout: float = option(
        600.0,
        "seconds to wait for the other nodes to join before an attempt fails",
        group=MULTI_NODE,
    )
    """Multi-node: seconds torchrun waits for the other nodes to join a rendezvous before the
    attempt fails (torchrun's ``join_timeout``); the bound on waiting for a lost node."""
    slurm: bool = option(
        False,
        "take --nnodes, --node-rank, --rdzv-endpoint, --rdzv-id and the run dir from SLURM's "
        "environment; SIGUSR1/SIGTERM exit with the requeue code 79",
        group=MULTI_NODE,
    )
    """Launched by SLURM: SIGUSR1 and SIGTERM end the run with the requeue exit code."""
    log_max_mb: float = option(
        100.0,
        "cap on each worker log file (stdout, stderr), MB of disk; past it the newest 1 MB is "
        "kept as <file>.prev and the file starts again (0: no cap)",
        group=WORKERS,
    )
    ckpt_path: str | None = option(
        None,
        "glob of the script's own checkpoint files (relative to the working directory; ** spans "
        "folders): one written during an attempt counts as progress for the crash-loop guard "
        "(default: checkpoint-like files in the run dir and the working directory)",
        metavar="GLOB",
        group=OWN_SCRIPT,
    )
    """Where a script that keeps its own checkpoints writes them (a glob)."""
    done_marker: str | None = option(
        None,
        "a file the script creates once the job is finished (relative to the working "
        "directory): an attempt that fails after creating it (a rank aborting at exit) counts "
        "as finished",
        metavar="PATH",
        group=OWN_SCRIPT,
    )
    """A file whose creation during an attempt means the job finished."""
    standby: str = option(
        "on",
        "prepare the next attempt while this one trains (a torchrun whose workers import torch "
        "and the script's modules, then wait), so a recovery skips the cold start",
        choices=("on", "off"),
        group=WORKERS,
    )
    """``on``: keep a standby attempt waiting (``supervisor.standby``); one node only."""
    standby_import: str = option(
        "",
        "comma-separated modules a standby's workers import besides torch (your script's "
        "heavy imports); none may open a process group or a GPU context at import",
        metavar="MODULES",
        group=WORKERS,
    )
    """Modules a standby imports before its gate, besides torch (and the built-in trainer)."""
    poll_interval: float = 0.1
    """Seconds between cheap process checks."""
    heartbeat_interval: float = 0.5
    """Seconds between reads of the heartbeat files."""
    stop_grace: float = option(
        2.0, "after a failure, seconds between SIGTERM and SIGKILL", group=DETECTION
    )
    """After a failure: seconds between SIGTERM and SIGKILL for the surviving workers."""
    term_timeout: float = option(
        30.0,
        "on SIGINT/SIGTERM, seconds the workers get to write an emergency checkpoint before "
        "SIGKILL",
        group=DETECTION,
    )
    """On SIGINT/SIGTERM: seconds the workers get to write an emergency checkpoint."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    hang: HangConfig = field(default_factory=HangConfig)

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc {self.nproc}: needs at least 1 worker process")
        if not _NNODES.match(self.nnodes):
            raise ValueError(f"--nnodes {self.nnodes!r}: expected N or MIN:MAX with N >= 1")
        if self.nnodes != "1" and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes}: a multi-node run needs --rdzv-endpoint")
        if self.node_rank is not None and self.node_rank < 0:
            raise ValueError(f"--node-rank {self.node_rank}: must be >= 0")
        if self.rdzv_endpoint is not None and not re.match(r"^[^:\s]+:\d+$", self.rdzv_endpoint):
            raise ValueError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: expected HOST:PORT")
        for name in ("poll_interval", "heartbeat_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.rdzv_timeout <= 0:
            raise ValueError(f"--rdzv-timeout {self.rdzv_timeout}: must be > 0 seconds")
        if self.stop_grace < 0:
            raise ValueError(f"--stop-grace {self.stop_grace}: must be >= 0")
        if self.log_max_mb < 0:
            raise ValueError(f"--log-max-mb {self.log_max_mb}: must be >= 0 (0: no cap)")
        if self.standby not in ("on", "off"):
            raise ValueError(f"--standby {self.standby!r}: expected on or off")
        bad = [m for m in self.standby_modules() if not all(p.isidentifier() for p in m.split("."))]
        if bad:
            raise ValueError(f"--standby-import {bad[0]!r}: not a module name")
        if self.term_timeout < 0:
            raise ValueError(f"--term-timeout {self.term_timeout}: must be >= 0")

    def standby_modules(self) -> tuple[str, ...]:
        """``standby_import`` as a tuple of module names."""
        return tuple(m.strip() for m in self.standby_import.split(",") if m.strip())

    @property
    def single_node(self) -> bool:
        return self.nnodes == "1"

    def uses_checkpoint_store(self) -> bool:
        """Whether the run's checkpoints are ours to verify: the built-in trainer's always, a
        script's once anything stands at ``checkpoints`` (even something that is not a
        directory: the store's place is broken, not unused). A script that keeps its own
        snapshots is taken at its word (its exit codes)."""
        return self.script == BUILTIN_TRAINER or os.path.lexists(self.run_dir / layout.CHECKPOINTS)

    @property
    def heartbeat_dir(self) -> Path:
        return self.run_dir / layout.HEARTBEATS

    @property
    def node_tag(self) -> str:
        """This node's name in per-node file names: ``""`` on one node, ``node<R>`` with
        ``--node-rank R``, else ``node-<hostname>`` (nodes share the run directory, so each
        supervisor keeps its own lock, state, events and logs)."""
        if self.single_node:
            return ""
        if self.node_rank is not None:
            return f"node{self.node_rank}"
        return f"node-{socket.gethostname()}"

    def _per_node(self, name: tuple[str, str]) -> Path:
        return self.run_dir / layout.per_node_name(name, self.node_tag)

    @property
    def lock_file(self) -> Path:
        """Held by the one supervisor of this node (``supervisor.lock`` on one node)."""
        return self._per_node(layout.LOCK)

    @property
    def lock_owner_file(self) -> Path:
        """Who holds ``lock_file``: ``{pid, host, since}``, for the refusal message only."""
        return self._per_node(layout.LOCK_OWNER)

    @property
    def state_file(self) -> Path:
        """This node's state for ``launch.py status`` (``supervisor.json`` on one node)."""
        return self._per_node(layout.STATE)

    @property
    def events_file(self) -> Path:
        """This node's event log (``events.jsonl`` on one node)."""
        return self._per_node(layout.EVENTS)

    @property
    def log_root(self) -> Path:
        """Where this node's ``attempt-<N>`` log folders go."""
        tag = self.node_tag
        return self.run_dir / layout.LOGS / tag if tag else self.run_dir / layout.LOGS

    def attempt_log_dir(self, attempt: int) -> Path:
        return self.log_root / layout.attempt_dir_name(attempt)
