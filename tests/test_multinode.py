"""Two "nodes" on this machine: two supervisors, one rank each, one shared run directory,
torchrun's c10d rendezvous on 127.0.0.1. One node is lost mid-run (the chaos tool SIGKILLs its
supervisor; its torchrun and worker follow through their parent-death signals) and started again;
the run must finish on both nodes at the same step with parameters bitwise equal to an
uninterrupted two-node run, and the run report must tell each node's story as its events file does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.common import free_port
from runcontract import exit_codes
from supervisor.cli import main as launch_main
from tests.scripts.nodes import LAUNCH, ROOT, Node, read_jsonl
from tools.report import build_reports

pytestmark = [pytest.mark.distributed, pytest.mark.chaos, pytest.mark.slow]

STEPS = 16
TRAIN_ARGS = [
    "--model", "tiny", "--seq-len", "32", "--micro-batch", "4", "--steps", str(STEPS),
    "--warmup-steps", "2", "--eval-every", "0", "--log-every", "0", "--threads", "1",
    "--ckpt-every", "4", "--ckpt-sync", "--dropout", "0.1", "--seed", "5",
]  # fmt: skip
# Generous: on a loaded 2-core machine a torch start-up alone can take tens of seconds.
TIMEOUT = 300.0


def _flags(port: int) -> list[str]:
    return [
        "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-timeout", "240", "--max-restarts", "4", "--crash-loop", "0",
        "--backoff-initial", "0.1", "--backoff-max", "0.5", "--stop-grace", "1",
    ]  # fmt: skip


def _start_pair(run_dir: Path, env: dict[str, str], started: list[Node]) -> tuple[Node, Node]:
    port = free_port()
    nodes = tuple(
        Node(run_dir, r, [*_flags(port), "--", *TRAIN_ARGS], env, tag=f"n{r}-{len(started)}")
        for r in (0, 1)
    )
    started.extend(nodes)
    return nodes  # type: ignore[return-value]


def _final_params(run_dir: Path) -> str:
    manifest = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json"
    return json.loads(manifest.read_text())["params_sha256"]


def _of(type_: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _chaos_kill_supervisor(node: Node, at_step: int, env: dict[str, str]) -> subprocess.Popen:
    """``launch.py chaos RUN_DIR --node <tag> --fault kill-supervisor --at-steps N``, started
    beside the run: it waits for the node's attempt to reach step N (a tiny step takes a tenth
    of a second, so a tool started only then would find the run over)."""
    return subprocess.Popen(
        [sys.executable, str(LAUNCH), "chaos", str(node.run_dir), "--node", node.name,
         "--fault", "kill-supervisor", "--at-steps", str(at_step), "--seed", "1",
         "--wait-start", str(TIMEOUT), "--timeout", str(TIMEOUT)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _node_lost(node: Node, others: list[Node], tool: subprocess.Popen) -> list[int]:
    """Waits for the chaos tool, then until the node's supervisor, torchrun and workers (the
    pids the tool logged) are all gone; returns them."""
    deadline = time.monotonic() + TIMEOUT
    while tool.poll() is None:
        assert time.monotonic() < deadline, "the chaos tool did not inject in time"
        for n in (node, *others):
            n.note_tree()  # remembered for the final cleanup, should anything outlive its parent
        time.sleep(0.2)
    out = tool.communicate()[0]
    assert tool.returncode == 0, out
    assert f"node {node.name};" in out
    (fault,) = _of("fault_injected", node.events())
    assert fault["kind"] == "kill-supervisor" and fault["source"] == "chaos"
    # The targets are the node's own, as its state file (last written before the kill) names
    # them: its one worker, not the other node's, whose heartbeat shares the folder.
    state = node.state()
    assert fault["pid"] == state["supervisor_pid"] == node.proc.pid
    assert fault["torchrun_pid"] == state["torchrun_pid"]
    assert fault["workers"] == state["workers"] and len(fault["workers"]) == 1
    assert fault["step"] >= 5 and fault["attempt"] == 1
    assert node.proc.wait(timeout=30) == -9
    pids = [fault["pid"], fault["torchrun_pid"], *fault["workers"].values()]
    deadline = time.monotonic() + 60
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if not _gone(p)]}"
        time.sleep(0.1)
    return pids


def _check_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``launch.py report`` on the two-node run directory: a section per node whose attempts and
    failures are those of the node's own events file."""
    capsys.readouterr()
    assert launch_main(["report", str(run_dir), "--no-png"]) == exit_codes.SUCCESS
    out = capsys.readouterr().out
    reports = build_reports(run_dir)
    assert [r.node for r in reports] == ["node0", "node1"]
    for report in reports:
        events = read_jsonl(run_dir / f"events-{report.node}.jsonl")
        launches = _of("launch", events)
        failures = _of("worker_failed", events) + _of("hang_detected", events)
        failures.sort(key=lambda e: e["time"])
        assert f"run report: {run_dir} (node {report.node})" in out
        assert len(report.attempts) == len(launches)
        assert [a.resume_step for a in report.attempts] == [e["resume_step"] for e in launches]
        assert [a.supervisor_attempt for a in report.attempts] == [e["attempt"] for e in launches]
        assert [(f.rank, f.detected_at) for f in report.failures] == [
            (e.get("rank"), e["time"]) for e in failures
        ]
        assert report.end_state == "succeeded" and report.final_step == STEPS
        summary = f"succeeded; {len(launches)} attempt(s), {len(failures)} failure(s)"
        assert summary in out
    node0, node1 = reports
    # Node 0 lived through the loss: its first attempt failed and it went on. Node 1's supervisor
    # died with its attempt (nothing logged a failure), and a new supervisor continued the count.
    assert node0.failures and node0.failures[0].attempt == 1
    assert node0.attempts[0].outcome in ("failed", "hung")
    assert node1.faults_injected == 1 and not node1.failures
    assert [a.outcome for a in node1.attempts] == ["unknown", "succeeded"]
    assert (run_dir / "report-node0.txt").is_file() and (run_dir / "report-node1.txt").is_file()


@pytest.mark.timeout(900)
def test_node_loss_and_return_ends_bitwise_equal_on_both_nodes(
    tmp_path: Path, train_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[Node] = []
    try:
        # The uninterrupted reference runs alongside: the machine's two cores are mostly idle
        # while the other pair waits in its rendezvous and restarts.
        ref0, ref1 = _start_pair(tmp_path / "reference", train_env, started)
        node0, node1 = _start_pair(tmp_path / "run", train_env, started)
        run_dir = node0.run_dir

        # Node 1 is lost mid-run: past the first checkpoint (step 4), well before the end.
        tool = _chaos_kill_supervisor(node1, 5, train_env)
        try:
            killed = _node_lost(node1, [node0], tool)
        finally:
            if tool.poll() is None:
                tool.kill()
                tool.communicate()
        assert len(killed) >= 3, f"expected supervisor, torchrun and worker, got {killed}"
        assert (run_dir / "checkpoints" / "step-00000004").is_dir()

        # The surviving node detects the loss (its worker fails in a collective, or stalls),
        # stops its tree and relaunches; its new torchrun waits for the lost node, bounded.
        failed = node0.wait_for(
            lambda ev: _of("worker_failed", ev) + _of("hang_detected", ev), TIMEOUT, "failure"
        )
        assert failed[0]["attempt"] == 1
        node0.wait_for(lambda ev: len(_of("rendezvous_wait", ev)) >= 2, TIMEOUT, "relaunch")
        wait = _of("rendezvous_wait", node0.events())[1]
        assert wait["timeout"] == 240.0 and wait["attempt"] == 2

        # The node returns: a fresh supervisor on the same run directory.
        node1b = Node(run_dir, 1, [*_flags(_port(node0)), "--", *TRAIN_ARGS], train_env, "n1-b")
        started.append(node1b)

        assert node0.wait(TIMEOUT) == exit_codes.SUCCESS, node0.output[-3000:]
        assert node1b.wait(TIMEOUT) == exit_codes.SUCCESS, node1b.output[-3000:]
        assert ref0.wait(TIMEOUT) == exit_codes.SUCCESS, ref0.output[-3000:]
        assert ref1.wait(TIMEOUT) == exit_codes.SUCCESS, ref1.output[-3000:]

        # Both nodes resumed from the same checkpoint, mid-run, and finished at the same step.
        ev0, ev1 = node0.events(), node1b.events()
        resumed0 = _of("launch", ev0)[-1]
        resumed1 = _of("launch", ev1)[-1]
        assert resumed0["resume_from"] == resumed1["resume_from"]
        assert 4 <= resumed0["resume_step"] < STEPS
        assert node0.state()["step"] == node1b.state()["step"] == STEPS
        assert node0.state()["state"] == node1b.state()["state"] == "succeeded"
        # The returning node continues its own attempt numbers (its logs are not overwritten).
        assert resumed1["attempt"] == 2
        assert (run_dir / "logs" / "node1" / "attempt-1").is_dir()

        assert _final_params(run_dir) == _final_params(ref0.run_dir)

        # Status shows both nodes.
        capsys.readouterr()
        assert launch_main(["status", str(run_dir), "--json"]) == exit_codes.SUCCESS
        states = json.loads(capsys.readouterr().out)
        assert sorted(states) == ["node0", "node1"]
        assert {s["step"] for s in states.values()} == {STEPS}

        _check_report(run_dir, capsys)
    finally:
        for node in started:
            node.cleanup()


def _port(node: Node) -> int:
    endpoint = _of("rendezvous_wait", node.events())[0]["endpoint"]
    return int(endpoint.rsplit(":", 1)[1])


def test_two_supervisors_of_one_node_rank_are_refused(tmp_path: Path) -> None:
    """The lock is per node: a second supervisor for node 0 is refused, one for node 1 is not
    (the refusal happens before anything is launched)."""
    import filelock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = filelock.FileLock(str(run_dir / "supervisor-node0.lock"))
    held.acquire()
    try:
        flags = ["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1", "--run-dir", str(run_dir)]
        code = launch_main([*flags, "--node-rank", "0", "--", "--steps", "1"])
        assert code == exit_codes.RUN_DIR_LOCKED
    finally:
        held.release()


def _agree_in_child(rank: int, store_path: str, choice: str | None, out: Any) -> None:
    import torch.distributed as dist

    from trainer import train

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        d = train.Dist(rank=rank, local_rank=0, world_size=2)
        agreed = train._agree_on_resume(Path(choice) if choice else None, d)
        out.put((rank, str(agreed) if agreed else None))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("choice0", "choice1", "expected"),
    [
        ("ckpt/step-00000040", "ckpt/step-00000044", "ckpt/step-00000044"),
        ("ckpt/step-00000044", None, "ckpt/step-00000044"),
        (None, None, None),
    ],
)
def test_ranks_agree_on_the_newest_checkpoint_any_node_chose(
    tmp_path: Path, choice0: str | None, choice1: str | None, expected: str | None
) -> None:
    """Two supervisors chose different checkpoints (one saw a late commit, one did not): every
    rank loads the same one, the newest."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # torch is imported already: a fork starts fast
    out = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [
        ctx.Process(target=_agree_in_child, args=(r, store, c, out))
        for r, c in enumerate((choice0, choice1))
    ]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert results == {0: expected, 1: expected}
    assert all(p.exitcode == 0 for p in procs)
