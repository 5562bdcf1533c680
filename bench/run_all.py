"""Run every benchmark and rewrite docs/benchmarks.md with their tables.

    python bench/run_all.py               # the full set (about half an hour on 2 quiet cores)
    python bench/run_all.py --quick       # few trials: checks that everything runs
    python bench/run_all.py --only recovery overhead   # rewrites only those sections

Each benchmark runs as its own process, one after the other (never two at once: they would
measure each other). A benchmark that fails leaves its output and exit status in the page
instead of stopping the rest. The sections of benchmarks not run this time, and the hand-written
last section ("Other measurements"), are kept from the page as it was.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DOC = REPO_ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Bench:
    """One benchmark script and the arguments of its full and quick runs."""

    name: str
    title: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    intro: str


BENCHES = (
    Bench(
        "recovery",
        "1. Recovery latency",
        "bench_recovery.py",
        ("--trials", "20"),
        ("--trials", "2"),
        "A worker SIGKILLed mid-run → the first completed training step after the resume, broken "
        "into phases from events.jsonl, against the job's cold start and against torchrun's own "
        "`--max-restarts` on the same job over the same number of trials.",
    ),
    Bench(
        "overhead",
        "2. Supervision overhead",
        "bench_overhead.py",
        ("--rounds", "4"),
        ("--rounds", "1", "--steps", "12", "--warmup", "3"),
        "Tokens/s of the same job under the supervisor (heartbeats on) and under bare torchrun, "
        "asynchronous checkpoints on in both; the supervised runs with the standby attempt and "
        "the memory tier each on and off.",
    ),
    Bench(
        "goodput",
        "3. Goodput under failures",
        "bench_goodput.py",
        ("--every", "60", "30"),
        ("--every", "60", "--steps", "60", "--configs", "auto", "disk 20"),
        "Useful steps per wall-clock second with a worker SIGKILLed every T seconds, under each "
        "save configuration, against the same job with no faults; the work lost per failure.",
    ),
    Bench(
        "checkpoint",
        "4. Checkpoint stall and throughput",
        "bench_checkpoint.py",
        (),
        ("--repeats", "1", "--layers", "2"),
        "How long an asynchronous checkpoint stalls the training loop, and how fast the store "
        "writes compared with the disk.",
    ),
    Bench(
        "throughput",
        "5. Training throughput",
        "bench_throughput.py",
        (),
        ("--steps", "8", "--warmup", "3"),
        "The trainer's own tokens/s, for reference.",
    ),
    Bench(
        "soak",
        "6. Soak: many faults in one run",
        "soak.py",
        ("--faults", "50"),
        ("--faults", "3"),
        "One supervised run takes random faults of mixed kinds (kill-worker, kill-writer, hang, "
        "kill-torchrun, corrupt) from the chaos tool and must end with the parameters of an "
        "uninterrupted run.",
    ),
    Bench(
        "gpu",
        "7. Device check",
        "gpu_check.py",
        (),
        ("--quick",),
        "Exact resume with and without `--deterministic` for each `--amp`, host reads and "
        "tokens/s fresh against resumed, the checkpoint stall and a save's host memory, and how "
        "fast a SIGKILLed process frees its GPU memory. CPU rows run everywhere; without a CUDA "
        "device each CUDA row is one line saying it was skipped: those rows await a run on a GPU "
        "(`python bench/gpu_check.py`, sized to finish within 10 minutes on one GPU).",
    ),
    Bench(
        "memory",
        "8. Memory tier",
        "bench_memory_tier.py",
        ("--kills", "20"),
        ("--kills", "2", "--clean-steps", "100"),
        "Steps lost per worker SIGKILL with the memory tier on (`--mem-every 5`) and off "
        "(`--mem-every 0`), and the fault-free steps/s it costs, side by side in one run.",
    ),
)

KEPT = "## Other measurements"
"""The page's last section: written by hand, kept as it is when the page is rewritten."""


def run_one(bench: Bench, quick: bool) -> tuple[str, str, int, float]:
    """Run one benchmark; (its command, its stdout, exit status, seconds). Its stderr (progress)
    goes straight to ours."""
    argv = [sys.executable, str(HERE / bench.script), *(bench.quick if quick else bench.full)]
    shown = shlex.join(["python", f"bench/{bench.script}", *argv[2:]])
    print(f"== {bench.title}: {shown}", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    return shown, proc.stdout, proc.returncode, time.monotonic() - started


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()


def old_sections(page: str) -> tuple[dict[str, str], str]:
    """A page's benchmark sections by title ("### ..." heading to the next heading), and its
    hand-written last section (from ``KEPT`` on; "" when it has none)."""
    body, _, kept = page.partition(KEPT)
    sections: dict[str, str] = {}
    for block in body.split("\n### ")[1:]:
        title, _, text = block.partition("\n")
        sections[title.strip()] = text.split("\n## ", 1)[0].strip("\n")
    return sections, (KEPT + kept).rstrip() + "\n" if kept else ""


def section(bench: Bench, shown: str, stdout: str, code: int, seconds: float) -> str:
    """One benchmark's section body: what it measures, the command and when, its output."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [bench.intro, "", f"`{shown}` ({seconds:.0f} s; commit `{_commit() or '?'}`, {when})", ""]
    if code != 0:
        out += [f"**This benchmark exited with status {code}**; its output follows.", ""]
    body = stdout.strip() or "(no output)"
    # Plain-text tables (not Markdown) keep their alignment only in a code block.
    out += [body if "|---" in body else f"```\n{body}\n```"]
    return "\n".join(out)


def render(sections: dict[str, str], kept: str) -> str:
    """The whole docs/benchmarks.md page from each benchmark's section body, in BENCHES order."""
    out = [
        "# Benchmarks",
        "",
        "How fast a run recovers, what supervision costs when nothing fails, and what failures "
        "cost in goodput — each measured side by side with the alternative (bare `torchrun`) in "
        "the same run on the same machine. Absolute seconds are shown; the claims are the ratios.",
        "",
        "## Commands",
        "",
        "```bash",
        "python bench/run_all.py            # every benchmark; rewrites this page",
        "python bench/run_all.py --quick    # a few trials each, to check that all of them run",
        "python bench/bench_recovery.py --trials 5     # any one of them alone prints its tables",
        "python launch.py report RUN_DIR    # the report of one run: summary + RUN_DIR/report.png",
        "python -m tools.report RUN_DIR    # the same report without the launcher",
        "```",
        "",
        "The run report prints the attempts, the failures by cause with the root-cause rank, each "
        "recovery's phases (detect, stop, back off, launch, first step), the steps lost per "
        "failure, the goodput and the newest valid checkpoint, and plots the loss curve with "
        "each failure and resume marked and a timeline of the attempts to `RUN_DIR/report.png`. "
        "The plot needs matplotlib (`pip install 'rosetrainer[report]'`); without it the text "
        "report still works and the plot is skipped with one line saying so.",
        "",
        "## Results",
        "",
        "Each section names the command that produced it, its commit and date, and starts with "
        "the machine it ran on and the load average when it started: on a shared, busy machine "
        "the absolute seconds grow, the side-by-side ratios much less.",
    ]
    for bench in BENCHES:
        if bench.title in sections:
            out += ["", f"### {bench.title}", "", sections[bench.title]]
    if kept:
        out += ["", kept.rstrip()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks and write the page; returns 0, or 1 when any benchmark failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few trials: a check, not a result")
    parser.add_argument(
        "--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these benchmarks"
    )
    parser.add_argument(
        "--output", type=Path, default=DOC, help="page to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    page = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
    sections, kept = old_sections(page)
    failed = False
    for bench in chosen:
        shown, stdout, code, seconds = run_one(bench, args.quick)
        sections[bench.title] = section(bench, shown, stdout, code, seconds)
        failed |= code != 0
        write_page(args.output, render(sections, kept))  # after each: a long run keeps its parts
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if failed else 0


def write_page(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
