"""The entry point of a standby attempt's workers: import, wait at the gate, then run the script.

torchrun starts this file in place of the script while the previous attempt still trains::

    gate.py --gate-dir DIR --preload torch,trainer.train -- SCRIPT [ARGS...]

Each worker imports the ``--preload`` modules (the costly part of a start), says it is ready
(``DIR/ready-<rank>.json``: pid, seconds, resident memory), and waits, asleep but for a look at
the gate every ``POLL`` seconds, for the supervisor to open it: ``DIR/open.json`` holds the
environment the attempt runs with (the checkpoint chosen after the failure). The script then runs
as ``__main__`` exactly as torchrun would have run it, with its own folder first on ``sys.path``.

Nothing here opens a process group or touches a GPU: the ``--preload`` modules must not either
at import time (importing torch does not create a CUDA context). Only the standard library is
imported before the preload, so this file adds nothing to a worker's start.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import time

POLL = 0.02
"""Seconds between looks at the gate: 50 ``stat`` calls a second, near zero CPU."""
OPEN = "open.json"
TORCHRUN_PID = "torchrun.pid"
"""The standby torchrun's pid, written by the supervisor once it has started it."""


def ready_name(rank: int) -> str:
    """The file a worker of rank ``rank`` writes once its imports are done."""
    return f"ready-{rank}.json"


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _write_json(path: str, record: dict[str, object]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _parse(argv: list[str]) -> tuple[str, list[str], list[str]]:
    if "--" not in argv:
        raise SystemExit("gate.py: usage: --gate-dir DIR [--preload MODULES] -- SCRIPT [ARGS...]")
    split = argv.index("--")
    flags, script = argv[:split], argv[split + 1 :]
    opts = dict(zip(flags[::2], flags[1::2], strict=False))
    if "--gate-dir" not in opts or not script:
        raise SystemExit("gate.py: --gate-dir and a script are required")
    preload = [m for m in opts.get("--preload", "").split(",") if m]
    return opts["--gate-dir"], preload, script


def _torchrun_pid(gate_dir: str, parent_at_start: int) -> int:
    """The pid of the torchrun this worker belongs to: the one the supervisor recorded, else
    the parent this worker had when it started."""
    try:
        with open(os.path.join(gate_dir, TORCHRUN_PID), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return parent_at_start


def _wait_for_gate(gate_dir: str, parent_at_start: int) -> dict[str, object]:
    """Block until the gate opens. Exit if the gate is removed (the supervisor discarded this
    standby) or this worker's torchrun is gone: either way the gate will never open.

    The torchrun is not simply the parent seen now: it may have died while this worker was
    still importing, or even before this interpreter started, and then the parent is already
    whoever adopted the orphan."""
    torchrun = _torchrun_pid(gate_dir, parent_at_start)
    path = os.path.join(gate_dir, OPEN)
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            pass
        if os.getppid() != torchrun or not os.path.isdir(gate_dir):
            raise SystemExit(1)
        time.sleep(POLL)


def main(argv: list[str]) -> None:
    parent_at_start = os.getppid()
    gate_dir, preload, (script, *script_args) = _parse(argv)
    script = os.path.abspath(script)
    sys.path[0] = os.path.dirname(script)  # as if torchrun had started the script itself
    started = time.monotonic()
    failed: dict[str, str] = {}
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception as e:  # the script meets the same error when it runs, in its own way
            failed[module] = repr(e)
    rank = int(os.environ.get("RANK", "0"))
    ready: dict[str, object] = {
        "rank": rank,
        "pid": os.getpid(),
        "seconds": round(time.monotonic() - started, 3),
        "rss": _rss_bytes(),
        "preload_failed": failed,
    }
    try:
        _write_json(os.path.join(gate_dir, ready_name(rank)), ready)
    except OSError as e:  # only the report is lost: the gate may still open
        print(f"gate.py: cannot say ready: {e}", file=sys.stderr, flush=True)
    gate = _wait_for_gate(gate_dir, parent_at_start)
    env = gate.get("env")
    if isinstance(env, dict):
        os.environ.update({str(k): str(v) for k, v in env.items()})
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
