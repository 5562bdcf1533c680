"""Disk full and write errors: the failed save leaves nothing, older ones stay, training goes on;
short space prunes older checkpoints first; a vanished ``checkpoints/`` is made again.

Real ENOSPC comes from a small tmpfs when this machine lets us mount one; otherwise the same tests
run under a lowered RLIMIT_FSIZE (SIGXFSZ ignored), which makes the oversized write fail with EFBIG.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runcontract.events import read_jsonl
from tests.scripts.ckpt_model import assert_same_state, fresh, train, trained
from trainer.checkpoint import (
    CheckpointLocked,
    CheckpointStore,
    CheckpointWriteFailed,
    find_latest_valid,
    load,
)
from trainer.checkpoint import store as store_mod

REPO = Path(__file__).resolve().parents[1]
SIZE = {"dim": 64, "hidden": 128}  # ~230 KB a checkpoint


class SmallDisk:
    """A directory whose writes fail once about ``room`` more bytes are written into one file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmpfs = False

    def mount(self) -> None:
        mnt = self.root / "fs"
        mnt.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
        )
        self.tmpfs = res.returncode == 0
        self.path = mnt

    def fill(self, leave: int) -> None:
        """Leave about ``leave`` bytes writable (tmpfs: a filler file; else a file-size limit)."""
        if self.tmpfs:
            free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
            with open(self.path / "filler", "wb") as f:
                f.write(b"\0" * max(0, free - leave))
        else:
            self._old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            self._limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (leave, self._limit[1]))

    def unfill(self) -> None:
        if self.tmpfs:
            (self.path / "filler").unlink(missing_ok=True)
        elif hasattr(self, "_limit"):
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            signal.signal(signal.SIGXFSZ, self._old)
            del self._limit

    def expected_errno(self) -> str:
        return "ENOSPC" if self.tmpfs else "EFBIG"

    def unmount(self) -> None:
        self.unfill()
        if self.tmpfs:
            subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path)
    disk.mount()
    # Reach the write itself: the free-space preflight would refuse the save before it starts
    # (the preflight has its own tests below).
    monkeypatch.setattr(store_mod, "PREFLIGHT_MARGIN", 0.0)
    try:
        yield disk
    finally:
        disk.unmount()


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[SmallDisk]:
    """A real 2 MB tmpfs, preflight as shipped; skipped where mounting is not permitted (a
    file-size limit cannot stand in: the preflight asks the file system for its free space)."""
    disk = SmallDisk(tmp_path)
    disk.mount()
    if not disk.tmpfs:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        yield disk
    finally:
        disk.unmount()


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_mid_write_keeps_older_and_training_goes_on(small_disk, capfd, async_save):
    run_dir = small_disk.path / "run"
    events = []
    model, opt = fresh(**SIZE)
    store = CheckpointStore(run_dir, is_writer=True, async_save=async_save, on_event=events.append)
    train(model, opt, 0, 1)
    store.save(1, model, opt, None, {"step": 1}, {})
    store.wait()
    small_disk.fill(leave=40_000)
    try:
        train(model, opt, 1, 2)
        store.save(2, model, opt, None, {"step": 2}, {})
        store.wait()  # not fail_fatal: nothing raised
    finally:
        small_disk.unfill()
    failed = [e for e in events if e["type"] == "checkpoint_write_failed"]
    assert len(failed) == 1 and failed[0]["step"] == 2
    assert failed[0]["errno"] == small_disk.expected_errno()
    assert "training goes on" in capfd.readouterr().err
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".writer")) == [
        "step-00000001"
    ]
    # Training goes on, and the next save lands once there is room again.
    train(model, opt, 2, 3)
    store.save(3, model, opt, None, {"step": 3}, {})
    store.close()
    path = find_latest_valid(run_dir)
    assert path.name == "step-00000003"
    (ckpts / "step-00000003").rename(ckpts / "set-aside")
    got_model, got_opt = fresh(seed=7, **SIZE)
    assert load(find_latest_valid(run_dir), got_model, got_opt)["train_state"] == {"step": 1}
    want_model, want_opt = trained(1, **SIZE)
    assert_same_state(want_model, got_model, want_opt, got_opt)


def test_fail_fatal_raises_from_the_next_call(small_disk):
    run_dir = small_disk.path / "run"
    model, opt = trained(1, **SIZE)
    store = CheckpointStore(run_dir, is_writer=True, fail_fatal=True)
    store.save(1, model, opt, None, {"step": 1}, {})
    store.wait()
    small_disk.fill(leave=40_000)
    try:
        store.save(2, model, opt, None, {"step": 2}, {})  # async: returns, the write fails later
        with pytest.raises(CheckpointWriteFailed, match=small_disk.expected_errno()):
            store.wait()
    finally:
        small_disk.unfill()
    store.close()
    assert find_latest_valid(run_dir).name == "step-00000001"


def test_preflight_refuses_when_the_checkpoint_would_not_fit(tmpfs, capfd):
    run_dir = tmpfs.path / "run"
    model, opt = trained(1, **SIZE)
    events = []
    store = CheckpointStore(run_dir, is_writer=True, async_save=False, on_event=events.append)
    tmpfs.fill(leave=40_000)
    store.save(1, model, opt, None, {}, {})
    store.close()
    assert [e["type"] for e in events] == ["checkpoint_write_failed"]
    assert events[0]["errno"] == "ENOSPC" and "not enough free space" in events[0]["error"]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [".writer.lock", ".writer.owner"]  # no temp dir was made
    assert "not enough free space" in capfd.readouterr().err


def test_sparse_stray_file_does_not_count_toward_the_next_save(tmp_path):
    """A 100 GB sparse file left in the newest checkpoint (not in its manifest) once made the
    preflight want 105 GB for every later save."""
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(1, model, opt, None, {}, {})
    # 100 GB, or more than this disk holds: sparse either way, so it takes no real space.
    size = max(100 << 30, 2 * shutil.disk_usage(tmp_path).free)
    stray = tmp_path / "checkpoints" / "step-00000001" / "stray"
    subprocess.run(["truncate", "-s", str(size), str(stray)], check=True)
    events = []
    with CheckpointStore(
        tmp_path, is_writer=True, async_save=False, on_event=events.append
    ) as store:
        store.save(2, model, opt, None, {}, {})
        store.save(3, model, opt, None, {}, {})
    assert [e["type"] for e in events] == ["checkpoint_saved"] * 2
    assert 0 < events[0]["bytes"] < 1 << 20
    assert find_latest_valid(tmp_path).name == "step-00000003"


def test_short_space_prunes_before_the_save_what_retention_would_after_it(tmpfs):
    run_dir = tmpfs.path / "run"
    model, opt = fresh(**SIZE)
    events = []
    store = CheckpointStore(
        run_dir, is_writer=True, async_save=False, keep_last=3, keep_every=2,
        on_event=events.append,
    )  # fmt: skip
    for step in (1, 2, 3):
        train(model, opt, step - 1, step)
        store.save(step, model, opt, None, {"step": step}, {})
    # Room for less than one checkpoint: step 1 would go once step 4 lands (keep_last 3), so
    # it goes first, and the save lands.
    tmpfs.fill(leave=100_000)
    train(model, opt, 3, 4)
    store.save(4, model, opt, None, {"step": 4}, {})
    assert [(e["type"], e["step"]) for e in events[-2:]] == [
        ("checkpoint_pruned", 1),
        ("checkpoint_saved", 4),
    ]
    assert events[-2]["reason"] == "disk space"
    assert steps_on_disk(run_dir) == [2, 3, 4]
    # No room at all, and nothing retention lets go (3 and 4 are the newest, 2 a milestone):
    # the save gives up and every checkpoint stays whole.
    tmpfs.unfill()
    tmpfs.fill(leave=0)
    events.clear()
    store.save(5, model, opt, None, {"step": 5}, {})
    store.close()
    assert [e["type"] for e in events] == ["checkpoint_write_failed"]
    assert events[0]["errno"] == "ENOSPC" and "after pruning" in events[0]["error"]
    assert steps_on_disk(run_dir) == [2, 3, 4]
    tmpfs.unfill()
    assert_resumes_to(run_dir, 4)


def test_short_space_never_prunes_the_newest_valid_checkpoint(tmpfs):
    """keep_last 1: the one checkpoint would go once the save lands, but the save may fail."""
    run_dir = tmpfs.path / "run"
    model, opt = trained(1, **SIZE)
    events = []
    store = CheckpointStore(
        run_dir, is_writer=True, async_save=False, keep_last=1, on_event=events.append
    )
    store.save(1, model, opt, None, {"step": 1}, {})
    tmpfs.fill(leave=40_000)
    store.save(2, model, opt, None, {"step": 2}, {})
    store.close()
    assert [e["type"] for e in events] == ["checkpoint_saved", "checkpoint_write_failed"]
    tmpfs.unfill()
    assert_resumes_to(run_dir, 1)


def test_write_that_runs_out_of_room_prunes_and_retries_once(small_disk):
    """The disk held less than it said (the preflight passed): the checkpoint that keep_last 2
    lets go once this save lands goes now, and the write is tried again."""
    if not small_disk.tmpfs:
        pytest.skip("mount -t tmpfs is not permitted here (a file-size limit is not ENOSPC)")
    run_dir = small_disk.path / "run"
    model, opt = fresh(**SIZE)
    events = []
    store = CheckpointStore(
        run_dir, is_writer=True, async_save=False, keep_last=2, on_event=events.append
    )
    for step in (1, 2):
        train(model, opt, step - 1, step)
        store.save(step, model, opt, None, {"step": step}, {})
    small_disk.fill(leave=40_000)
    train(model, opt, 2, 3)
    store.save(3, model, opt, None, {"step": 3}, {})
    store.close()
    types = [e["type"] for e in events]
    assert "checkpoint_write_failed" not in types
    pruned = [e for e in events if e["type"] == "checkpoint_pruned"]
    assert [(e["step"], e["reason"]) for e in pruned] == [(1, "disk space")]
    assert steps_on_disk(run_dir) == [2, 3]
    small_disk.unfill()
    assert_resumes_to(run_dir, 3)


@pytest.mark.parametrize("async_save", [True, False])
def test_checkpoints_dir_deleted_mid_run_is_recreated_by_the_next_save(tmp_path, async_save):
    events = []
    model, opt = fresh()
    store = CheckpointStore(tmp_path, is_writer=True, async_save=async_save, on_event=events.append)
    train(model, opt, 0, 1)
    store.save(1, model, opt, None, {"step": 1}, {})
    store.wait()
    shutil.rmtree(tmp_path / "checkpoints")
    train(model, opt, 1, 2)
    store.save(2, model, opt, None, {"step": 2}, {})
    store.wait()
    assert [e["type"] for e in events] == [
        "checkpoint_saved",
        "checkpoint_dir_recreated",
        "checkpoint_saved",
    ]
    # The writer holds the lock of the new directory: a second writer is still refused.
    with pytest.raises(CheckpointLocked):
        CheckpointStore(tmp_path, is_writer=True)
    store.close()
    assert_resumes_to(tmp_path, 2, dim=16, hidden=32)


def test_plain_file_where_checkpoints_dir_must_be_fails_saves_until_it_goes(tmp_path, capfd):
    events = []
    model, opt = trained(1)
    store = CheckpointStore(tmp_path, is_writer=True, async_save=False, on_event=events.append)
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").write_text("in the way")
    store.save(1, model, opt, None, {"step": 1}, {})  # not fail_fatal: reported, not raised
    assert [e["type"] for e in events] == ["checkpoint_write_failed"]
    assert events[0]["errno"] == "EEXIST" and "training goes on" in capfd.readouterr().err
    (tmp_path / "checkpoints").unlink()
    store.save(1, model, opt, None, {"step": 1}, {})
    store.close()
    assert events[-1]["type"] == "checkpoint_saved"
    assert_resumes_to(tmp_path, 1, dim=16, hidden=32)


@pytest.mark.distributed
def test_write_error_in_a_real_writer_process_under_fail_fatal(tmp_path):
    """A file-size limit in a real writer process: exit 76, older checkpoint intact, no debris."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    script = REPO / "tests" / "scripts" / "ckpt_writer.py"
    args = ["--steps", "1", "2", "--dim", "64", "--fsize", "20000", "--fail-fatal"]
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 76, res.stderr
    assert "EFBIG" in res.stderr and "older checkpoints are intact" in res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    failed = [e for e in events if e["type"] == "checkpoint_write_failed"]
    assert [(e["step"], e["errno"]) for e in failed] == [(2, errno.errorcode[errno.EFBIG])]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    path = find_latest_valid(tmp_path)
    assert path.name == "step-00000001"
    got_model, got_opt = fresh(seed=7, **SIZE)
    load(path, got_model, got_opt)
    want_model, want_opt = trained(1, **SIZE)
    assert_same_state(want_model, got_model, want_opt, got_opt)


def test_event_that_cannot_be_written_on_a_full_disk_costs_one_line(tmpfs, capfd):
    from trainer import supervised

    path = tmpfs.path / "events.jsonl"
    events = supervised.Events(
        supervised.SupervisedEnv(tmpfs.path, 1, None, tmpfs.path, 0, events_file=path)
    )
    events({"type": "checkpoint_saved", "step": 1})
    tmpfs.fill(leave=0)
    events({"type": "checkpoint_write_failed", "step": 2, "error": "x" * 8192})
    events.close()
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "event checkpoint_write_failed not recorded" in err[0]
    assert [e["step"] for e in read_jsonl(path)] == [1]


def assert_resumes_to(run_dir: Path, step: int, **size: int) -> None:
    """The newest valid checkpoint is ``step`` and loads to exactly what ``step`` steps give."""
    size = size or SIZE
    path = find_latest_valid(run_dir)
    assert path is not None and path.name == f"step-{step:08d}"
    got_model, got_opt = fresh(seed=7, **size)
    assert load(path, got_model, got_opt)["train_state"] == {"step": step}
    want_model, want_opt = trained(step, **size)
    assert_same_state(want_model, got_model, want_opt, got_opt)
