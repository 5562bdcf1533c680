"""Faults injected for real: killed writers, damaged files, stale temp dirs, two writers, pickles.

Each test ends by showing that ``find_latest_valid`` returns the newest intact checkpoint and that
it loads to exactly the state that was saved (tensors compared bitwise).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.scripts.ckpt_model import assert_same_state, fresh, trained
from tests.scripts.ckpt_tamper import replace_file, two_checkpoints
from trainer.checkpoint import (
    CheckpointInvalid,
    CheckpointLocked,
    CheckpointStore,
    find_latest_valid,
    load,
    load_checkpoint,
    verify,
)
from trainer.checkpoint import manifest as mf
from trainer.checkpoint.fsio import PAUSE_ENV
from trainer.checkpoint.layout import MODEL_FILE, this_host

REPO = Path(__file__).resolve().parents[1]
WRITER = REPO / "tests" / "scripts" / "ckpt_writer.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(PAUSE_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def start_writer(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(run_dir), *args],
        cwd=REPO,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reap(proc: subprocess.Popen) -> None:
    """Kill (by pid) and wait, whatever state the writer is in."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f:
            f.close()


def reap_forked(parent: subprocess.Popen) -> None:
    """Kill the fork parent's children (unreaped, so their pids are still theirs), then reap all."""
    parent.stdin.close()
    deadline = time.monotonic() + 60
    while parent.poll() is None and time.monotonic() < deadline:
        for child in psutil.Process(parent.pid).children():
            if child.status() != psutil.STATUS_ZOMBIE:
                child.kill()
        time.sleep(0.05)
    reap(parent)


def wait_stopped(pid: int, parent: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the writer ``pid`` has stopped itself at its pause point."""
    deadline = time.monotonic() + timeout
    p = psutil.Process(pid)
    while time.monotonic() < deadline:
        status = p.status()
        if status == psutil.STATUS_STOPPED:
            return
        if status == psutil.STATUS_ZOMBIE:
            raise AssertionError(f"writer {pid} exited early: {parent.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"writer {pid} never reached its pause point")


def assert_resumes_to(run_dir: Path, step: int, **size: int) -> None:
    """find_latest_valid picks step-<step>, which loads to exactly what `step` steps produce."""
    path = find_latest_valid(run_dir)
    assert path is not None and path.name == f"step-{step:08d}"
    model, opt = fresh(seed=99, **size)
    manifest = load(path, model, opt)
    assert manifest["train_state"] == {"step": step}
    expected_model, expected_opt = trained(step, **size)
    assert_same_state(expected_model, model, expected_opt, opt)


# -- the writer process killed at each instant of a commit ----------------------------------------

KILL_CASES = [
    # phase, step find_latest_valid must return, whether the killed save left a temp dir
    ("payload-mid", 2, True),
    ("manifest-mid", 2, True),
    ("before-rename", 2, True),
    ("after-rename", 3, False),
]


@pytest.mark.distributed
def test_writer_sigkilled_mid_commit(tmp_path):
    """One writer process per phase, forked from one parent so torch is imported only once."""
    phases = [case[0] for case in KILL_CASES]
    parent = start_writer(tmp_path, "--steps", "1", "2", "3", "--dim", "64", "--fork", *phases)
    pids = {}
    try:
        while len(pids) < len(phases):
            line = json.loads(parent.stdout.readline())  # children print their own events too
            if line["type"] == "forked":
                pids[line["phase"]] = line["pid"]
        for phase, _, leaves_tmp in KILL_CASES:
            wait_stopped(pids[phase], parent)
            ckpts = tmp_path / phase / "checkpoints"
            tmps = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
            assert bool(tmps) == leaves_tmp, phase
            if phase == "payload-mid":
                part = tmps[0] / MODEL_FILE
                assert 0 < part.stat().st_size and not (tmps[0] / "manifest.json").exists()
            if phase == "manifest-mid":
                assert not _parses(tmps[0] / "manifest.json")
            # A reader running while the writer lives must not take its temp dir away.
            find_latest_valid(tmp_path / phase)
            assert all(t.exists() for t in tmps), phase
    finally:
        reap_forked(parent)
    for phase, expect, _ in KILL_CASES:
        run_dir = tmp_path / phase
        assert_resumes_to(run_dir, expect, dim=64, hidden=128)
        ckpts = run_dir / "checkpoints"
        assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")], phase
        assert not (ckpts / "quarantine").exists(), phase


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except ValueError:
        return False


# -- damaged checkpoints ----------------------------------------------------------------------


def _truncate(ckpt: Path) -> None:
    f = ckpt / MODEL_FILE
    os.truncate(f, f.stat().st_size // 2)


def _flip_byte(ckpt: Path) -> None:
    f = ckpt / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) - 7] ^= 0x01
    f.write_bytes(bytes(data))


def _flip_manifest_byte(ckpt: Path) -> None:
    f = ckpt / "manifest.json"
    f.write_bytes(f.read_bytes().replace(b'"step": 2', b'"step": 3', 1).replace(b"3,", b"2,", 0))
    man = json.loads(f.read_bytes())
    man["train_state"]["step"] = 7  # valid JSON, plausible, but not what was written
    f.write_bytes(mf.to_bytes(man))


DAMAGE = [
    ("truncated payload", _truncate, f"{MODEL_FILE} is"),
    ("one flipped byte", _flip_byte, "optimizer.safetensors sha256 does not match"),
    ("missing file", lambda c: (c / "state.json").unlink(), "missing file state.json"),
    ("missing manifest", lambda c: (c / "manifest.json").unlink(), "missing manifest.json"),
    ("edited manifest", _flip_manifest_byte, "does not match its own manifest_sha256"),
]


@pytest.mark.parametrize(
    ("damage", "reason"), [(d[1], d[2]) for d in DAMAGE], ids=[d[0] for d in DAMAGE]
)
def test_damaged_checkpoint_is_quarantined_and_older_one_used(tmp_path, damage, reason, capfd):
    newest = two_checkpoints(tmp_path)
    damage(newest)
    with pytest.raises(CheckpointInvalid, match=reason):
        verify(newest)
    events = []
    path = find_latest_valid(tmp_path, on_event=events.append)
    assert path is not None and path.name == "step-00000001"
    assert not newest.exists()
    moved = tmp_path / "checkpoints" / "quarantine" / "step-00000002"
    assert reason in (moved / "REASON.txt").read_text()
    assert [e["type"] for e in events] == ["checkpoint_quarantined"]
    assert events[0]["path"] == str(newest) and reason in events[0]["reason"]
    assert "warning:" in capfd.readouterr().err
    assert_resumes_to(tmp_path, 1)


def test_quarantine_never_overwrites(tmp_path):
    for _ in range(2):
        newest = two_checkpoints(tmp_path)
        (newest / "manifest.json").unlink()
        assert find_latest_valid(tmp_path).name == "step-00000001"
    q = tmp_path / "checkpoints" / "quarantine"
    assert sorted(p.name for p in q.iterdir()) == ["step-00000002", "step-00000002-1"]


# -- stale temp dirs ---------------------------------------------------------------------------


def test_stale_temp_dir_removed_only_when_its_writer_is_dead(tmp_path):
    two_checkpoints(tmp_path)
    ckpts = tmp_path / "checkpoints"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = ckpts / f".tmp-step-00000003-{this_host()}-{sleeper.pid}-0123abcd"
        dead_tmp = ckpts / f".tmp-step-00000003-{this_host()}-{dead.pid}-89abcdef"
        other_host = ckpts / f".tmp-step-00000003-elsewhere-{dead.pid}-89abcdef"
        not_ours = ckpts / ".tmp-something-else"
        for d in (live_tmp, dead_tmp, other_host, not_ours):
            d.mkdir()
            (d / MODEL_FILE).write_bytes(b"partial")
        events = []
        assert find_latest_valid(tmp_path, on_event=events.append).name == "step-00000002"
        assert not dead_tmp.exists()
        assert live_tmp.exists() and other_host.exists() and not_ours.exists()
        assert events == [
            {"type": "checkpoint_tmp_removed", "time": events[0]["time"], "path": str(dead_tmp)}
        ]
    finally:
        sleeper.kill()
        sleeper.wait()
    # The writer that holds the lock knows no other writer lives: all our-pattern dirs go.
    CheckpointStore(tmp_path, is_writer=True).close()
    assert not live_tmp.exists() and not other_host.exists() and not_ours.exists()
    assert_resumes_to(tmp_path, 2)


# -- two writers ---------------------------------------------------------------------------------


@pytest.mark.distributed
def test_second_writer_is_refused_while_first_lives(tmp_path):
    first = start_writer(tmp_path, "--steps", "1", "--hold")
    second = None
    try:
        ready = json.loads(first.stdout.readline())
        assert ready["type"] == "ready"
        with pytest.raises(CheckpointLocked, match=f"pid {first.pid}"):
            CheckpointStore(tmp_path, is_writer=True)
        second = start_writer(tmp_path, "--steps", "2")
        assert second.wait(timeout=240) == 77
        assert "another process" in second.stderr.read()
        assert json.loads(first.stdout.readline())["type"] == "checkpoint_saved"
        # The kernel drops a dead holder's lock: a SIGKILLed writer never blocks the next one.
        first.kill()
        first.wait(timeout=60)
    finally:
        reap(first)
        if second is not None:
            reap(second)
    assert_resumes_to(tmp_path, 1)
    store = CheckpointStore(tmp_path, is_writer=True)
    store.close()  # and a closed store releases it
    CheckpointStore(tmp_path, is_writer=True).close()


# -- malicious pickles ---------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_in_place_of_safetensors_is_refused(tmp_path):
    newest = two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    # Resealed so the file passes verification: the loader itself must refuse it.
    replace_file(newest, MODEL_FILE, pickle.dumps({"model": _RunsCode(marker)}))
    verify(newest)
    model, opt = fresh()
    with pytest.raises(CheckpointInvalid, match="not a readable safetensors file"):
        load(newest, model, opt)
    assert not marker.exists()


def test_legacy_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "old.pt"
    evil.write_bytes(pickle.dumps({"model": _RunsCode(marker), "step": 3}))
    with pytest.raises(CheckpointInvalid, match="refused to load"):
        load_checkpoint(evil, fresh()[0])
    assert not marker.exists()
