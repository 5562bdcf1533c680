"""Whole-system faults, injected by the chaos tool into real supervised runs (see conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from runcontract import exit_codes
from runcontract.env import MEM_ROOT
from runcontract.layout import memory_dir
from tests.chaos.conftest import (
    CKPT_EVERY,
    HERE,
    MEMORY_ARGS,
    STEPS,
    TRAIN_ARGS,
    Harness,
    Reference,
    assert_detected,
    assert_recovered,
    assert_resumed_well,
    attempt_events,
    committed_steps,
    faults,
    final_sha,
    last_attempt,
    manifest,
    rank0_stderr,
    read_jsonl,
    relaunch_choice,
    run_reference,
    selected,
    wait_no_processes,
)

HELD_TRAINER = Path(__file__).resolve().parents[1] / "scripts" / "held_trainer.py"

# Each test is a few supervised runs of a few attempts; on a loaded 2-core machine an attempt's
# start-up alone can take half a minute, so the per-test limit is wider than the default.
pytestmark = [
    pytest.mark.chaos,
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]


def test_three_random_worker_kills(harness: Harness, reference: Reference) -> None:
    sup = harness.launch()
    tool = harness.chaos("--fault", "kill-worker", "--at-steps", "6,12,18", "--seed", "11")
    rc = sup.wait()
    assert harness.wait_tool(tool) == 0
    events = assert_recovered(harness.run_dir, rc, reference)
    injected = faults(events)
    assert [f["kind"] for f in injected] == ["kill-worker"] * 3
    assert [f["attempt"] for f in injected] == [1, 2, 3]
    for fault in injected:
        assert_detected(events, fault)
        assert_resumed_well(events, fault)
    assert last_attempt(harness.run_dir) == 4


def test_worker_kills_resume_from_the_memory_tier(harness: Harness, reference: Reference) -> None:
    """With a memory snapshot every step, each kill resumes from the newest valid checkpoint
    across tiers (memory only when newer than the disk) and the run still ends bitwise equal to
    the reference; nothing is left in shared memory."""
    sup = harness.launch(script_args=[*TRAIN_ARGS, *MEMORY_ARGS])
    tool = harness.chaos("--fault", "kill-worker", "--at-steps", "7,14,19", "--seed", "5")
    rc = sup.wait()
    assert harness.wait_tool(tool) == 0
    events = read_jsonl(harness.run_dir / "events.jsonl")
    chosen = [e for e in events if e["type"] == "checkpoint_selected"][1:]
    # A step resumed from its memory snapshot is not written to disk again; nor is a disk save
    # that was due before the kill but not committed when it landed (an asynchronous write in
    # flight, which the kill loses), once the resume comes from a newer memory snapshot.
    from_memory = {c["step"] for c in chosen if c["tier"] == "memory"}
    in_flight: set[int] = set()
    for fault, choice in zip(faults(events), chosen, strict=True):
        newest_disk = max(fault["committed"] or [0])
        if choice["tier"] == "memory":
            in_flight |= {s for s in reference.steps if newest_disk < s < choice["step"]}
    lost = in_flight - set(committed_steps(harness.run_dir))
    assert_recovered(
        harness.run_dir, rc, reference, missing_steps=from_memory | lost, events=events
    )
    for fault, choice in zip(faults(events), chosen, strict=True):
        assert_detected(events, fault)
        newest_disk = max(fault["committed"] or [0])
        if choice["tier"] == "memory":
            assert choice["step"] > newest_disk, (fault, choice)  # the disk wins a tie
        else:
            assert choice["step"] % CKPT_EVERY == 0 and choice["step"] >= newest_disk, choice
    # Whether a kill lands between two disk checkpoints (a resume from memory) or on one (the
    # disk wins the tie) depends on the machine's speed; tests/test_memory_tier_e2e.py holds a
    # rank off the disk schedule to check the resume from memory itself.
    assert not memory_dir(harness.run_dir, Path(harness.env[MEM_ROOT])).exists()


@pytest.mark.parametrize("nproc", [3, 4])
def test_worker_kill_beyond_two_ranks_resumes_exactly(
    harness: Harness, train_env: dict[str, str], tmp_path: Path, nproc: int
) -> None:
    # With three ranks or more, the all-reduce's result depends on the order it sums the ranks'
    # gradients in, so the first step after the resume must reduce exactly as the same step of
    # the uninterrupted run did. Dropout, so that every rank's gradients differ.
    extra = ["--nproc", str(nproc)]
    args = [*TRAIN_ARGS, "--dropout", "0.1"]
    reference = run_reference(tmp_path / "reference", train_env, extra, args)
    sup = harness.launch(extra, script_args=args)
    tool = harness.chaos("--fault", "kill-worker", "--at-steps", "10", "--seed", "3")
    rc = sup.wait()
    assert harness.wait_tool(tool) == 0
    events = assert_recovered(harness.run_dir, rc, reference)
    (fault,) = faults(events)
    assert fault["kind"] == "kill-worker" and fault["attempt"] == 1
    assert_detected(events, fault)
    # Resumed from a checkpoint, not from the start: a step ran first in the new attempt.
    assert assert_resumed_well(events, fault) >= CKPT_EVERY
    assert last_attempt(harness.run_dir) == 2


def test_kill_writer_in_every_phase(harness: Harness, reference: Reference) -> None:
    # Attempts 1-4 freeze rank 0 at one phase of their first checkpoint write each; the tool
    # kills it there. Attempt 5 runs to the end.
    phases = ["payload-mid", "manifest-mid", "before-rename", "after-rename"]
    env = dict(harness.env)
    env["CHAOS_PAUSE_PLAN"] = ",".join(f"{i}:{p}" for i, p in enumerate(phases, start=1))
    sup = harness.launch(script=HERE / "paused_trainer.py", env=env)
    # A long --writer-delay: the tool waits for the writer to stop itself at the phase.
    tool = harness.chaos("--fault", "kill-writer", "--count", "4", "--writer-delay", "120")
    rc = sup.wait()
    assert harness.wait_tool(tool) == 0
    events = assert_recovered(harness.run_dir, rc, reference)
    injected = faults(events)
    assert [f["kind"] for f in injected] == ["kill-writer"] * 4
    assert [f["attempt"] for f in injected] == [1, 2, 3, 4]
    for fault, phase in zip(injected, phases, strict=True):
        assert fault["writing_step"] == CKPT_EVERY and fault["writer_paused_itself"]
        files = fault["temp_files"]
        # What the kill interrupted, phase by phase (a vanished temp dir means it was renamed).
        if phase == "payload-mid":
            assert "manifest.json" not in files and "model.safetensors" in files, files
        elif phase in ("manifest-mid", "before-rename"):
            assert "manifest.json" in files and "state.json" in files, files
        else:
            assert fault["renamed"], fault
        assert_detected(events, fault)
    # Nothing was committed before the rename; after it, the checkpoint counts.
    assert [selected(events, a) for a in (2, 3, 4, 5)] == [0, 0, 0, CKPT_EVERY]


def test_hang_corruption_and_lost_node(harness: Harness, reference: Reference) -> None:
    sup = harness.launch(["--hang-timeout", "6"])
    tool = harness.chaos("--fault", "hang,corrupt,kill-torchrun", "--at-steps", "6,13,18")
    rc = sup.wait()
    assert harness.wait_tool(tool) == 0
    events = read_jsonl(harness.run_dir / "events.jsonl")
    injected = faults(events)
    assert [f["kind"] for f in injected] == ["hang", "corrupt", "kill-torchrun"]
    corrupt = injected[1]
    bad_step = int(Path(corrupt["path"]).name.split("-")[1])
    assert bad_step == max(corrupt["committed"]) and bad_step > CKPT_EVERY
    assert_recovered(harness.run_dir, rc, reference, quarantined={bad_step}, events=events)
    for fault in injected:
        assert_detected(events, fault)
        assert_resumed_well(events, fault)
    # The corrupted checkpoint was set aside with its reason, and the one before it chosen.
    after = attempt_events(events, corrupt["attempt"])
    quarantined = [e for e in events if e["type"] == "checkpoint_quarantined"]
    assert [q["path"] for q in quarantined] == [corrupt["path"]]
    assert quarantined[0]["time"] > corrupt["time"] and after
    assert selected(events, corrupt["attempt"] + 1) == bad_step - CKPT_EVERY
    reason = (Path(quarantined[0]["to"]) / "REASON.txt").read_text()
    assert corrupt["file"] in reason


@pytest.mark.parametrize("mode", ["fifo", "symlink-loop", "dev-zero"])
def test_a_hostile_file_in_the_newest_checkpoint_is_set_aside(
    harness: Harness, reference: Reference, mode: str
) -> None:
    # A named pipe, a link to itself or a link to /dev/zero in place of a payload file: the
    # next choice must neither hang nor crash, but quarantine it.
    sup = harness.launch()
    tool = harness.chaos("--fault", "hostile-file", "--at-steps", "13", "--corrupt-mode", mode)
    rc = sup.wait()
    assert harness.wait_tool(tool) == 0
    events = read_jsonl(harness.run_dir / "events.jsonl")
    (fault,) = faults(events)
    assert fault["mode"] == mode
    bad_step = int(Path(fault["path"]).name.split("-")[1])
    assert_recovered(harness.run_dir, rc, reference, quarantined={bad_step}, events=events)
    assert_detected(events, fault)
    assert selected(events, fault["attempt"] + 1) == bad_step - CKPT_EVERY
    quarantined = [e for e in events if e["type"] == "checkpoint_quarantined"]
    reason = (Path(quarantined[0]["to"]) / "REASON.txt").read_text()
    assert fault["file"] in reason, reason


def test_preempt_then_relaunch_loses_no_step(harness: Harness, reference: Reference) -> None:
    # Rank 0 holds itself right after step 9 until the supervisor has passed the preemption
    # on: a fast machine would otherwise finish the last steps before the signal arrived (and
    # the run would rightly count as finished).
    sup = harness.launch(script=HELD_TRAINER, env={**harness.env, "HOLD_AT": "1:9"})
    tool = harness.chaos("--fault", "preempt", "--at-steps", "9")
    rank0 = psutil.Process(int(sup.wait_event("workers_started")["workers"]["0"]))
    sup.wait_event("stopping")
    rank0.send_signal(signal.SIGCONT)
    assert sup.wait() == 75, sup.output()[-3000:]  # the documented "interrupted" exit
    assert harness.wait_tool(tool) == 0
    left = wait_no_processes(harness.run_dir)
    assert not left, [p.pid for p in left]
    events = read_jsonl(harness.run_dir / "events.jsonl")
    (fault,) = faults(events)
    assert any(e["type"] == "interrupted" and e["signal"] == "SIGTERM" for e in events)
    reached = max(r["step"] for r in read_jsonl(harness.run_dir / "metrics.jsonl") if "loss" in r)
    assert reached >= fault["step"]
    # The emergency checkpoint holds the last step trained: nothing to redo.
    assert max(committed_steps(harness.run_dir)) == reached
    manifest(harness.run_dir, reached)

    again = harness.launch()
    events = assert_recovered(
        harness.run_dir,
        again.wait(),
        reference,
        extra_steps={reached} - set(reference.steps),
    )
    assert relaunch_choice(events) == reached  # zero steps lost


def test_kill_supervisor_then_relaunch(harness: Harness, reference: Reference) -> None:
    sup = harness.launch()
    tool = harness.chaos("--fault", "kill-supervisor", "--at-steps", "10")
    assert sup.wait() == -9
    assert harness.wait_tool(tool) == 0
    # Its workers and torchrun noticed and exited: no orphans.
    left = wait_no_processes(harness.run_dir)
    assert not left, [(p.pid, p.name()) for p in left]
    (fault,) = faults(read_jsonl(harness.run_dir / "events.jsonl"))
    # torchrun got SIGTERM as its parent died and passed it on: the workers may have written
    # an emergency checkpoint before they exited. It must be complete, and it is kept.
    present = set(committed_steps(harness.run_dir))
    newest = max(present)
    assert newest >= max(fault["committed"]) and set(fault["committed"]) <= present
    manifest(harness.run_dir, newest)

    again = harness.launch()
    events = assert_recovered(
        harness.run_dir, again.wait(), reference, extra_steps=present - set(reference.steps)
    )
    assert relaunch_choice(events) == newest


def test_budget_exhausted_by_a_script_that_always_crashes(harness: Harness) -> None:
    sup = harness.launch(["--max-restarts", "2"], script=HERE / "always_crash.py", script_args=[])
    assert sup.wait() == 3, sup.output()[-3000:]  # exit_codes.BUDGET_EXHAUSTED
    events = read_jsonl(harness.run_dir / "events.jsonl")
    failed = [e for e in events if e["type"] == "worker_failed"]
    assert [e["attempt"] for e in failed] == [1, 2, 3]
    assert all(e["exit_code"] == 1 for e in failed), failed
    (end,) = [e for e in events if e["type"] == "budget_exhausted"]
    assert end["restarts_used"] == 2 and end["exit_code"] == 3
    assert [e["attempt"] for e in events if e["type"] == "checkpoint_selected"] == [1, 2, 3]
    assert "done" not in {e["type"] for e in events}
    left = wait_no_processes(harness.run_dir)
    assert not left, [p.pid for p in left]


@pytest.fixture
def small_checkpoint_fs(harness: Harness) -> Path:
    """``RUN_DIR/checkpoints`` on a 32 MiB tmpfs of its own, unmounted at the end."""
    ckpt = harness.run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "chaos-ckpt", str(ckpt)],
        check=True,
        capture_output=True,
    )
    yield ckpt
    # The harness kills the run's processes first (its own cleanup runs after this one).
    wait_no_processes(harness.run_dir, timeout=10)
    subprocess.run(["umount", "-l", str(ckpt)], check=False, capture_output=True)


def test_full_checkpoint_disk_training_goes_on(
    harness: Harness, reference: Reference, small_checkpoint_fs: Path
) -> None:
    sup = harness.launch()
    tool = harness.chaos("--fault", "fill-disk", "--at-steps", "10")
    rc = sup.wait()
    assert harness.wait_tool(tool) == 0
    events = read_jsonl(harness.run_dir / "events.jsonl")
    (fault,) = faults(events)
    # Training went on to the end, but its final state could not be saved: no false success.
    assert rc == exit_codes.FINAL_STATE_UNSAVED and last_attempt(harness.run_dir) == 1
    (unsaved,) = [e for e in events if e["type"] == "final_state_unsaved"]
    # A save already under way when the disk filled may still have landed.
    assert unsaved["step"] == STEPS and unsaved["durable_step"] == max(
        committed_steps(harness.run_dir)
    )
    assert unsaved["durable_step"] >= max(fault["committed"])
    assert final_sha(harness.run_dir) == reference.sha
    steps = [r["step"] for r in read_jsonl(harness.run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    (filled,) = [e for e in events if e["type"] == "disk_filled"]
    assert filled["free_after"] < 256 * 1024
    # Every checkpoint committed before the disk filled is intact; none after it could be.
    after = set(committed_steps(harness.run_dir))
    assert set(fault["committed"]) <= after and fault["committed"]
    for step in after:
        manifest(harness.run_dir, step)
    assert STEPS not in after
    err = rank0_stderr(harness.run_dir, 1)
    assert "ENOSPC" in err and "training goes on" in err, err[-2000:]
    assert not list(small_checkpoint_fs.glob(".tmp-*"))
    left = wait_no_processes(harness.run_dir)
    assert not left, [p.pid for p in left]
    os.unlink(filled["path"])  # so the tmpfs can go
