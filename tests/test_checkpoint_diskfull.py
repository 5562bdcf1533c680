"""Disk full and write errors: the failed save leaves nothing, older ones stay, training goes on.

Real ENOSPC comes from a small tmpfs when this machine lets us mount one; otherwise the same tests
run under a lowered RLIMIT_FSIZE (SIGXFSZ ignored), which makes the oversized write fail with EFBIG.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scripts.ckpt_model import assert_same_state, fresh, train, trained
from trainer.checkpoint import CheckpointStore, CheckpointWriteFailed, find_latest_valid, load
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
    # (the preflight has its own test below).
    monkeypatch.setattr(store_mod, "PREFLIGHT_MARGIN", 0.0)
    try:
        yield disk
    finally:
        disk.unmount()


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


def test_preflight_refuses_when_last_checkpoint_would_not_fit(tmp_path, capfd):
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        store.save(1, model, opt, None, {}, {})
    # The last checkpoint now "weighs" more than this disk holds (a sparse, unlisted file: the
    # checkpoint still verifies, and no real space is used).
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with open(tmp_path / "checkpoints" / "step-00000001" / "ballast", "wb") as f:
        f.truncate(free * 2)
    events = []
    store = CheckpointStore(tmp_path, is_writer=True, async_save=False, on_event=events.append)
    store.save(2, model, opt, None, {}, {})
    store.close()
    assert [e["type"] for e in events] == ["checkpoint_write_failed"]
    assert events[0]["errno"] == "ENOSPC" and "not enough free space" in events[0]["error"]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".writer.lock", ".writer.owner", "step-00000001"]  # no temp dir was made
    assert "not enough free space" in capfd.readouterr().err


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
