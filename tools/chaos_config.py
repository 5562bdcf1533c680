"""What the chaos tool injects, when and how often: its configuration, the flags generated from
it, and the ``launch.py --chaos SPEC`` shorthand for those flags.

Each flag comes from one ``ChaosConfig`` field (``writer_wait``: ``--writer-wait``): its type from
the annotation, its default and help text from the field, so neither is written twice. A tuple
field is a comma-separated list on the command line (``--at-steps 50,120``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runcontract.cli import (
    Parser,
    UsageError,
    add_flag,
    flag,
    flag_fields,
    flag_names,
    is_list,
    option,
    scalar,
)
from runcontract.layout import valid_node_tag

PROG = "python -m tools.chaos"

FAULTS: dict[str, str] = {
    "kill-worker": "SIGKILL of a random worker",
    "kill-writer": "SIGKILL of rank 0 while it writes a checkpoint (waits for a .tmp- directory)",
    "hang": "SIGSTOP of a random worker: a hang the supervisor must detect",
    "kill-torchrun": "SIGKILL of the torchrun process: a lost node",
    "corrupt": "rank 0 frozen, a byte of a payload file of the newest committed checkpoint "
    "flipped (or the file truncated), then rank 0 SIGKILLed",
    "preempt": "SIGTERM of the supervisor: a preemption (the run stops with exit 75)",
    "kill-supervisor": "SIGKILL of the supervisor (its workers must not outlive it)",
    "fill-disk": "fill the checkpoint directory's file system: checkpoint writes fail, "
    "training must go on",
    "hostile-file": "rank 0 frozen, a payload file of the newest committed checkpoint replaced "
    "by a named pipe, a link to itself or a link to /dev/zero, then rank 0 SIGKILLed",
}
"""Every fault kind and what it does."""

RANDOM = "random"
RANDOM_POOL = ("kill-worker", "kill-writer", "hang", "kill-torchrun", "corrupt")
"""The kinds ``random`` draws from: each one is recovered from by restarting, so a long run can
take any number of them."""

RESTARTING_FAULTS = frozenset((*RANDOM_POOL, "hostile-file"))
"""Kinds that end in a failed attempt, which the supervisor replaces with a new one; the others
(a preemption, a lost supervisor, a full disk) do not."""

HOSTILE_MODES = ("fifo", "symlink-loop", "dev-zero")
"""What ``hostile-file`` puts in a payload file's place: a named pipe (a reader that opens it
blocks), a link to itself (opening it fails with ELOOP), a link to ``/dev/zero`` (endless)."""
CORRUPT_MODES = ("any", "flip", "truncate", *HOSTILE_MODES)


@dataclass(frozen=True)
class ChaosConfig:
    """What to inject, when, and how often. A field with a help text is a flag; ``exclusive``
    ones exclude each other on the command line."""

    run_dir: Path = dataclasses.field(
        metadata={"help": "the run directory of a running supervisor"}
    )
    node: str | None = option(
        None,
        "on a multi-node run directory: the node to attack (node1 for supervisor-node1.json); "
        "required there, refused on one node",
        metavar="TAG",
    )
    faults: tuple[str, ...] = option(
        ("kill-worker",),
        "kind, or comma-separated kinds used in turn",
        flags=("--fault",),
        metavar="FAULT",
    )
    every: float | None = option(
        None,
        "seconds between injections (each waits for the run to be up again first)",
        exclusive=True,
    )
    at_steps: tuple[int, ...] = option(
        (), "comma-separated steps at which to inject, ascending", exclusive=True
    )
    count: int | None = option(
        None,
        "injections to make (default: one per --at-steps step, unlimited with --every, else 1)",
    )
    seed: int | None = option(
        None, "seed of every random choice (default: one is drawn and printed, for a replay)"
    )
    wait_start: float = option(120.0, "seconds to wait for the supervisor's supervisor.json")
    timeout: float | None = option(None, "give up after S seconds (exit 3)")
    writer_wait: float = option(
        120.0,
        "kill-writer: seconds to wait for a checkpoint write before trying the next attempt",
    )
    writer_delay: float = option(
        0.05,
        "kill-writer: kill at a seeded point up to S seconds into the write, or at once when the "
        "writer stopped itself at the store's test pause hook",
    )
    corrupt_mode: str = option(
        "any",
        "corrupt: flip a byte or truncate the file to half; hostile-file: a fifo, a symlink-loop "
        "or a dev-zero link in its place; any: a seeded choice",
        choices=CORRUPT_MODES,
    )
    fill_leave: int = option(64 * 1024, "fill-disk: bytes to leave free")
    fill_limit: int = option(
        256 * 1024 * 1024,
        "fill-disk: refuse to write more than this many bytes, so that a real, large disk is "
        "never filled",
        shown="256 MiB",
    )
    poll_interval: float = 0.05
    """Seconds between looks at the run (no flag: tests set it)."""

    def __post_init__(self) -> None:
        self._check_what()
        self._check_when()
        for name in ("wait_start", "writer_wait", "poll_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be > 0 seconds")
        if not self.writer_delay >= 0:
            raise ValueError(f"writer_delay={self.writer_delay!r}: must be >= 0 seconds")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout!r}: must be > 0 seconds")
        if self.corrupt_mode not in CORRUPT_MODES:
            raise ValueError(
                f"corrupt_mode={self.corrupt_mode!r}: must be one of {', '.join(CORRUPT_MODES)}"
            )
        if self.fill_leave < 0 or self.fill_limit <= 0:
            raise ValueError(
                f"fill_leave={self.fill_leave}, fill_limit={self.fill_limit}: "
                "must be >= 0 and > 0 bytes"
            )

    def _check_what(self) -> None:
        if self.node is not None and not valid_node_tag(self.node):
            raise ValueError(
                f"node={self.node!r}: not a node tag (e.g. node1, as in supervisor-node1.json)"
            )
        if not self.faults:
            raise ValueError("fault: give at least one kind")
        for kind in self.faults:
            if kind != RANDOM and kind not in FAULTS:
                raise ValueError(
                    f"fault={kind!r}: unknown kind (choose from {', '.join([*FAULTS, RANDOM])})"
                )

    def _check_when(self) -> None:
        if self.every is not None and not self.every > 0:
            raise ValueError(f"every={self.every!r}: must be > 0 seconds")
        if self.every is not None and self.at_steps:
            raise ValueError("every and at_steps: give one of them, not both")
        if any(s < 0 for s in self.at_steps) or list(self.at_steps) != sorted(self.at_steps):
            raise ValueError(f"at_steps={list(self.at_steps)}: must be ascending steps >= 0")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count={self.count!r}: must be >= 1")
        if self.count is not None and self.at_steps and self.count > len(self.at_steps):
            raise ValueError(
                f"count={self.count}: more than the {len(self.at_steps)} steps in at_steps"
            )

    @property
    def planned(self) -> int | None:
        """How many injections to make (None: until the run ends)."""
        if self.count is not None:
            return self.count
        if self.at_steps:
            return len(self.at_steps)
        return None if self.every is not None else 1


# -- command line ------------------------------------------------------------------------------


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The tool's flags: one per ChaosConfig field with a help text."""
    kinds = "\n".join(f"  {k:16} {v}" for k, v in FAULTS.items())
    p = Parser(
        prog=prog,
        description="Inject faults into a running supervised run, from outside.",
        epilog=f"fault kinds:\n{kinds}\n  {RANDOM:16} a seeded draw from {', '.join(RANDOM_POOL)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exclusive = p.add_mutually_exclusive_group()
    for f, hint in flag_fields(ChaosConfig):
        add_flag(exclusive if f.metadata.get("exclusive") else p, f, hint)
    return p


def _split(f: dataclasses.Field[Any], hint: Any, text: str | None) -> tuple[Any, ...]:
    """A comma-separated flag value as the field's tuple. Raises UsageError."""
    item = scalar(hint)
    try:
        return tuple(item(part.strip()) for part in (text or "").split(",") if part.strip())
    except ValueError:  # only numbers can fail to parse
        name = f.metadata.get("flags", (flag(f.name),))[0]
        raise UsageError(f"{name} {text!r}: give comma-separated integers") from None


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    """Validated configuration from parsed flags. Raises UsageError with one line."""
    values: dict[str, Any] = {
        f.name: _split(f, hint, getattr(args, f.name)) if is_list(hint) else getattr(args, f.name)
        for f, hint in flag_fields(ChaosConfig)
    }
    try:
        return ChaosConfig(**values)
    except ValueError as e:
        raise UsageError(flag_names(str(e))) from None


# -- alongside a job (``launch.py --chaos SPEC``) ------------------------------------------------

SPEC_KEYS = (
    "every",
    "at-steps",
    "count",
    "seed",
    "timeout",
    "corrupt-mode",
    "writer-wait",
    "writer-delay",
)
"""The options a SPEC may set; each is the flag of the same name."""


def spec_to_argv(spec: str) -> list[str]:
    """Turn a SPEC (``KIND[,KIND...][:key=value]...``) into the tool's flags (no run dir).

    Keys: every, at-steps, count, seed, timeout, corrupt-mode, writer-wait, writer-delay.
    Examples:
    ``kill-worker:every=30:count=3:seed=7``, ``hang,corrupt:at-steps=100,250``.
    Raises ValueError naming the bad part.
    """
    head, *options = spec.split(":")
    if not head.strip():
        raise ValueError(f"chaos spec {spec!r}: starts with no fault kind (e.g. kill-worker)")
    argv = ["--fault", head.strip()]
    for part in options:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SPEC_KEYS or not value.strip():
            raise ValueError(
                f"chaos spec {spec!r}: bad option {part!r} "
                f"(use key=value with key one of {', '.join(SPEC_KEYS)})"
            )
        argv += [f"--{key}", value.strip()]
    return argv


def parse_spec(spec: str, run_dir: Path, node: str | None = None) -> ChaosConfig:
    """The validated configuration a SPEC describes for ``run_dir`` (and its node ``node`` on a
    multi-node run). Raises ValueError."""
    try:
        args = build_parser().parse_args([str(run_dir), *node_argv(node), *spec_to_argv(spec)])
        return config_from_args(args)
    except UsageError as e:
        raise ValueError(f"chaos spec {spec!r}: {e}") from None


def node_argv(node: str | None) -> list[str]:
    """The flags that pick node ``node`` (none on one node)."""
    return ["--node", node] if node else []
