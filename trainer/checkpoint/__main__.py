"""``python -m trainer.checkpoint ls RUN_DIR | verify PATH | inspect PATH``.

Exit codes: 0 everything shown is valid; 1 a checkpoint is invalid (``ls``: at least one);
2 bad usage or no such path; 3 written in a newer format than this code reads.
Read-only: nothing is quarantined, removed or locked.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointIncompatible, CheckpointInvalid
from .integrity import CheckpointInfo, list_checkpoints, verify
from .layout import CHECKPOINTS, MANIFEST
from .manifest import read as read_manifest
from .memtier import list_memory, memory_dir

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INCOMPATIBLE = 0, 1, 2, 3


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def cmd_ls(run_dir: Path) -> int:
    memory = list_memory(run_dir) if run_dir.is_dir() else []
    if not (run_dir / CHECKPOINTS).is_dir() and not memory:
        print(f"error: {run_dir} has no {CHECKPOINTS}/ directory", file=sys.stderr)
        return EXIT_USAGE
    rows = list_checkpoints(run_dir)
    print(f"{'step':>10}  {'size':>10}  status")
    _rows(rows)
    if not rows:
        print("(no checkpoints)")
    if memory:
        print(f"memory tier: {memory_dir(run_dir)}")
        _rows(memory)
    return EXIT_OK if all(r.valid for r in rows + memory) else EXIT_INVALID


def _rows(rows: list[CheckpointInfo]) -> None:
    for r in rows:
        status = "valid" if r.valid else f"INVALID: {r.reason}"
        print(f"{r.step:>10}  {_size(r.size):>10}  {status}")


def _checked(read: Callable[[Path], dict[str, Any]], path: Path) -> dict[str, Any] | int:
    """``read(path)``'s manifest, or the exit code after printing why the checkpoint is unusable."""
    try:
        return read(path)
    except CheckpointInvalid as e:
        print(f"INVALID {path}: {e.reason}")
        return EXIT_INVALID
    except CheckpointIncompatible as e:
        print(f"INCOMPATIBLE {path}: {e}")
        return EXIT_INCOMPATIBLE


def cmd_verify(path: Path) -> int:
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return EXIT_USAGE
    if (path / CHECKPOINTS).is_dir() and not (path / MANIFEST).exists():
        print(
            f"error: {path} is a run directory; give one checkpoint, or use `ls`", file=sys.stderr
        )
        return EXIT_USAGE
    man = _checked(verify, path)
    if isinstance(man, int):
        return man
    print(f"valid {path}: step {man['step']}, {len(man['files'])} files verified")
    return EXIT_OK


def cmd_inspect(path: Path) -> int:
    if not path.is_dir():
        print(f"error: {path} is not a checkpoint directory", file=sys.stderr)
        return EXIT_USAGE
    man = _checked(read_manifest, path)
    if isinstance(man, int):
        return man
    print(json.dumps(man, indent=2, sort_keys=True))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    ap = argparse.ArgumentParser(
        prog="python -m trainer.checkpoint", description="Inspect and verify checkpoints."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "ls", help="list a run's checkpoints: step, size, valid or why not"
    ).add_argument("run_dir", type=Path)
    sub.add_parser("verify", help="check one checkpoint's manifest, sizes and hashes").add_argument(
        "path", type=Path
    )
    sub.add_parser("inspect", help="print one checkpoint's manifest as JSON").add_argument(
        "path", type=Path
    )
    args = ap.parse_args(argv)
    if args.cmd == "ls":
        return cmd_ls(args.run_dir)
    if args.cmd == "verify":
        return cmd_verify(args.path)
    return cmd_inspect(args.path)


if __name__ == "__main__":
    sys.exit(main())
