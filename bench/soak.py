"""Soak: one supervised run that takes many random faults, checked against an uninterrupted run.

``python bench/soak.py [--faults 50] [--seed 1] [--out DIR]`` runs the built-in trainer
(``tiny`` preset, CPU, 2 ranks) twice: once without faults (the reference) and once with the chaos
tool injecting ``--faults`` faults drawn from its ``random`` pool (kill-worker, kill-writer, hang,
kill-torchrun, corrupt) at evenly spaced steps. It prints:

    faults injected / recovered / params match reference / lost steps beyond the checkpoint interval

A fault counts as recovered when the next attempt resumed from a checkpoint and trained past it.
"Lost steps" of a fault are the steps trained before it that had to be redone (its step minus the
step resumed from); the checkpoint interval (or two for ``corrupt``, which discards the newest
checkpoint on purpose) is the expected loss, and only steps beyond it are reported. Exit code 0
when every fault was recovered and the parameters match, 1 otherwise. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine_line, read_jsonl

from runcontract import env as contract_env
from runcontract.events import EventType

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "trainer" / "train.py"


def _final_sha(run_dir: Path) -> str | None:
    attempts = sorted((run_dir / "logs").glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
    if not attempts:
        return None
    for log in attempts[-1].glob("ranks/*/attempt_*/0/stdout.log"):
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if "params_sha256=" in line:
                return line.rsplit("params_sha256=", 1)[1].strip()
    return None


def _launch(run_dir: Path, args: argparse.Namespace, env: dict[str, str]) -> subprocess.Popen:
    train = [
        "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(args.steps),
        "--warmup-steps", "5", "--eval-every", "0", "--log-every", "0", "--threads", "1",
        "--ckpt-every", str(args.ckpt_every), "--keep-last", "3",
    ]  # fmt: skip
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), "--nproc", "2",
        "--max-restarts", str(args.faults * 3 + 10), "--crash-loop", "0",
        "--backoff-initial", "0.05", "--backoff-max", "0.2", "--stop-grace", "1",
        "--hang-timeout", str(args.hang_timeout), "--require-heartbeats", "yes",
        str(TRAIN_PY), *train,
    ]  # fmt: skip
    log = open(run_dir.parent / f"{run_dir.name}.log", "wb")  # noqa: SIM115 - closed by the OS
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def summarize(events: list[dict[str, Any]], ckpt_every: int) -> dict[str, Any]:
    """Per-fault recovery and lost steps from one run's events."""
    faults = [e for e in events if e["type"] == EventType.FAULT_INJECTED]
    chosen = {e["attempt"]: e["step"] for e in events if e["type"] == EventType.CHECKPOINT_SELECTED}
    first = {e["attempt"]: e["step"] for e in events if e["type"] == EventType.FIRST_STEP}
    recovered, beyond, rows = 0, [], []
    for f in faults:
        nxt = f["attempt"] + 1
        resumed = chosen.get(nxt)
        ok = resumed is not None and first.get(nxt, -1) > resumed
        recovered += ok
        lost = f["step"] - resumed if resumed is not None else None
        allowed = ckpt_every * (2 if f["kind"] == "corrupt" else 1)
        extra = max(0, lost - allowed) if lost is not None else None
        if extra is not None:
            beyond.append(extra)
        rows.append(
            {"kind": f["kind"], "step": f["step"], "resumed": resumed, "lost": lost, "ok": ok}
        )
    by_kind: dict[str, int] = {}
    for f in faults:
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
    return {
        "faults": len(faults),
        "recovered": recovered,
        "by_kind": by_kind,
        "lost_beyond_total": sum(beyond),
        "lost_beyond_max": max(beyond, default=0),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the soak; returns 0 when every fault was recovered and the parameters match."""
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=50, help="faults to inject (default 50)")
    p.add_argument("--seed", type=int, default=1, help="the chaos tool's seed (default 1)")
    p.add_argument("--ckpt-every", type=int, default=4, help="checkpoint interval (default 4)")
    p.add_argument("--spacing", type=int, default=6, help="steps between faults (default 6)")
    p.add_argument("--hang-timeout", type=float, default=6.0, help="supervisor's (default 6)")
    p.add_argument("--out", default=None, help="keep the run directories here")
    args = p.parse_args(argv)
    if args.faults < 1 or args.spacing <= args.ckpt_every:
        p.error("--faults must be >= 1 and --spacing larger than --ckpt-every")
    args.steps = args.spacing * (args.faults + 1)
    base = Path(args.out or tempfile.mkdtemp(prefix="rose-soak-")).absolute()
    base.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != contract_env.CKPT_PAUSE_AT}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault(contract_env.DATA_CACHE, str(base / "data-cache"))

    started = time.monotonic()
    machine = machine_line()  # its load average is the one at the start
    ref_dir, soak_dir = base / "reference", base / "soak"
    for d in (ref_dir, soak_dir):
        shutil.rmtree(d, ignore_errors=True)
    ref = _launch(ref_dir, args, env)
    ref_rc = ref.wait()
    ref_sha = _final_sha(ref_dir)
    print(f"reference: exit {ref_rc}, params_sha256 {ref_sha}", file=sys.stderr, flush=True)

    sup = _launch(soak_dir, args, env)
    steps = ",".join(str(args.spacing * (i + 1)) for i in range(args.faults))
    tool = subprocess.run(
        [sys.executable, "-m", "tools.chaos", str(soak_dir), "--fault", "random",
         "--at-steps", steps, "--seed", str(args.seed)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    rc = sup.wait()
    sha = _final_sha(soak_dir)
    s = summarize(read_jsonl(soak_dir / "events.jsonl"), args.ckpt_every)
    match = sha is not None and sha == ref_sha
    seconds = time.monotonic() - started
    (base / "soak-summary.json").write_text(json.dumps(s, indent=2))
    print(tool.stdout[-4000:], end="", file=sys.stderr)  # progress, not the result
    print(f"details: {base / 'soak-summary.json'}; run dirs under {base}", file=sys.stderr)
    print(machine)
    print(
        f"job: tiny preset, 2 ranks (gloo), {args.steps} steps, checkpoint every "
        f"{args.ckpt_every} steps (keep 3); one fault every {args.spacing} steps by "
        f"`python -m tools.chaos --fault random --at-steps ... --seed {args.seed}`; "
        f"supervisor exit {rc}, chaos tool exit {tool.returncode}, {seconds:.0f} s in all"
    )
    print()
    print("| fault | injected | recovered |")
    print("|---|---:|---:|")
    for kind, n in sorted(s["by_kind"].items()):
        ok = sum(r["ok"] for r in s["rows"] if r["kind"] == kind)
        print(f"| {kind} | {n} | {ok} |")
    print()
    print(
        f"**faults injected {s['faults']} / recovered {s['recovered']} / params match reference "
        f"{'yes' if match else 'NO'} / lost steps beyond the checkpoint interval "
        f"{s['lost_beyond_total']}** (max {s['lost_beyond_max']} in one fault)"
    )
    if s["faults"] < args.faults:
        print(f"\nOnly {s['faults']} of the {args.faults} planned faults were injected.")
    all_recovered = s["recovered"] == s["faults"] == args.faults
    good = rc == 0 and tool.returncode == 0 and match and all_recovered
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
