"""Running under SLURM: the allocation from SLURM's environment, and the requeue contract.

``launch.py --slurm`` (one supervisor per node, started by ``srun``) takes its multi-node
settings from the variables SLURM sets in every job step, so the same command line works on
every node:

- ``SLURM_JOB_NODELIST`` → the rendezvous host: the first host of the list, expanded here
  (``node[01-03]`` → ``node01``; no ``scontrol`` call, so it works inside any step);
- ``SLURM_NODEID`` → ``--node-rank``; ``SLURM_NNODES`` → ``--nnodes``;
- ``SLURM_JOB_ID`` → ``--rdzv-id`` and the default run directory ``runs/slurm-<job id>`` (a
  requeued job keeps its id, so it finds its run directory again).

Flags given on the command line win over the environment. SLURM's pre-timeout signal
(``sbatch --signal=USR1@T``) and its SIGTERM end the run with ``exit_codes.REQUEUE`` after the
workers' emergency checkpoint (see examples/slurm.sbatch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500
"""Rendezvous port on the first node when ``--rdzv-endpoint`` is not given."""

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class SlurmError(ValueError):
    """SLURM's environment is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class SlurmAllocation:
    """What SLURM says about this job step."""

    job_id: str
    """``SLURM_JOB_ID`` (the same after a requeue)."""
    nnodes: int
    """``SLURM_NNODES``: nodes in the allocation."""
    node_rank: int
    """``SLURM_NODEID``: this node's index in the allocation, 0-based."""
    first_host: str
    """The first host of ``SLURM_JOB_NODELIST``: where the rendezvous is hosted."""

    def rdzv_endpoint(self, port: int = DEFAULT_PORT) -> str:
        """``HOST:PORT`` of the rendezvous on the first node."""
        return f"{self.first_host}:{port}"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, expanded: ``"node[01-03,07],gpu1"`` → ``"node01"``.

    Zero padding is kept. Raises SlurmError for an empty or malformed list.
    """
    text = nodelist.strip()
    if not text:
        raise SlurmError("SLURM_JOB_NODELIST is empty")
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first host ends at the first comma outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    host = text[:end]
    out = []
    rest = host
    while "[" in rest:
        prefix, _, tail = rest.partition("[")
        inside, closed, rest = tail.partition("]")
        first = inside.split(",")[0]
        match = _RANGE.match(first)
        if not closed or match is None:
            raise SlurmError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the host range")
        out += [prefix, match.group(1)]
    out.append(rest)
    name = "".join(out)
    if not name or "]" in name:
        raise SlurmError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the first host")
    return name


def from_env(environ: Mapping[str, str] | None = None) -> SlurmAllocation:
    """Read the allocation from SLURM's variables.

    Raises SlurmError, naming the variable, when one is missing or malformed (for example when
    ``--slurm`` is given outside a SLURM job).
    """
    env = os.environ if environ is None else environ

    def need(name: str) -> str:
        value = env.get(name, "").strip()
        if not value:
            raise SlurmError(f"--slurm: {name} is not set (is this running inside a SLURM job?)")
        return value

    def integer(name: str, least: int) -> int:
        value = need(name)
        try:
            number = int(value)
        except ValueError:
            raise SlurmError(f"{name}={value!r} is not an integer") from None
        if number < least:
            raise SlurmError(f"{name}={number} must be >= {least}")
        return number

    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not nodelist.strip():
        raise SlurmError("--slurm: SLURM_JOB_NODELIST is not set (is this inside a SLURM job?)")
    allocation = SlurmAllocation(
        job_id=need("SLURM_JOB_ID"),
        nnodes=integer("SLURM_NNODES", 1),
        node_rank=integer("SLURM_NODEID", 0),
        first_host=first_host(nodelist),
    )
    if allocation.node_rank >= allocation.nnodes:
        raise SlurmError(
            f"SLURM_NODEID={allocation.node_rank} is outside SLURM_NNODES={allocation.nnodes}"
        )
    return allocation
