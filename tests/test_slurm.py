"""The SLURM path: the allocation read from SLURM's environment, and a real SIGUSR1 (the
pre-timeout signal of ``sbatch --signal=USR1@T``) ending a run with an emergency checkpoint and
the requeue exit code; the requeued job resumes from it with the restart count carried over."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from runcontract import exit_codes
from supervisor import slurm
from supervisor.cli import build_parser, config_from_args
from supervisor.runner import TorchrunRunner
from tests.scripts.nodes import Node

FAKE_SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "cn[07-09]",
    "SLURM_NNODES": "3",
    "SLURM_NODEID": "2",
}


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[01-03]", "node01"),
        ("node[007,009-011],gpu1", "node007"),
        ("gpu5,gpu6", "gpu5"),
        ("single", "single"),
        ("rack[2-3]-n[10-12]", "rack2-n10"),
        ("a-[05]", "a-05"),
    ],
)
def test_first_host_expands_the_node_list(nodelist: str, first: str) -> None:
    assert slurm.first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01-03", "node[x-y]", "[]"])
def test_a_malformed_node_list_is_refused(nodelist: str) -> None:
    with pytest.raises(slurm.SlurmError, match="SLURM_JOB_NODELIST"):
        slurm.first_host(nodelist)


def test_allocation_from_the_environment() -> None:
    alloc = slurm.from_env(FAKE_SLURM)
    assert alloc == slurm.SlurmAllocation("4242", 3, 2, "cn07")
    assert alloc.rdzv_endpoint() == f"cn07:{slurm.DEFAULT_PORT}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID is not set"),
        ({"SLURM_NNODES": "many"}, "SLURM_NNODES='many' is not an integer"),
        ({"SLURM_NODEID": "3"}, "SLURM_NODEID=3 is outside SLURM_NNODES=3"),
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
    ],
)
def test_a_bad_slurm_environment_names_the_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(slurm.SlurmError, match=message):
        slurm.from_env({**FAKE_SLURM, **change})


def test_slurm_flag_fills_the_multi_node_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in FAKE_SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    config = config_from_args(build_parser().parse_args(["--slurm", "--nproc", "2"]))
    assert (config.nnodes, config.node_rank) == ("3", 2)
    assert (config.rdzv_endpoint, config.rdzv_id) == ("cn07:29500", "4242")
    assert config.run_dir == tmp_path / "runs" / "slurm-4242"
    assert config.slurm and config.node_tag == "node2"
    assert config.state_file.name == "supervisor-node2.json"
    assert config.events_file.name == "events-node2.jsonl"
    cmd = TorchrunRunner(config).command()
    joined = " ".join(cmd)
    assert "--rdzv-endpoint cn07:29500" in joined and "--rdzv-id 4242" in joined
    assert "--node-rank 2" in joined and "--rdzv-conf join_timeout=600" in joined
    # A flag on the command line wins over the environment.
    config = config_from_args(
        build_parser().parse_args(["--slurm", "--rdzv-endpoint", "head:1234", "--run-dir", "r"])
    )
    assert config.rdzv_endpoint == "head:1234" and config.run_dir == tmp_path / "r"


def test_slurm_flag_outside_a_job_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.cli import main

    for key in (*FAKE_SLURM, "SLURM_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    assert main(["--slurm", "--", "--steps", "1"]) == exit_codes.BAD_INPUT


STEPS = 40
HOLD_STEP = 5
# Rank 0 is held right after its heartbeat for HOLD_STEP, past that step's all-reduce, which
# carries the ranks' stop flags: the signal is agreed in the next step's, which is checkpointed.
EMERGENCY_STEP = HOLD_STEP + 1
TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(STEPS),
    "--warmup-steps", "2", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--ckpt-every", "0",
]  # fmt: skip
FLAGS = [
    "--slurm", "--nproc", "1", "--max-restarts", "3", "--backoff-initial", "0.05",
    "--backoff-max", "0.2", "--stop-grace", "1",
]  # fmt: skip
HELD_TRAINER = Path(__file__).parent / "scripts" / "held_trainer.py"
TIMEOUT = 240.0
ONE_NODE = {**FAKE_SLURM, "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "cn07"}


def _of(type_: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


def _job(run_dir: Path, train_env: dict[str, str], tag: str, hold_at: str = "") -> Node:
    """One node of a one-node allocation on ``run_dir``, running the held trainer."""
    return Node(
        run_dir, None, [*FLAGS, str(HELD_TRAINER), *TRAIN_ARGS], train_env, tag,
        {**ONE_NODE, "HOLD_AT": hold_at},
    )  # fmt: skip


def _held_rank0(job: Node, attempt: int) -> psutil.Process:
    """Rank 0 of ``attempt`` once it has stopped itself at its ``HOLD_AT`` point."""
    started = job.wait_for(
        lambda ev: [e for e in _of("workers_started", ev) if e["attempt"] == attempt],
        TIMEOUT,
        f"workers of attempt {attempt}",
    )
    worker = psutil.Process(int(started[0]["workers"]["0"]))
    job.wait_for(
        lambda _: worker.status() == psutil.STATUS_STOPPED, TIMEOUT, "rank 0 held at its point"
    )
    return worker


def _signal_while_held(job: Node, worker: psutil.Process, attempt: int) -> None:
    """SLURM's pre-timeout signal to the supervisor while rank 0 is frozen; rank 0 resumes once
    the supervisor has forwarded it, and so acts on it at exactly its held point."""
    os.kill(job.proc.pid, signal.SIGUSR1)
    job.wait_for(
        lambda ev: [e for e in _of("stopping", ev) if e["attempt"] == attempt],
        TIMEOUT,
        "the supervisor forwarding the signal",
    )
    worker.send_signal(signal.SIGCONT)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigusr1_checkpoints_exits_requeue_and_the_requeued_job_carries_restarts(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    started: list[Node] = []
    try:
        job = _job(run_dir, train_env, "job", hold_at=f"2:{HOLD_STEP}")
        started.append(job)
        # A real failure first, so that there is a restart to carry over: torchrun killed as
        # soon as it is launched (cheaper than waiting for a worker to start).
        launch = job.wait_for(lambda ev: _of("launch", ev), TIMEOUT, "launch")
        os.kill(int(launch[0]["torchrun_pid"]), signal.SIGKILL)
        # Attempt 2 is held at step HOLD_STEP, mid-way, however fast the machine is.
        _signal_while_held(job, _held_rank0(job, 2), 2)
        assert job.wait(TIMEOUT) == exit_codes.REQUEUE, job.output[-3000:]

        events = job.events()
        assert _of("interrupted", events)[0]["signal"] == "SIGUSR1"
        emergency = _of("emergency_checkpoint", events)[0]
        assert emergency["durable"] and emergency["durable_step"] == EMERGENCY_STEP
        state = json.loads((run_dir / "supervisor.json").read_text())
        assert state["exit_code"] == exit_codes.REQUEUE and state["restarts_used"] == 1
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
        assert saved == [f"step-{EMERGENCY_STEP:08d}"], "--ckpt-every 0: only the emergency one"

        # The requeued job: the same command and environment on the same run directory.
        requeued = _job(run_dir, train_env, "requeued")
        started.append(requeued)
        assert requeued.wait(TIMEOUT) == exit_codes.SUCCESS, requeued.output[-3000:]
        events = requeued.events()
        second = events[_index_of_last_start(events) :]
        assert second[0]["type"] == "supervisor_started" and second[0]["restarts_carried"] == 1
        launch = _of("launch", second)[0]
        assert launch["attempt"] == 3 and launch["resume_step"] == EMERGENCY_STEP
        assert launch["restarts_left"] == 2
        state = json.loads((run_dir / "supervisor.json").read_text())
        assert state["state"] == "succeeded" and state["step"] == STEPS
        assert (state["restarts_used"], state["restarts_left"]) == (1, 2)
        # Every finished run commits its final state, even with --ckpt-every 0.
        assert _of("done", second)[0]["checkpoint"].endswith(f"step-{STEPS:08d}")
    finally:
        for node in started:
            node.cleanup()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_signal_after_every_rank_finished_is_a_success_not_a_requeue(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    job = _job(run_dir, train_env, "job", hold_at="1:done")
    try:
        _signal_while_held(job, _held_rank0(job, 1), 1)
        assert job.wait(TIMEOUT) == exit_codes.SUCCESS, job.output[-3000:]
        events = job.events()
        assert _of("interrupted", events)[0]["signal"] == "SIGUSR1"
        assert _of("done", events)[0]["checkpoint"].endswith(f"step-{STEPS:08d}")
        assert json.loads((run_dir / "supervisor.json").read_text())["state"] == "succeeded"
        assert "success (exit 0)" in job.output
    finally:
        job.cleanup()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_interrupt_whose_emergency_checkpoint_fails_is_not_a_requeue(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    job = _job(run_dir, train_env, "job", hold_at=f"1:{HOLD_STEP}")
    try:
        worker = _held_rank0(job, 1)
        # The emergency save cannot succeed: where checkpoints/ should be lies a plain file.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "checkpoints").write_text("not a directory")
        _signal_while_held(job, worker, 1)
        assert job.wait(TIMEOUT) == exit_codes.INTERRUPTED_UNSAVED, job.output[-3000:]
        emergency = _of("emergency_checkpoint", job.events())[0]
        assert not emergency["durable"] and emergency["durable_step"] == 0
        assert emergency["reached_step"] == EMERGENCY_STEP
        assert "emergency checkpoint was not written" in job.output
    finally:
        job.cleanup()


def _index_of_last_start(events: list[dict[str, Any]]) -> int:
    return max(i for i, e in enumerate(events) if e["type"] == "supervisor_started")
