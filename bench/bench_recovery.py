"""Recovery latency: SIGKILL of a worker → the first completed step after the resume.

Each trial is one real 2-rank run of the same job, and one SIGKILL of rank 1 once it has
passed a checkpoint. Side by side, over the same number of trials:

- under the supervisor (``launch.py``) with its standby attempt (the default; the kill waits
  until the standby is ready), and with ``--standby off``: the recovery split into its phases
  from events.jsonl (detect, stop, back off, launch, first step; see ``tools.report``), against
  the same run's cold start (launch → first step);
- under bare ``torchrun --max-restarts N`` on the same job (``--resume auto``): its latency
  (kill → first step after the resume, from metrics.jsonl) and how often it recovers at all.

    python bench/bench_recovery.py                      # 20 trials each
    python bench/bench_recovery.py --trials 3           # a quick look
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from common import (
    fmt,
    job_args,
    machine_line,
    median,
    quantile,
    read_jsonl,
    start_supervised,
    start_torchrun,
    stop_run,
    wait_exit,
    wait_heartbeat,
)

from runcontract import layout
from runcontract.events import EventType, EventWriter
from tools.report import PHASES, build_report

_RESUMED = re.compile(r"resumed from \S+ at step (\d+)")

# Seconds a run may take to reach the kill step (a start-up on a busy machine can take a minute).
START_TIMEOUT = 300.0
TARGET_SUCCESS = 1.0
TARGET_RATIO = 0.3
TARGET_DETECT = 0.2


def _standby_ready(run_dir: Path, proc: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(e["type"] == EventType.STANDBY_READY for e in read_jsonl(run_dir / "events.jsonl")):
            return True
        time.sleep(0.05)
    return False


def supervised_trial(run_dir: Path, args: argparse.Namespace, standby: bool) -> dict[str, Any]:
    """One supervised run with one worker SIGKILL; its phases, cold start and outcome."""
    flags = ["--backoff-initial", str(args.backoff), "--max-restarts", "3"]
    flags += ["--standby", "on" if standby else "off"]
    proc = start_supervised(run_dir, job_args(steps=args.steps, ckpt_every=args.ckpt_every), flags)
    try:
        if standby and not _standby_ready(run_dir, proc, START_TIMEOUT):
            return {"ok": False, "why": "the standby was never ready"}
        beat = wait_heartbeat(run_dir, proc, 1, 1, args.kill_at, START_TIMEOUT)
        if beat is None:
            return {"ok": False, "why": "never reached the kill step"}
        started = next(
            (
                e["time"]
                for e in read_jsonl(run_dir / "events.jsonl")
                if e["type"] == EventType.LAUNCH
            ),
            0.0,
        )
        # The kill is logged like the chaos tool logs it, so the report can time detection.
        log = EventWriter(run_dir / layout.per_node_name(layout.EVENTS, None), source="chaos")
        killed_at = time.time()
        psutil.Process(int(beat["pid"])).kill()
        log.write(EventType.FAULT_INJECTED, kind="kill-worker", pid=beat["pid"], rank=1,
                 step=beat["step"], attempt=1, time=killed_at)  # fmt: skip
        log.close()
        code = wait_exit(proc, _patience(args, run_dir, started))
    finally:
        stop_run(proc, run_dir)
    report = build_report(run_dir)
    ok = code == 0 and len(report.recoveries) == 1 and report.final_step == args.steps
    served = bool(report.recoveries) and report.recoveries[0].standby
    why = "" if ok else f"exit {code}"
    if ok and served != standby:
        ok, why = False, "the standby did not serve" if standby else "a standby served"
    out: dict[str, Any] = {"ok": ok, "why": why}
    if report.recoveries:
        rec = report.recoveries[0]
        out.update(rec.phases)
        out["total"] = rec.total
    out["cold"] = report.cold_start
    return out


def torchrun_trial(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One bare-torchrun run with one worker SIGKILL; its latency and outcome."""
    train = [*job_args(steps=args.steps, ckpt_every=args.ckpt_every), "--resume", "auto"]
    started = time.time()
    proc = start_torchrun(run_dir, train, ["--max-restarts", str(args.torchrun_restarts)])
    log_path = run_dir.parent / f"{run_dir.name}.log"
    try:
        victim, killed_at = None, None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
            if steps and steps[-1] >= args.kill_at:
                victim = _rank_pid(proc.pid, rank=1)
                if victim is not None:
                    killed_at = time.time()
                    psutil.Process(victim).kill()
                    break
            time.sleep(0.01)
        if killed_at is None:
            return {"ok": False, "why": "never reached the kill step"}
        code = wait_exit(proc, _patience(args, run_dir, started))
    finally:
        stop_run(proc, run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    step_time = {m["step"]: m["time"] for m in metrics if "loss" in m}
    log = log_path.read_text(errors="replace")
    resumed = [int(s) for s in _RESUMED.findall(log)]
    latency = None
    if resumed and step_time.get(resumed[-1] + 1, 0) > killed_at:
        latency = step_time[resumed[-1] + 1] - killed_at
    ok = code == 0 and max(step_time, default=0) == args.steps and latency is not None
    why = ""
    if not ok:
        why = "not recovered within the trial's time (killed)" if code is None else f"exit {code}"
        if "Connection refused" in log or "connectFullMesh" in log:
            why += ", gloo connection refused at re-init"
    first = step_time.get(1)
    return {
        "ok": ok,
        "why": why,
        "total": latency,
        "cold": (first - started) if first else None,
    }


def _patience(args: argparse.Namespace, run_dir: Path, started: float) -> float:
    """Seconds to wait for a recovery: the trial timeout, or 5 cold starts of this trial when
    that is longer (a busy machine slows every start; a slow recovery is not a failed one)."""
    first = next((m["time"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m), None)
    cold = first - started if first is not None and started else 0.0
    return max(args.trial_timeout, 5 * cold)


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of global rank ``rank`` (from its RANK variable)."""
    try:
        children = psutil.Process(torchrun_pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the trials and print Markdown tables; returns 0 (1 when no trial could run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of each (default 20)")
    parser.add_argument("--steps", type=int, default=800, help="steps per run (default 800)")
    parser.add_argument("--ckpt-every", type=int, default=5, help="(default 5)")
    parser.add_argument("--kill-at", type=int, default=8, help="kill once past step (default 8)")
    parser.add_argument(
        "--backoff", type=float, default=0.5, help="supervisor --backoff-initial (default 0.5)"
    )
    parser.add_argument(
        "--torchrun-restarts", type=int, default=3, help="torchrun --max-restarts (default 3)"
    )
    parser.add_argument(
        "--trial-timeout",
        type=float,
        default=90.0,
        help="seconds from the kill to recovery, at least (default 90)",
    )
    parser.add_argument(
        "--keep", default=None, help="keep the trials' run directories under this directory"
    )
    args = parser.parse_args(argv)
    if args.kill_at <= args.ckpt_every or args.kill_at >= args.steps:
        parser.error("--kill-at must lie after the first checkpoint and before the last step")

    print(machine_line())
    print(
        f"job: tiny preset, 2 ranks (gloo), {args.steps} steps, async checkpoint every "
        f"{args.ckpt_every} steps; rank 1 SIGKILLed once past step {args.kill_at} (with the "
        f"standby: once it is also ready); {args.trials} trials each, alternating; supervisor "
        "defaults except "
        f"--backoff-initial {args.backoff}; torchrun --standalone --max-restarts "
        f"{args.torchrun_restarts} (monitor interval 0.1 s, its default)"
    )
    ours: list[dict[str, Any]] = []
    cold_ones: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as scratch:
        tmp = args.keep or scratch
        for i in range(args.trials):
            ours.append(supervised_trial(Path(tmp) / f"ours-{i}", args, standby=True))
            cold_ones.append(supervised_trial(Path(tmp) / f"cold-{i}", args, standby=False))
            theirs.append(torchrun_trial(Path(tmp) / f"torchrun-{i}", args))
            print(
                f"  trial {i + 1}: "
                + "; ".join(
                    f"{name} {fmt(t.get('total'))} s {'ok' if t['ok'] else t['why']}"
                    for name, t in (
                        ("standby", ours[-1]),
                        ("standby off", cold_ones[-1]),
                        ("torchrun", theirs[-1]),
                    )
                ),  # fmt: skip
                file=sys.stderr,
                flush=True,
            )
    print()
    print(_tables(ours, cold_ones, theirs, args))
    return 0 if ours else 1


def _ratios(good: list[dict[str, Any]]) -> list[float]:
    return [t["total"] / t["cold"] for t in good if t.get("total") is not None and t.get("cold")]


def _tables(
    ours: list[dict[str, Any]],
    cold_ones: list[dict[str, Any]],
    theirs: list[dict[str, Any]],
    a: Any,
) -> str:
    good = [t for t in ours if t["ok"]]
    good_c = [t for t in cold_ones if t["ok"]]
    good_t = [t for t in theirs if t["ok"]]
    lines = ["Recovery phases under the supervisor (seconds; median and 95th percentile):", ""]
    lines.append("| phase | standby: median | p95 | standby off: median | p95 |")
    lines.append("|---|---:|---:|---:|---:|")
    for p in [*PHASES, "total"]:
        vals = [t.get(p) for t in good]
        vals_c = [t.get(p) for t in good_c]
        name = "**total: kill → first step**" if p == "total" else p.replace("_", " ")
        lines.append(f"| {name} | {fmt(median(vals), 3)} | {fmt(quantile(vals, 0.95), 3)} | "
                     f"{fmt(median(vals_c), 3)} | {fmt(quantile(vals_c, 0.95), 3)} |")  # fmt: skip
    lines.append("")

    total = median(t.get("total") for t in good)
    cold = median(t.get("cold") for t in good)
    ratios = _ratios(good)
    success = len(good) / len(ours) if ours else 0.0
    success_c = len(good_c) / len(cold_ones) if cold_ones else 0.0
    success_t = len(good_t) / len(theirs) if theirs else 0.0
    lines.append("| launcher | recovered | recovery (median s) | cold start (median s) | "
                 "recovery / cold start |")  # fmt: skip
    lines.append("|---|---:|---:|---:|---:|")
    lines.append(
        f"| supervisor (standby) | {len(good)}/{len(ours)} | {fmt(total, 2)} | {fmt(cold, 2)} | "
        f"{fmt(median(ratios), 2)} |"
    )
    lines.append(
        f"| supervisor --standby off | {len(good_c)}/{len(cold_ones)} | "
        f"{fmt(median(t.get('total') for t in good_c), 2)} | "
        f"{fmt(median(t.get('cold') for t in good_c), 2)} | {fmt(median(_ratios(good_c)), 2)} |"
    )
    total_t = median(t.get("total") for t in good_t)
    cold_t = median(t.get("cold") for t in good_t)
    ratio_t = median(
        t["total"] / t["cold"] for t in good_t if t.get("total") is not None and t.get("cold")
    )
    lines.append(
        f"| torchrun --max-restarts {a.torchrun_restarts} | {len(good_t)}/{len(theirs)} | "
        f"{fmt(total_t, 2)} | {fmt(cold_t, 2)} | {fmt(ratio_t, 2)} |"
    )
    fails = sorted({t["why"] for t in [*theirs, *ours, *cold_ones] if not t["ok"]})
    if fails:
        lines.append("")
        lines.append("Failed trials: " + "; ".join(fails))
    lines.append("")
    lines.append(
        "Cold start: supervisor, its `launch` event → first step in metrics.jsonl; torchrun, "
        "process start → first step. torchrun's recovery: kill → first step after its resume."
    )
    detect = [t.get("detect") for t in good]
    det_med, det_p95 = median(detect), quantile(detect, 0.95)
    ratio = median(ratios)
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    both = min(success, success_c)
    lines.append(
        f"| success 100% over ≥ 20 trials | standby {len(good)}/{len(ours)}, standby off "
        f"{len(good_c)}/{len(cold_ones)} ({success:.0%}, {success_c:.0%}; torchrun "
        f"{success_t:.0%}) | {_yes(both >= TARGET_SUCCESS and len(ours) >= 20)} |"
    )
    lines.append(
        f"| recovery with standby ≤ {TARGET_RATIO} × cold start | {fmt(ratio, 2)} × (median of "
        f"per-trial ratios) | {_yes(ratio is not None and ratio <= TARGET_RATIO)} |"
    )
    lines.append(
        f"| crash detection ≤ {TARGET_DETECT} s | median {fmt(det_med, 3)} s, p95 "
        f"{fmt(det_p95, 3)} s | {_yes(det_p95 is not None and det_p95 <= TARGET_DETECT)} |"
    )
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


if __name__ == "__main__":
    sys.exit(main())
