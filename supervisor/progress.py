"""What a script that keeps its own checkpoints wrote during an attempt: the crash-loop guard's
evidence of progress when there is no checkpoint of ours to count.

With ``--ckpt-path GLOB`` the files matching it count. Without it, a bounded look at the run
directory and the working directory finds checkpoint-like files (by suffix or name) written since
the attempt's launch: where the PyTorch tutorial's ``snapshot.pt`` or nanoGPT's ``out/ckpt.pt``
land. The look skips hidden folders, virtualenvs and the supervisor's own files, goes at most
``MAX_DEPTH`` folders down and stops after ``MAX_ENTRIES`` entries, so a working directory full
of data costs little.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from runcontract import layout

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".pkl", ".npz", ".h5")
CHECKPOINT_WORDS = ("ckpt", "checkpoint", "snapshot")
# Files named for checkpoints that hold none: source, text, logs, settings.
_TEXT_SUFFIXES = (
    ".py", ".md", ".rst", ".txt", ".json", ".jsonl", ".log", ".yaml", ".yml", ".toml", ".cfg",
    ".ini", ".sh", ".ipynb", ".c", ".h", ".cpp", ".html", ".csv",
)  # fmt: skip
MAX_DEPTH = 3
MAX_ENTRIES = 5000
# The supervisor's own folders in a run directory (its checkpoints are counted apart).
_OURS = {layout.LOGS, layout.HEARTBEATS, layout.CHECKPOINTS, layout.METRICS, "__pycache__"}


def files_written_since(pattern: str | None, roots: list[Path], since: float) -> list[str]:
    """Files written at or after ``since`` (seconds since the epoch), newest first: those
    matching ``pattern`` when given, else checkpoint-like files under ``roots``."""
    names = glob.glob(pattern, recursive=True) if pattern else _checkpoint_like(roots)
    found = []
    for name in set(names):
        try:
            mtime = os.stat(name).st_mtime
        except OSError:
            continue
        if mtime >= since:
            found.append((mtime, name))
    return [name for _, name in sorted(found, reverse=True)]


def state_left_behind(cwd: Path, run_dir: Path, before: float) -> list[str]:
    """Checkpoint-like files in the working directory (at most one folder down, outside any
    run directory) last written before ``before``: state of an earlier run that a script
    resuming from its working directory would take for its own."""
    if cwd.resolve() == run_dir.resolve():
        return []
    found: list[str] = []
    _walk(cwd.resolve(), 1, found, [MAX_ENTRIES], top=True)
    old = []
    for name in found:
        try:
            if os.stat(name).st_mtime < before:
                old.append(name)
        except OSError:
            continue
    return sorted(old)


def looks_like_checkpoint(name: str) -> bool:
    """Whether a file name looks like a model checkpoint."""
    lower = name.lower()
    if lower.endswith(CHECKPOINT_SUFFIXES):
        return True
    return not lower.endswith(_TEXT_SUFFIXES) and any(w in lower for w in CHECKPOINT_WORDS)


def _checkpoint_like(roots: list[Path]) -> list[str]:
    found: list[str] = []
    budget = [MAX_ENTRIES]
    for root in dict.fromkeys(r.resolve() for r in roots):
        _walk(root, MAX_DEPTH, found, budget, top=True)
    return found


def _is_run_dir(entries: list[os.DirEntry[str]]) -> bool:
    names = {e.name for e in entries}
    return layout.per_node_name(layout.STATE, None) in names


def _walk(folder: Path, depth: int, found: list[str], budget: list[int], top: bool) -> None:
    """Checkpoint-like files under ``folder``, ``depth`` folders down at most, into ``found``;
    ``budget`` bounds the entries looked at."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    if any(e.name == "pyvenv.cfg" for e in entries):
        return  # a virtualenv
    if not top and _is_run_dir(entries):
        return  # another run's directory: its state is its own
    for entry in entries:
        budget[0] -= 1
        if budget[0] < 0:
            return
        if entry.name.startswith(".") or entry.name in _OURS:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                if depth > 0:
                    _walk(Path(entry.path), depth - 1, found, budget, top=False)
            elif entry.is_file(follow_symlinks=False) and looks_like_checkpoint(entry.name):
                found.append(entry.path)
        except OSError:
            continue
