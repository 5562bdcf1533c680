"""The memory tier: two alternating snapshots in shared memory, a fast checksum that catches a
flipped byte, the choice across tiers and its fallbacks, removal, and a run that never fails
because of the tier (a missing or full root)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from runcontract.env import MEM_ROOT
from runcontract.layout import memory_dir
from runcontract.states import State
from supervisor.resume import release_memory_tier, select_checkpoint, selection_reason
from tests.scripts.ckpt_model import assert_same_state, fresh, trained
from trainer.checkpoint import CheckpointInvalid, CheckpointStore, load, verify
from trainer.checkpoint.__main__ import main as ckpt_cli
from trainer.checkpoint.layout import MANIFEST, MODEL_FILE
from trainer.checkpoint.memstore import MemoryStore
from trainer.checkpoint.memtier import (
    find_latest_valid_memory,
    memory_slots,
    remove_memory,
)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The memory tier's root, in the test's own directory."""
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv(MEM_ROOT, str(shm))
    return shm


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


def _mem_save(store: MemoryStore, step: int) -> bool:
    model, opt = trained(step)
    return store.save(step, model, opt, None, {"step": step, "position": 4 * step}, {})


def _disk_save(run_dir: Path, step: int) -> None:
    model, opt = trained(step)
    with CheckpointStore(run_dir, is_writer=True, async_save=False, keep_last=10) as store:
        store.save(step, model, opt, None, {"step": step, "position": 4 * step}, {})


def _flip_byte(path: Path, name: str = MODEL_FILE) -> None:
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _steps(run_dir: Path) -> list[int]:
    return [step for step, _ in memory_slots(run_dir)]


def test_commit_keeps_two_alternating_slots_with_a_fast_checksum(root: Path, run_dir: Path):
    events: list[dict] = []
    store = MemoryStore(run_dir, enabled=True, on_event=events.append)
    mem = memory_dir(run_dir)
    assert mem.parent == root and mem.name.startswith("rose-")
    for step in (5, 10, 15, 20):
        assert _mem_save(store, step)
        kept = _steps(run_dir)
        assert kept == [step, step - 5][: min(2, step // 5)]
        # Nothing else: no temp directory left behind, at most two snapshots.
        assert sorted(p.name for p in mem.iterdir()) == sorted(
            ["RUN.json", *[f"step-{s:08d}" for s in kept]]
        )
    assert [e["type"] for e in events] == ["memory_saved"] * 4
    assert events[-1]["step"] == 20 and events[-1]["bytes"] > 0
    man = verify(mem / "step-00000020")
    assert man["file_hash"] == "xxh3_128"
    assert all("xxh3_128" in info and "sha256" not in info for info in man["files"].values())
    assert (mem.stat().st_mode & 0o777) == 0o700

    model, opt = fresh(seed=3)
    load(mem / "step-00000020", model, opt)
    ref_model, ref_opt = trained(20)
    assert_same_state(ref_model, model, ref_opt, opt)


def test_disk_manifests_keep_sha256_and_an_unknown_hash_is_invalid(root: Path, run_dir: Path):
    _disk_save(run_dir, 4)
    disk = run_dir / "checkpoints" / "step-00000004"
    man = verify(disk)
    assert "file_hash" not in man and all("sha256" in i for i in man["files"].values())

    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 5)
    snap = memory_dir(run_dir) / "step-00000005"
    raw = json.loads((snap / MANIFEST).read_text())
    raw["file_hash"] = "md5"
    _reseal(snap, raw)
    with pytest.raises(CheckpointInvalid, match="unknown file_hash"):
        verify(snap)


def _reseal(path: Path, man: dict) -> None:
    from trainer.checkpoint import manifest as m

    body = {k: v for k, v in man.items() if k != "manifest_sha256"}
    import hashlib

    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    man["manifest_sha256"] = hashlib.sha256(canon).hexdigest()
    (path / MANIFEST).write_bytes(m.to_bytes(man))


def test_a_flipped_byte_falls_back_to_the_other_slot_then_to_disk(root: Path, run_dir: Path):
    _disk_save(run_dir, 6)
    store = MemoryStore(run_dir, enabled=True)
    for step in (5, 10, 15):
        _mem_save(store, step)
    mem = memory_dir(run_dir)
    events: list[dict] = []
    # Both memory snapshots newer than the disk: the newest wins.
    assert select_checkpoint(run_dir, events.append, memory=True) == mem / "step-00000015"
    assert select_checkpoint(run_dir, events.append) == run_dir / "checkpoints" / "step-00000006"
    assert events == []

    _flip_byte(mem / "step-00000015")
    with pytest.raises(CheckpointInvalid, match="xxh3_128 does not match"):
        verify(mem / "step-00000015")
    assert select_checkpoint(run_dir, events.append, memory=True) == mem / "step-00000010"
    assert [e["type"] for e in events] == ["memory_snapshot_dropped"]
    assert events[0]["step"] == 15 and "xxh3_128" in events[0]["reason"]
    assert _steps(run_dir) == [10]  # removed, not kept in scarce memory

    _flip_byte(mem / "step-00000010", "state.json")
    chosen = select_checkpoint(run_dir, events.append, memory=True)
    assert chosen == run_dir / "checkpoints" / "step-00000006"
    assert [e["type"] for e in events][-1] == "memory_snapshot_dropped"
    assert selection_reason(run_dir, chosen, True) == {
        "tier": "disk",
        "reason": "no valid memory snapshot",
    }


def test_a_snapshot_older_than_the_disk_is_not_chosen_nor_verified(root: Path, run_dir: Path):
    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 5)
    _disk_save(run_dir, 8)
    _flip_byte(memory_dir(run_dir) / "step-00000005")  # never looked at: the disk is newer
    events: list[dict] = []
    chosen = select_checkpoint(run_dir, events.append, memory=True)
    assert chosen == run_dir / "checkpoints" / "step-00000008" and events == []
    assert selection_reason(run_dir, chosen, True)["reason"].startswith("no memory snapshot")
    assert selection_reason(run_dir, chosen, False)["reason"].startswith("several nodes")


def test_memory_alone_and_the_reason_names_the_disk_step(root: Path, run_dir: Path):
    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 5)
    chosen = select_checkpoint(run_dir, memory=True)
    assert chosen == memory_dir(run_dir) / "step-00000005"
    assert selection_reason(run_dir, chosen, True) == {
        "tier": "memory",
        "reason": "the memory snapshot is newer than the newest valid disk checkpoint (none)",
    }
    assert select_checkpoint(run_dir) is None  # the disk alone: a fresh start


def test_an_earlier_run_directory_at_the_same_path_is_never_resumed(root: Path, run_dir: Path):
    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 5)
    shutil.rmtree(run_dir)
    run_dir.mkdir()  # a new run at the same path: another inode
    events: list[dict] = []
    assert find_latest_valid_memory(run_dir, events.append) is None
    assert events[0]["type"] == "memory_snapshot_dropped" and "another run" in events[0]["reason"]
    assert not memory_dir(run_dir).exists()


def test_a_directory_others_can_write_is_not_trusted(root: Path, run_dir: Path):
    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 5)
    mem = memory_dir(run_dir)
    mem.chmod(0o777)
    try:
        events: list[dict] = []
        assert find_latest_valid_memory(run_dir, events.append) is None
        assert "writable by other users" in events[0]["reason"]
        assert mem.exists()  # not ours to remove either
        assert not remove_memory(run_dir)
        assert not MemoryStore(run_dir, enabled=True).save(6, *trained(1), None, {}, {})
    finally:
        mem.chmod(0o700)


def test_a_missing_root_turns_the_tier_off_without_failing(
    tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(MEM_ROOT, str(tmp_path / "no-such-dir"))
    events: list[dict] = []
    store = MemoryStore(run_dir, enabled=True, on_event=events.append)
    assert not _mem_save(store, 5)
    assert not store.enabled and not (tmp_path / "no-such-dir").exists()
    assert [e["type"] for e in events] == ["memory_save_failed"]
    assert events[0]["errno"] == "ENOENT" and "not a directory" in events[0]["error"]
    assert not _mem_save(store, 10)  # off for good: one event, not one per save
    assert len(events) == 1


def test_a_full_root_turns_the_tier_off_and_keeps_what_was_committed(
    root: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    events: list[dict] = []
    store = MemoryStore(run_dir, enabled=True, on_event=events.append)
    assert _mem_save(store, 5)
    # The write itself runs out of room half-way (tmpfs full): the temp directory goes.
    real_write = os.write
    calls = {"n": 0}

    def full(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", full)
    assert not _mem_save(store, 10)
    monkeypatch.setattr(os, "write", real_write)
    assert events[-1]["type"] == "memory_save_failed" and events[-1]["errno"] == "ENOSPC"
    mem = memory_dir(run_dir)
    assert sorted(p.name for p in mem.iterdir()) == ["RUN.json", "step-00000005"]
    verify(mem / "step-00000005")

    # Too little room before writing: refused without writing anything.
    events.clear()
    store = MemoryStore(run_dir, enabled=True, on_event=events.append)
    monkeypatch.setattr(
        "trainer.checkpoint.memstore.shutil.disk_usage",
        lambda _: shutil._ntuple_diskusage(100, 100, 10),  # type: ignore[attr-defined]
    )
    assert not _mem_save(store, 15)
    assert events[-1]["errno"] == "ENOSPC" and "bytes free" in events[-1]["error"]


def test_a_memory_directory_removed_under_the_writer_is_made_again(root: Path, run_dir: Path):
    events: list[dict] = []
    store = MemoryStore(run_dir, enabled=True, on_event=events.append)
    _mem_save(store, 5)
    shutil.rmtree(memory_dir(run_dir))
    assert _mem_save(store, 10)
    assert _steps(run_dir) == [10] and [e["type"] for e in events] == ["memory_saved"] * 2
    assert select_checkpoint(run_dir, memory=True) == memory_dir(run_dir) / "step-00000010"


def test_rollback_drops_the_snapshots_past_it(root: Path, run_dir: Path):
    store = MemoryStore(run_dir, enabled=True)
    for step in (5, 10):
        _mem_save(store, step)
    store.drop_from(7)
    assert _steps(run_dir) == [5]


def test_release_keeps_an_interrupted_runs_newer_snapshot(root: Path, run_dir: Path):
    events: list[tuple] = []

    def emit(type_: str, **fields: object) -> None:
        events.append((type_, fields))

    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 5)
    release_memory_tier(run_dir, emit, State.INTERRUPTED)  # step 5 exists nowhere else
    assert _steps(run_dir) == [5] and events == []
    _disk_save(run_dir, 5)
    release_memory_tier(run_dir, emit, State.INTERRUPTED)
    assert not memory_dir(run_dir).exists()
    assert events[0][0] == "memory_removed" and events[0][1]["steps"] == [5]

    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 10)
    release_memory_tier(run_dir, emit, State.FAILED)
    assert not memory_dir(run_dir).exists()
    assert events[-1][1]["reason"] == "the run was abandoned"


def test_ls_shows_the_memory_tier(root: Path, run_dir: Path, capsys: pytest.CaptureFixture):
    store = MemoryStore(run_dir, enabled=True)
    _mem_save(store, 5)
    assert ckpt_cli(["ls", str(run_dir)]) == 0  # no disk checkpoint yet, a snapshot
    out = capsys.readouterr().out
    assert f"memory tier: {memory_dir(run_dir)}" in out and "valid" in out
    _flip_byte(memory_dir(run_dir) / "step-00000005")
    assert ckpt_cli(["ls", str(run_dir)]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_the_real_dev_shm_is_left_empty(run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """On the real /dev/shm: a snapshot lands there, and removal leaves nothing behind."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    monkeypatch.delenv(MEM_ROOT, raising=False)
    mem = memory_dir(run_dir)
    assert mem.parent == Path("/dev/shm")
    try:
        store = MemoryStore(run_dir, enabled=True)
        assert _mem_save(store, 5)
        assert select_checkpoint(run_dir, memory=True) == mem / "step-00000005"
        assert remove_memory(run_dir)
        assert not mem.exists()
    finally:
        shutil.rmtree(mem, ignore_errors=True)


def test_slots_are_rewritten_in_place_and_each_loads_exactly(root: Path, run_dir: Path):
    store = MemoryStore(run_dir, enabled=True)
    mem = memory_dir(run_dir)
    inodes = {}
    for step in (5, 10, 15, 20):
        assert _mem_save(store, step)
        inodes[step] = (mem / f"step-{step:08d}" / MODEL_FILE).stat().st_ino
        model, opt = fresh(seed=3)
        man = load(mem / f"step-{step:08d}", model, opt)  # the rewritten bytes, not stale ones
        assert "params_sha256" not in man and man["params_xxh3_128"]
        ref_model, ref_opt = trained(step)
        assert_same_state(ref_model, model, ref_opt, opt)
    # Two files in all, written alternately: no new file after the second snapshot.
    assert inodes[15] == inodes[5] and inodes[20] == inodes[10] and inodes[5] != inodes[10]


def test_a_changed_layout_makes_a_new_slot(root: Path, run_dir: Path):
    store = MemoryStore(run_dir, enabled=True)
    mem = memory_dir(run_dir)
    assert _mem_save(store, 5) and _mem_save(store, 10)
    old = (mem / "step-00000005" / MODEL_FILE).stat().st_size
    model, opt = trained(15, hidden=48)  # another shape: the slot of step 5 cannot take it
    assert store.save(15, model, opt, None, {"step": 15}, {})
    assert _steps(run_dir) == [15, 10]
    assert (mem / "step-00000015" / MODEL_FILE).stat().st_size > old
    loaded, loaded_opt = fresh(seed=3, hidden=48)
    load(mem / "step-00000015", loaded, loaded_opt)
    assert_same_state(model, loaded, opt, loaded_opt)


def test_no_room_for_a_new_slot_turns_the_tier_off_and_keeps_the_last(
    root: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """A full tmpfs refuses the slot's allocation with ENOSPC: never a SIGBUS in a later copy."""
    events: list[dict] = []
    store = MemoryStore(run_dir, enabled=True, on_event=events.append)
    assert _mem_save(store, 5)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert not _mem_save(store, 10)
    assert events[-1]["type"] == "memory_save_failed" and events[-1]["errno"] == "ENOSPC"
    mem = memory_dir(run_dir)
    assert sorted(p.name for p in mem.iterdir()) == ["RUN.json", "step-00000005"]
    verify(mem / "step-00000005")


_KILLED_REWRITE = """
import os, sys
from tests.scripts.ckpt_model import trained
from trainer.checkpoint.memstore import MemoryStore
store = MemoryStore(sys.argv[1], enabled=True)
for step in (5, 10):
    assert store.save(step, *trained(step), None, {"step": step}, {})
os.environ[sys.argv[3]] = sys.argv[2]  # the pause point, for this save only
store.save(15, *trained(15), None, {"step": 15}, {})
"""


@pytest.mark.parametrize("phase", ["manifest-mid", "before-rename"])
def test_a_writer_killed_while_rewriting_a_slot_leaves_the_newest_valid(
    root: Path, run_dir: Path, phase: str
):
    """SIGKILL while the older slot (step 5) is being rewritten as step 15: the newest snapshot
    (step 10) is still chosen and loads exactly, and the next writer clears the debris."""
    import subprocess
    import sys

    from runcontract.env import CKPT_PAUSE_AT
    from tests.test_checkpoint_faults import reap, wait_stopped

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_REWRITE, str(run_dir), phase, CKPT_PAUSE_AT],
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_stopped(proc.pid, proc)
        os.kill(proc.pid, 9)
    finally:
        reap(proc)
    mem = memory_dir(run_dir)
    names = sorted(p.name for p in mem.iterdir())
    # The older slot was taken out of sight first: only the temp directory is left of it.
    assert [n for n in names if n.startswith("step-")] == ["step-00000010"]
    assert any(n.startswith(".tmp-step-00000015-") for n in names)
    chosen = find_latest_valid_memory(run_dir)
    assert chosen == mem / "step-00000010"
    model, opt = fresh(seed=3)
    load(chosen, model, opt)
    ref_model, ref_opt = trained(10)
    assert_same_state(ref_model, model, ref_opt, opt)

    store = MemoryStore(run_dir, enabled=True)
    assert _mem_save(store, 20)
    assert sorted(p.name for p in mem.iterdir()) == ["RUN.json", "step-00000010", "step-00000020"]
