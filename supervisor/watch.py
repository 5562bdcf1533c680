"""``launch.py status RUN_DIR --watch``: the status view, refreshed until the run ends.

On a terminal the view is redrawn in place (``rich``); without one, it is printed again each
time it changes. It ends when every node's state is final (exit 0), or when a supervisor is gone
while its state is not (exit 1: the run did not end, it was lost).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from runcontract.states import is_final
from supervisor.status import format_status, read_node_states
from trainer.supervised import pid_alive

LOST = 1
"""Exit code when a supervisor vanished before its run reached a final state."""


def view(run_dir: Path, states: dict[str, dict[str, Any]]) -> str:
    """Every node's status block."""
    return "\n\n".join(format_status(run_dir, state) for state in states.values())


def ended(states: dict[str, dict[str, Any]]) -> int | None:
    """0 when every node's state is final, LOST when a supervisor is gone before that, None
    while the run goes on."""
    if all(is_final(s.get("state")) for s in states.values()):
        return 0
    for s in states.values():
        pid = int(s.get("supervisor_pid") or 0)
        if not is_final(s.get("state")) and not (pid and pid_alive(pid)):
            return LOST
    return None


def watch(
    run_dir: Path,
    interval: float = 1.0,
    stream: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show the view until the run ends; returns 0 or LOST. Raises FileNotFoundError when the
    run directory has no state file."""
    out = stream if stream is not None else sys.stdout
    states = read_node_states(run_dir)
    live = _live(out)
    shown = ""
    try:
        while True:
            text = view(run_dir, states)
            if live is not None:
                from rich.text import Text

                live.update(Text(text), refresh=True)
            elif _without_age(text) != _without_age(shown):
                out.write(("\n" if shown else "") + text + "\n")
                out.flush()
            shown = text
            verdict = ended(states)
            if verdict is not None:
                return verdict
            sleep(interval)
            try:
                states = read_node_states(run_dir)
            except (OSError, ValueError):
                pass  # being replaced, or briefly unreadable: keep the last view
    finally:
        if live is not None:
            live.stop()


def _without_age(text: str) -> str:
    # "updated: 0.4 s ago" changes every look; a plain log gets a new block only on news.
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("updated:"))


def _live(stream: TextIO) -> Any:
    """A rich Live display on ``stream`` when it is a terminal, else None."""
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream, markup=False, highlight=False, emoji=False)
    if not console.is_terminal or console.is_dumb_terminal:
        return None
    live = Live(console=console, auto_refresh=False, vertical_overflow="visible")
    live.start()
    return live
