"""``RUN_DIR/supervisor.json``: the supervisor's current state, and ``launch.py status``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from runcontract import layout
from runcontract.states import is_final
from trainer.supervised import pid_alive

STATE_FILE = layout.per_node_name(layout.STATE, None)


def write_state(run_dir: Path, state: dict[str, Any], path: Path | None = None) -> None:
    """Replace ``path`` (default ``RUN_DIR/supervisor.json``) atomically: write a temp file,
    then rename. Raises OSError."""
    path = path or run_dir / STATE_FILE
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_state(run_dir: Path, path: Path | None = None) -> dict[str, Any]:
    """The last state a supervisor wrote to ``path`` (default ``RUN_DIR/supervisor.json``).
    Raises FileNotFoundError when there is none, and ValueError when it is not valid JSON."""
    path = path or run_dir / STATE_FILE
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_node_states(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every node's state, by node tag (``""`` for a one-node run's ``supervisor.json``,
    ``node<R>`` for ``supervisor-node<R>.json``). Raises FileNotFoundError when there is none,
    and ValueError when a file is not valid JSON."""
    tags = layout.node_tags(run_dir, layout.STATE)
    if (run_dir / STATE_FILE).exists():
        tags.insert(0, "")
    if not tags:
        raise FileNotFoundError(run_dir / STATE_FILE)
    return {t: read_state(run_dir, run_dir / layout.per_node_name(layout.STATE, t)) for t in tags}


def format_status(run_dir: Path, state: dict[str, Any]) -> str:
    """The human summary printed by ``launch.py status``."""
    pid = int(state.get("supervisor_pid") or 0)
    final = is_final(state.get("state"))
    alive = bool(pid) and pid_alive(pid)
    shown_state = state.get("state", "?")
    if not final and not alive:
        shown_state = f"{shown_state} (supervisor pid {pid} is gone: the run is not running)"
    workers = state.get("workers") or {}
    worker_text = ", ".join(f"rank {r}: {p}" for r, p in workers.items()) or "none"
    left = state.get("restarts_left")
    updated = state.get("updated_at")
    age = f"{time.time() - float(updated):.1f} s ago" if updated else "?"
    lines = [
        f"run dir:      {run_dir}",
        *([f"node:         {state['node']}"] if state.get("node") else []),
        f"state:        {shown_state}",
        f"supervisor:   pid {pid or '?'}",
        f"attempt:      {state.get('attempt', '?')}",
        f"step:         {_step(state)}",
        f"hangs:        {_HANG_DETECTORS.get(str(state.get('hang_detector')), 'not known yet')}",
        f"torchrun:     pid {state.get('torchrun_pid') or '-'}",
        f"workers:      {worker_text}",
        *_standby(state),
        f"checkpoint:   {state.get('newest_valid_checkpoint') or 'none'} (chosen at the last "
        f"launch); newest on disk: {_newest_on_disk(run_dir) or 'none'}",
        f"memory:       {_memory_tier(run_dir)}",
        f"restarts:     {state.get('restarts_used', 0)} used, "
        f"{left if left is not None else '?'} left (of {state.get('max_restarts', '?')})"
        + _crash_loop(state),
    ]
    failures = state.get("checkpoint_write_failures")
    if failures:
        lines.append(
            f"CHECKPOINTS:  {failures} write(s) failed since the last good one; last: "
            f"{state.get('last_checkpoint_failure')}"
        )
    if state.get("exit_code") is not None:
        lines.append(f"exit code:    {state['exit_code']} ({state.get('exit_reason', '')})")
    lines.append(f"updated:      {age}")
    return "\n".join(lines)


_HANG_DETECTORS = {
    "heartbeats": "judged by the workers' heartbeats",
    "process": "judged by the process table (the script writes no heartbeats): a stopped "
    "rank, or every rank idle",
    "off": "not detected (--process-hang no, and the script writes no heartbeats)",
}


def _standby(state: dict[str, Any]) -> list[str]:
    """The waiting standby attempt: for which attempt, ready or importing, its memory."""
    standby = state.get("standby")
    if not isinstance(standby, dict):
        return []
    if standby.get("off"):
        return [f"standby:      off ({standby['off']})"]
    rss = standby.get("rss_mb") or {}
    memory = ", ".join(f"rank {r}: {mb} MB" for r, mb in rss.items())
    how = "ready" if standby.get("ready") else "importing"
    return [
        f"standby:      {how} for attempt {standby.get('for_attempt')} (torchrun pid "
        f"{standby.get('torchrun_pid')})" + (f"; resident memory {memory}" if memory else "")
    ]


def _step(state: dict[str, Any]) -> str:
    if state.get("step") is not None:
        return str(state["step"])
    if state.get("hang_detector") == "process":
        return "unknown (the script reports no steps: it writes no heartbeats)"
    return "none reported yet"


def _crash_loop(state: dict[str, Any]) -> str:
    """The crash-loop guard's count, when it is on and counting: it can end a run before the
    restarts are spent."""
    guard, count = state.get("crash_loop"), state.get("failures_without_progress")
    if not guard or not count:
        return ""
    return f"; {count} of {guard} failed attempts in a row without progress (--crash-loop)"


def _newest_on_disk(run_dir: Path) -> str | None:
    # Names only: status is read-only and quick, so nothing is verified here.
    try:
        names = [p.name for p in (run_dir / layout.CHECKPOINTS).iterdir()]
    except OSError:
        return None
    newest = max(names, key=layout.checkpoint_order, default=None)
    return newest if newest is not None and layout.parse_step(newest) is not None else None


def _memory_tier(run_dir: Path) -> str:
    """The memory tier's snapshots (names only, like the disk line) and where they are."""
    from trainer.checkpoint.memtier import memory_dir, memory_slots

    slots = memory_slots(run_dir)
    if not slots:
        return "no snapshot"
    return f"{', '.join(path.name for _, path in slots)} in {memory_dir(run_dir)}"
