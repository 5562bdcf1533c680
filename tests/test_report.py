"""The run report (``tools.report``) on a real supervised run with two recoveries.

The supervisor runs the real trainer on 2 CPU ranks; the chaos tool SIGKILLs a worker twice. The
report's numbers are checked against the same numbers computed here straight from the raw
``events.jsonl`` lines, and the plot is opened and checked for content.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runcontract import exit_codes
from tests.scripts.harness import FAST, ROOT, Launched
from tools.report import (
    PHASES,
    Report,
    ReportError,
    build_report,
    build_reports,
    main,
    png_path,
    render_png,
    render_text,
)

STEPS = 40
CKPT_EVERY = 5
KILL_AT = (8, 24)
TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(STEPS),
    "--warmup-steps", "5", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--ckpt-every", str(CKPT_EVERY), "--no-ckpt-skip-busy",
]  # fmt: skip
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def recovered_run(tmp_path_factory: pytest.TempPathFactory, train_env: dict[str, str]) -> Path:
    """A finished run directory: 3 attempts, a worker SIGKILLed in each of the first two."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    run = Launched(run_dir, ["--nproc", "2", *FAST, "--", *TRAIN_ARGS], env=train_env)
    chaos = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.chaos",
            str(run_dir),
            "--fault",
            "kill-worker",
            "--at-steps",
            ",".join(map(str, KILL_AT)),
            "--seed",
            "3",
            "--timeout",
            str(RUN_TIMEOUT),
        ],  # fmt: skip
        cwd=ROOT,
        env=train_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        chaos_out, _ = chaos.communicate(timeout=RUN_TIMEOUT + 10)
        assert chaos.returncode == 0, chaos_out
        assert run.wait(RUN_TIMEOUT) == exit_codes.SUCCESS, run.stderr[-3000:]
        return run_dir
    finally:
        if chaos.poll() is None:
            chaos.kill()
            chaos.communicate()
        run.kill_all()


def _raw_events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _expected(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's numbers, computed directly from the event lines."""
    launches = [e for e in events if e["type"] == "launch"]
    failed = [e for e in events if e["type"] == "worker_failed"]
    out: dict[str, Any] = {"attempts": len(launches), "failures": []}
    for f in failed:
        a = f["attempt"]
        launch = next(e for e in launches if e["attempt"] == a)
        window = [e for e in events if launch["time"] <= e["time"] <= f["time"]]
        nxt = next(e for e in launches if e["attempt"] == a + 1)
        # The highest step the events report, or the checkpoint resumed from, which proves its
        # step was reached.
        reached = max(
            [nxt["resume_step"]]
            + [
                e["step"]
                for e in window
                if e.get("attempt") == a
                and e["type"] in ("fault_injected", "first_step", "worker_failed")
                and isinstance(e.get("step"), int)
            ]
        )
        fault = next(e for e in window if e["type"] == "fault_injected")
        stopped = next(e for e in events if e["type"] == "stopped" and e["attempt"] == a)
        started = next(
            e for e in events if e["type"] == "workers_started" and e["attempt"] == a + 1
        )
        out["failures"].append(
            {
                "rank": f["rank"],
                "pid": f["pid"],
                "signal": f["signal"],
                "step": reached,
                "resumed_from": nxt["resume_step"],
                "lost": reached - nxt["resume_step"],
                "detect": f["time"] - fault["time"],
                "stop": stopped["time"] - f["time"],
                "backoff": nxt["time"] - stopped["time"],
                "launch": started["time"] - nxt["time"],
                "workers_started": started["time"],
            }
        )
    begin = next(e for e in events if e["type"] == "supervisor_started")
    done = next(e for e in events if e["type"] == "done")
    out["final_step"] = done["step"]
    out["wall"] = done["time"] - begin["time"]
    out["goodput"] = done["step"] / out["wall"]
    return out


@pytest.mark.distributed
@pytest.mark.chaos
@pytest.mark.slow
def test_summary_matches_the_events_file(recovered_run: Path) -> None:
    events = _raw_events(recovered_run)
    want = _expected(events)
    report = build_report(recovered_run)

    assert want["attempts"] == 3
    assert len(report.attempts) == 3
    assert [a.outcome for a in report.attempts] == ["failed", "failed", "succeeded"]
    assert report.end_state == "succeeded"
    assert len(report.failures) == len(want["failures"]) == 2
    assert len(report.recoveries) == 2
    for got, exp, rec in zip(report.failures, want["failures"], report.recoveries, strict=True):
        assert (got.rank, got.pid, got.signal) == (exp["rank"], exp["pid"], "SIGKILL")
        assert got.cause == "worker killed by SIGKILL" and got.injected == "kill-worker"
        assert got.step == exp["step"]
        assert got.resumed_from == exp["resumed_from"]
        assert got.resumed_from is not None and got.step is not None
        # A disk checkpoint (a multiple of CKPT_EVERY) or a memory snapshot (any step).
        assert got.resumed_from <= got.step
        assert got.steps_lost == exp["lost"] >= 0
        for phase in ("detect", "stop", "backoff", "launch"):
            assert rec.phases[phase] == pytest.approx(exp[phase], abs=1e-6), phase
        # The first step comes from metrics.jsonl: after the workers started, not after the
        # supervisor noticed it (the first_step event).
        assert rec.first_step_source == "metrics"
        first_step = rec.phases["first_step"]
        assert first_step is not None and first_step > 0
        assert rec.total == pytest.approx(sum(rec.phases[p] or 0.0 for p in PHASES))
    assert report.steps_lost == sum(f["lost"] for f in want["failures"])
    assert report.final_step == want["final_step"] == STEPS
    assert report.useful_steps == STEPS
    assert report.wall_seconds == pytest.approx(want["wall"], abs=1e-6)
    assert report.goodput == pytest.approx(want["goodput"], rel=1e-9)
    assert report.cold_start is not None and 0 < report.cold_start < want["wall"]
    assert report.newest_checkpoint is not None and report.newest_checkpoint.step == STEPS
    assert report.causes() == [("worker killed by SIGKILL", 2, [f.rank for f in report.failures])]
    assert [s for s, _ in report.loss] == list(range(1, STEPS + 1))

    text = render_text(report)
    assert "succeeded; 3 attempt(s), 2 failure(s)" in text
    assert f"0 -> {STEPS} ({STEPS} useful, {report.steps_lost} lost to failures)" in text
    assert f"{want['goodput']:.2f} useful steps/s" in text
    assert f"2 x worker killed by SIGKILL: rank {report.failures[0].rank}" in text
    assert f"newest valid step {STEPS}" in text
    for exp in want["failures"]:
        assert f"{exp['detect']:.3f}" in text and f"{exp['stop']:.3f}" in text


@pytest.mark.distributed
@pytest.mark.chaos
@pytest.mark.slow
def test_command_prints_the_summary_and_writes_a_png_with_content(
    recovered_run: Path, tmp_path: Path
) -> None:
    from matplotlib import image

    png = recovered_run / "report.png"
    png.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "tools.report", str(recovered_run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "failures by cause" in proc.stdout and f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(png)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    rgb = pixels[..., :3].reshape(-1, 3)
    # Not one flat colour: a curve, bars in several colours, text.
    assert rgb.std() > 0.05
    assert len({tuple(p) for p in (rgb[::7] * 255).astype(int).tolist()}) > 20


def _write_events(run_dir: Path, events: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
        f.write('{"time": 99, "type": "torn')  # a line a killed supervisor left half-written


def test_hang_and_relaunched_supervisor_without_metrics(tmp_path: Path) -> None:
    """A hang in one supervisor's attempt, then a second supervisor on the same run directory:
    attempts are numbered on across both, and the hang's step gives its loss."""
    run_dir = tmp_path / "run"
    _write_events(
        run_dir,
        [
            {"time": 100.0, "type": "supervisor_started"},
            {"time": 100.1, "type": "checkpoint_selected", "attempt": 1, "step": 0},
            {"time": 100.2, "type": "launch", "attempt": 1, "resume_step": 0},
            {"time": 103.0, "type": "workers_started", "attempt": 1},
            {"time": 105.0, "type": "first_step", "attempt": 1, "step": 2},
            {
                "time": 120.0,
                "type": "hang_detected",
                "attempt": 1,
                "rank": 1,
                "pid": 7,
                "step": 17,
                "phase": "train",
            },
            {"time": 120.5, "type": "stopped", "attempt": 1},
            {"time": 121.0, "type": "backoff", "attempt": 1, "delay": 0.4},
            {"time": 121.5, "type": "checkpoint_selected", "attempt": 2, "step": 15},
            {"time": 121.6, "type": "launch", "attempt": 2, "resume_step": 15},
            {"time": 124.6, "type": "workers_started", "attempt": 2},
            {"time": 126.0, "type": "first_step", "attempt": 2, "step": 16},
            {"time": 130.0, "type": "interrupted", "attempt": 2, "signal": "SIGTERM", "step": 19},
            {"time": 140.0, "type": "supervisor_started"},
            {"time": 140.1, "type": "checkpoint_selected", "attempt": 1, "step": 19},
            {"time": 140.2, "type": "launch", "attempt": 1, "resume_step": 19},
            {
                "time": 150.0,
                "type": "worker_failed",
                "attempt": 1,
                "source": "torchrun",
                "pid": 9,
                "exit_code": -9,
                "signal": "SIGKILL",
            },
            {"time": 150.3, "type": "stopped", "attempt": 1},
            {"time": 150.4, "type": "budget_exhausted", "attempt": 1, "reason": "3 restarts used"},
        ],  # fmt: skip
    )
    report = build_report(run_dir)
    assert [a.number for a in report.attempts] == [1, 2, 3]
    assert [a.supervisor_attempt for a in report.attempts] == [1, 2, 1]
    assert [a.outcome for a in report.attempts] == ["hung", "interrupted", "failed"]
    hang, lost_node = report.failures
    assert (hang.cause, hang.rank, hang.step, hang.resumed_from) == (
        "hang (train phase)",
        1,
        17,
        15,
    )
    assert hang.steps_lost == 2 and hang.injected is None
    assert lost_node.cause == "torchrun killed by SIGKILL" and lost_node.resumed_from is None
    assert lost_node.steps_lost is None
    (rec,) = report.recoveries
    assert rec.first_step_source == "event"
    want = {"detect": None, "stop": 0.5, "backoff": 1.1, "launch": 3.0, "first_step": 1.4}
    for phase, value in want.items():
        assert rec.phases[phase] == (None if value is None else pytest.approx(value)), phase
    assert rec.total == pytest.approx(6.0)
    assert report.cold_start == pytest.approx(4.8)
    assert report.end_state.startswith("gave up: budget exhausted (3 restarts used)")
    assert report.final_step == 19 and report.useful_steps == 19
    assert report.goodput == pytest.approx(19 / 50.4)
    assert report.newest_checkpoint is None
    text = render_text(report)
    assert "no valid checkpoint" in text and "1 x hang (train phase): rank 1" in text
    # No metrics: the plot still renders (timeline, a note instead of the curve).
    assert render_png(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_auto_checkpoint_intervals_are_listed_and_drawn(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    interval = {"type": "checkpoint_interval", "source": "trainer", "rule": "sqrt(2 x cost x mtbf)"}
    _write_events(
        run_dir,
        [
            {"time": 100.0, "type": "supervisor_started"},
            {"time": 100.2, "type": "launch", "attempt": 1, "resume_step": 0},
            {**interval, "time": 103.0, "step": 40, "tier": "memory", "every": 12},
            {**interval, "time": 103.1, "step": 40, "tier": "disk", "every": 90},
            {**interval, "time": 109.0, "step": 130, "tier": "disk", "every": 30},
            {**interval, "time": 109.5, "step": 131, "tier": "cache", "every": 3},  # not ours
            {"time": 120.0, "type": "done", "attempt": 1, "step": 200},
        ],
    )
    report = build_report(run_dir)
    assert report.intervals == [(40, "memory", 12), (40, "disk", 90), (130, "disk", 30)]
    text = render_text(report)
    assert "disk every:  30 steps at the end (auto; 30-90 over 2 choice(s))" in text
    assert "mem every:   12 steps at the end (auto; 12-12 over 1 choice(s))" in text
    assert render_png(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_the_text_report_works_and_the_plot_is_skipped(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    _write_events(
        run_dir,
        [
            {"time": 1.0, "type": "supervisor_started"},
            {"time": 1.1, "type": "launch", "attempt": 1, "resume_step": 0},
            {"time": 9.0, "type": "done", "attempt": 1, "step": 5},
        ],
    )
    # A real interpreter in which importing matplotlib fails, as when it is not installed.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from tools.report import main\n"
        f"sys.exit(main([{str(run_dir)!r}]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "succeeded; 1 attempt(s), 0 failure(s)" in proc.stdout
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("plot skipped")]
    assert skipped == [
        "plot skipped: matplotlib is not installed (pip install 'rosetrainer[report]')"
    ]
    assert not (run_dir / "report.png").exists()


def test_not_a_run_directory_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such run directory" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "events.jsonl not found" in capsys.readouterr().err
    with pytest.raises(ReportError, match="holds no events"):
        (tmp_path / "empty" / "events.jsonl").write_text("")
        build_report(tmp_path / "empty")


def _node_events(run_dir: Path) -> None:
    """A two-node run directory: node 0 lived through node 1's loss (one failure), node 1's
    supervisor was killed and a new one continued."""
    node0 = [
        {"time": 10.0, "type": "supervisor_started"},
        {"time": 10.2, "type": "launch", "attempt": 1, "resume_step": 0},
        {"time": 30.0, "type": "worker_failed", "attempt": 1, "rank": 0, "pid": 5,
         "exit_code": 1, "step": 7},
        {"time": 31.0, "type": "stopped", "attempt": 1},
        {"time": 31.5, "type": "launch", "attempt": 2, "resume_step": 4},
        {"time": 60.0, "type": "done", "attempt": 2, "step": 16},
    ]  # fmt: skip
    node1 = [
        {"time": 10.1, "type": "supervisor_started"},
        {"time": 10.3, "type": "launch", "attempt": 1, "resume_step": 0},
        {"time": 29.0, "type": "fault_injected", "source": "chaos", "kind": "kill-supervisor",
         "attempt": 1, "step": 7},
        {"time": 35.0, "type": "supervisor_started"},
        {"time": 35.5, "type": "launch", "attempt": 2, "resume_step": 4},
        {"time": 60.1, "type": "done", "attempt": 2, "step": 16},
    ]  # fmt: skip
    run_dir.mkdir(parents=True)
    for tag, events in (("node0", node0), ("node1", node1)):
        lines = "".join(json.dumps(e) + "\n" for e in events)
        (run_dir / f"events-{tag}.jsonl").write_text(lines)


def test_a_multi_node_run_dir_is_reported_node_by_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    _node_events(run_dir)
    with pytest.raises(ReportError, match=r"multi-node run directory \(nodes: node0, node1\)"):
        build_report(run_dir)
    node0, node1 = build_reports(run_dir)
    assert (node0.node, node1.node) == ("node0", "node1")
    assert [a.outcome for a in node0.attempts] == ["failed", "succeeded"]
    assert [(f.rank, f.step, f.resumed_from) for f in node0.failures] == [(0, 7, 4)]
    assert [a.outcome for a in node1.attempts] == ["unknown", "succeeded"]
    assert not node1.failures and node1.faults_injected == 1
    assert node0.final_step == node1.final_step == 16

    assert main([str(run_dir), "--no-png"]) == 0
    out = capsys.readouterr().out
    sections = out.split("\n\nrun report: ")
    assert len(sections) == 2
    assert sections[0].startswith(f"run report: {run_dir} (node node0)\n")
    assert sections[1].startswith(f"{run_dir} (node node1)\n")
    assert "succeeded; 2 attempt(s), 1 failure(s)" in sections[0]
    assert "succeeded; 2 attempt(s), 0 failure(s), 1 fault(s) injected" in sections[1]

    # --node: that node alone; the plot is named after it.
    assert main([str(run_dir), "--node", "node1"]) == 0
    out = capsys.readouterr().out
    assert "(node node1)" in out and "(node node0)" not in out
    assert f"plot: {run_dir / 'report-node1.png'}" in out
    assert (run_dir / "report-node1.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / "report-node0.png").exists() and not (run_dir / "report.png").exists()


def test_plot_names_per_node() -> None:
    one = Report(run_dir=Path("r"), started_at=None, ended_at=None, end_state="x")
    node = Report(run_dir=Path("r"), started_at=None, ended_at=None, end_state="x", node="node1")
    assert png_path(one) == Path("r/report.png")
    assert png_path(node) == Path("r/report-node1.png")
    assert png_path(node, "out/plot.png") == Path("out/plot.png")
    assert png_path(node, "out/plot.png", several=True) == Path("out/plot-node1.png")


def test_a_bad_node_names_the_nodes_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    _node_events(run_dir)
    assert main([str(run_dir), "--node", "node7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "node 'node7'" in err and "no events-node7.jsonl; its nodes are node0, node1" in err
    one = tmp_path / "one"
    _write_events(one, [{"time": 1.0, "type": "supervisor_started"}])
    assert main([str(one), "--node", "node0", "--no-png"]) == 2
    assert "one-node run directory" in capsys.readouterr().err
