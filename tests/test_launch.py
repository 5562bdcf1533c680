"""launch.py: bad input is one line and exit 2 before anything starts; the status command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from runcontract import exit_codes
from supervisor.cli import BUILTIN_TRAINER, build_parser, config_from_args, main
from supervisor.status import write_state
from tests.scripts.harness import LAUNCH, ROOT, WORKER


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("launch.py: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["missing_script.py"], "missing_script.py"),
        (["--nproc", "0", str(WORKER), "finish"], "--nproc 0"),
        (["--max-restarts", "-1", str(WORKER), "finish"], "--max-restarts -1"),
        (["--nproc", "two", str(WORKER), "finish"], "--nproc"),
        (["--bogus", str(WORKER)], "--bogus"),
        (["--crash-loop", "-3", str(WORKER)], "--crash-loop -3"),
        (["--hang-timeout", "0", str(WORKER)], "--hang-timeout 0"),
        (["--nnodes", "2", str(WORKER)], "--rdzv-endpoint"),
        (["--nnodes", "2", "--rdzv-endpoint", "nohostport", str(WORKER)], "HOST:PORT"),
        (["--chaos", "no-such-fault", str(WORKER), "finish"], "no-such-fault"),
        (["--hang-timeout", "nan", str(WORKER)], "--hang-timeout: invalid finite number"),
        (["--term-timeout", "nan", str(WORKER)], "--term-timeout: invalid finite number"),
        (["--stop-grace", "inf", str(WORKER)], "--stop-grace: invalid finite number"),
        (["--nproc", "100000", str(WORKER), "finish"], "--force-nproc"),
        (["--", "--stpes", "3"], "trainer flags: unrecognized arguments: --stpes"),
        (["--", "--steps", "-3"], "trainer flag --steps must be a positive integer"),
        (["--", "--on-divergence", "rollback"], "trainer flag --on-divergence must be 'stop'"),
        (["--tee", "zero", str(WORKER), "finish"], "--tee 'zero': expected local ranks"),
        (["--progress-every", "-1", str(WORKER), "finish"], "--progress-every -1.0: must be >= 0"),
        (["--progress-every", "nan", str(WORKER)], "--progress-every: invalid finite number"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_launches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expect: str
) -> None:
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), *argv]) == exit_codes.BAD_INPUT
    assert expect in _error_line(capsys)
    assert not run_dir.exists()


def test_unwritable_run_dir_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["--run-dir", str(blocker / "run"), str(WORKER), "finish"]) == 2
    assert "not writable" in _error_line(capsys)


def test_entry_point_exit_code_and_message() -> None:
    proc = subprocess.run(
        [sys.executable, str(LAUNCH), "--nproc", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == exit_codes.BAD_INPUT
    assert proc.stderr.strip() == "launch.py: error: --nproc 0: needs at least 1 worker process"


def test_default_script_is_the_builtin_trainer_and_double_dash_passes_its_flags(
    tmp_path: Path,
) -> None:
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["--run-dir", str(tmp_path), "--nproc", "2"]))
    assert cfg.script == BUILTIN_TRAINER and cfg.script_args == () and cfg.nproc == 2
    assert cfg.hang.require_heartbeats  # the built-in trainer beats
    cfg = config_from_args(
        parser.parse_args(["--run-dir", str(tmp_path), "--", "--steps", "5", "--model", "tiny"])
    )
    assert cfg.script == BUILTIN_TRAINER
    assert cfg.script_args == ("--steps", "5", "--model", "tiny")
    cfg = config_from_args(
        parser.parse_args(["--nproc-per-node", "3", str(WORKER), "exit", "--code", "4"])
    )
    assert cfg.script == WORKER and cfg.script_args == ("exit", "--code", "4")
    assert cfg.nproc == 3
    assert not cfg.hang.require_heartbeats  # a user script may not beat
    assert cfg.run_dir.parent.name == "runs"  # default: runs/run-<time>


def test_status_prints_the_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_state(
        tmp_path,
        {
            "state": "running",
            "supervisor_pid": 1,  # alive: init
            "attempt": 2,
            "step": 17,
            "torchrun_pid": 4321,
            "workers": {"0": 4322, "1": 4323},
            "newest_valid_checkpoint": str(tmp_path / "checkpoints" / "step-00000016"),
            "restarts_used": 1,
            "restarts_left": 2,
            "max_restarts": 3,
            "updated_at": time.time(),
        },
    )
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "state:        running" in out
    assert "attempt:      2" in out
    assert "step:         17" in out
    assert "rank 0: 4322, rank 1: 4323" in out
    assert "step-00000016" in out
    assert "1 used, 2 left (of 3)" in out


def test_status_flags_a_dead_supervisor(tmp_path: Path, capsys) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(tmp_path, {"state": "running", "supervisor_pid": dead.pid, "attempt": 1})
    assert main(["status", str(tmp_path)]) == 0
    assert "is gone" in capsys.readouterr().out


def test_status_of_a_non_run_dir_is_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["status", str(tmp_path)]) == exit_codes.BAD_INPUT
    assert "no supervisor.json" in _error_line(capsys)
    assert main(["status", str(tmp_path), "--watch"]) == exit_codes.BAD_INPUT
    assert "no supervisor.json" in _error_line(capsys)
    write_state(tmp_path, {"state": "succeeded", "supervisor_pid": 1})
    assert main(["status", str(tmp_path), "--watch", "--json"]) == exit_codes.BAD_INPUT
    assert "choose one" in _error_line(capsys)


def test_status_watch_of_an_ended_run_shows_it_once_and_exits_0(tmp_path: Path, capsys) -> None:
    write_state(tmp_path, {"state": "failed", "supervisor_pid": 1, "exit_code": 3})
    assert main(["status", str(tmp_path), "--watch"]) == 0
    out = capsys.readouterr().out
    assert out.count("state:        failed") == 1 and "exit code:    3" in out


def test_the_built_in_trainers_help_is_shown_and_nothing_launched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), "--", "--help"]) == exit_codes.SUCCESS
    out = capsys.readouterr().out
    assert "--ckpt-every" in out and "--steps" in out
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda run: (run / "events.jsonl").mkdir(), "events.jsonl is a directory"),
        (lambda run: (run / "supervisor.json").mkdir(), "supervisor.json is a directory"),
        (lambda run: (run / "heartbeats").write_text("x"), "heartbeats is not a directory"),
        (
            lambda run: (
                (run / "checkpoints").mkdir() or (run / "checkpoints" / "quarantine").touch()
            ),
            "quarantine is not a directory",
        ),
    ],
)
def test_a_bad_path_in_the_run_dir_is_bad_input_before_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, expect: str
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make(run_dir)
    assert main(["--run-dir", str(run_dir), str(WORKER), "finish"]) == exit_codes.BAD_INPUT
    assert expect in _error_line(capsys)
    assert not (run_dir / "logs").exists()  # nothing was launched


def test_nproc_beyond_the_node_is_allowed_when_forced() -> None:
    args = build_parser().parse_args(["--nproc", "100000", "--force-nproc", str(WORKER)])
    assert config_from_args(args).nproc == 100000
