"""Write checkpoints of the tiny model from a real process, for the checkpoint fault tests.

    python tests/scripts/ckpt_writer.py RUN_DIR --steps 1 2 3 [--pause-at PHASE] [--fsize BYTES]
        [--fail-fatal] [--hold] [--sync]

Trains the tiny model and saves after each listed step. ``--pause-at`` arms the store's test
pause hook for the *last* listed step only. ``--fsize`` sets RLIMIT_FSIZE (SIGXFSZ ignored, so an
oversized write fails with EFBIG) before the last save. ``--hold`` keeps the store (and its writer
lock) open until stdin closes. ``--fork P1 P2 …`` imports torch once, then forks one writer per
pause phase into ``RUN_DIR/<phase>``, prints ``{"type": "forked", "phase", "pid"}`` for each, and
reaps them once stdin closes (the test kills them by pid meanwhile). Prints one JSON line per
event on stdout. Exit codes: 0 done, 76 a checkpoint write failed under --fail-fatal, 77 the
writer lock is held elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys

from ckpt_model import fresh, train

from trainer.checkpoint import CheckpointLocked, CheckpointStore, CheckpointWriteFailed
from trainer.checkpoint.fsio import PAUSE_ENV


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--pause-at", default=None)
    ap.add_argument("--fsize", type=int, default=None)
    ap.add_argument("--fail-fatal", action="store_true")
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--fork", nargs="+", default=None)
    args = ap.parse_args()
    os.environ.pop(PAUSE_ENV, None)
    if args.fork:
        return fork_writers(args)
    return write(args)


def fork_writers(args: argparse.Namespace) -> int:
    children = []
    for phase in args.fork:
        pid = os.fork()
        if pid == 0:
            code = 1
            sys.stdout = open(os.devnull, "w")  # the parent's stdout is the protocol
            try:
                args.run_dir = os.path.join(args.run_dir, phase)
                args.pause_at = phase
                args.fork = None
                code = write(args)
            finally:
                os._exit(code)
        children.append(pid)
        print(json.dumps({"type": "forked", "phase": phase, "pid": pid}), flush=True)
    sys.stdin.read()
    for pid in children:
        os.waitpid(pid, 0)
    return 0


def write(args: argparse.Namespace) -> int:

    def event(e: dict) -> None:
        print(json.dumps(e), flush=True)

    try:
        store = CheckpointStore(
            args.run_dir,
            is_writer=True,
            keep_last=10,
            async_save=not args.sync,
            fail_fatal=args.fail_fatal,
            on_event=event,
        )
    except CheckpointLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 77
    print(json.dumps({"type": "ready", "pid": os.getpid()}), flush=True)
    model, opt = fresh(dim=args.dim, hidden=2 * args.dim)
    done = 0
    try:
        for i, step in enumerate(args.steps):
            train(model, opt, done, step)
            done = step
            if i == len(args.steps) - 1:
                if args.pause_at:
                    store.wait()
                    os.environ[PAUSE_ENV] = args.pause_at
                if args.fsize is not None:
                    store.wait()
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))
            store.save(step, model, opt, None, {"step": step}, {"tokens_seen": step * 32})
        if args.hold:
            sys.stdin.read()
        store.close()
    except CheckpointWriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 76
    return 0


if __name__ == "__main__":
    sys.exit(main())
