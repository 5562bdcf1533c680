"""Hostile files in a checkpoint never crash or hang a reader.

Each case puts a real file system object (a FIFO, a symlink loop, a character device, a link to
/dev/zero) or a resealed manifest with a bad file name into the newest of two checkpoints. Then
``verify`` says why it is invalid, ``find_latest_valid`` quarantines it with that reason and
returns the older one, and the CLI's ``ls`` and ``verify`` report it, every one of them under a
timeout so that a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.scripts.ckpt_tamper import reseal, two_checkpoints
from trainer.checkpoint import CheckpointInvalid, find_latest_valid, list_checkpoints, verify
from trainer.checkpoint.__main__ import EXIT_INVALID, main
from trainer.checkpoint.layout import MANIFEST, MODEL_FILE, REASON_FILE, STATE_FILE

REPO = Path(__file__).resolve().parents[1]


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _symlink_loop(path: Path) -> None:
    path.unlink()
    os.symlink(path.name, path)  # points at itself: ELOOP when followed


def _dev_zero_link(path: Path) -> None:
    path.unlink()
    os.symlink("/dev/zero", path)


def _char_device(path: Path) -> None:
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # the device /dev/zero is
    except PermissionError:
        pytest.skip("mknod is not permitted here (no CAP_MKNOD)")


def _listed_name(name: str) -> Callable[[Path], None]:
    """Make the manifest list ``name`` (resealed), with the model file's real entry."""

    def damage(ckpt: Path) -> None:
        def edit(man: dict) -> None:
            man["files"][name] = man["files"][MODEL_FILE]

        reseal(ckpt, edit)

    return damage


HAZARDS = [
    # (id, what is damaged, how, words of the reason)
    ("fifo-payload", MODEL_FILE, _fifo, f"{MODEL_FILE} is a FIFO"),
    ("symlink-loop-payload", MODEL_FILE, _symlink_loop, f"{MODEL_FILE} is a symbolic link"),
    ("dev-zero-link-payload", MODEL_FILE, _dev_zero_link, f"{MODEL_FILE} is a symbolic link"),
    ("char-device-payload", MODEL_FILE, _char_device, f"{MODEL_FILE} is a character device"),
    ("fifo-manifest", MANIFEST, _fifo, f"{MANIFEST} is a FIFO"),
    ("dev-zero-link-manifest", MANIFEST, _dev_zero_link, f"{MANIFEST} is a symbolic link"),
    ("char-device-manifest", MANIFEST, _char_device, f"{MANIFEST} is a character device"),
    ("symlink-loop-state", STATE_FILE, _symlink_loop, f"{STATE_FILE} is a symbolic link"),
    ("nul-in-name", None, _listed_name("model\0.safetensors"), "not a plain name"),
    ("300-char-name", None, _listed_name("m" * 300), "not a plain name"),
    ("name-outside", None, _listed_name("../step-00000001/model.safetensors"), "not a plain name"),
]


@pytest.fixture(params=HAZARDS, ids=[h[0] for h in HAZARDS])
def hostile(request, tmp_path) -> tuple[Path, str]:
    """A run directory whose step 2 holds one hazard; returns (step 2, words of its reason)."""
    _, target, damage, reason = request.param
    newest = two_checkpoints(tmp_path)
    damage(newest / target if target else newest)
    return newest, reason


@pytest.mark.timeout(30)
def test_verify_names_the_hazard(hostile):
    newest, reason = hostile
    with pytest.raises(CheckpointInvalid, match=reason):
        verify(newest)


@pytest.mark.timeout(30)
def test_ls_and_verify_report_it_in_one_line(hostile, capsys):
    newest, reason = hostile
    assert main(["verify", str(newest)]) == EXIT_INVALID
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("INVALID") and reason in out[0]
    assert main(["ls", str(newest.parent.parent)]) == EXIT_INVALID
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows[0].split()[0] == "2" and "INVALID: " in rows[0] and reason in rows[0]
    assert rows[1].split()[0] == "1" and rows[1].endswith("valid")
    assert [r.valid for r in list_checkpoints(newest.parent.parent)] == [False, True]


@pytest.mark.timeout(30)
def test_find_latest_valid_quarantines_it_and_takes_the_older(hostile):
    newest, reason = hostile
    run_dir = newest.parent.parent
    events = []
    found = find_latest_valid(run_dir, on_event=events.append)
    assert found is not None and found.name == "step-00000001"
    verify(found)
    moved = run_dir / "checkpoints" / "quarantine" / newest.name
    assert not newest.exists() and moved.is_dir()
    assert reason in (moved / REASON_FILE).read_text()
    assert [e["type"] for e in events] == ["checkpoint_quarantined"]


@pytest.mark.timeout(30)
def test_fifo_named_reason_txt_does_not_hang_the_quarantine(tmp_path):
    """Quarantining writes REASON.txt into the checkpoint: a FIFO already standing there would
    block an ordinary open for writing forever."""
    newest = two_checkpoints(tmp_path)
    os.mkfifo(newest / REASON_FILE)
    (newest / STATE_FILE).write_text("{}")
    assert find_latest_valid(tmp_path).name == "step-00000001"
    moved = tmp_path / "checkpoints" / "quarantine" / newest.name
    assert (moved / REASON_FILE).is_file() and "state.json is 2 bytes" in (
        moved / REASON_FILE
    ).read_text()


def test_unmovable_invalid_checkpoint_is_skipped_not_fatal(tmp_path, capfd):
    """A plain file where quarantine/ must be: the bad checkpoint stays, the search goes on."""
    newest = two_checkpoints(tmp_path)
    (newest / MANIFEST).unlink()
    (tmp_path / "checkpoints" / "quarantine").write_text("not a directory")
    events = []
    assert find_latest_valid(tmp_path, on_event=events.append).name == "step-00000001"
    assert newest.is_dir()
    assert [e["type"] for e in events] == ["checkpoint_skipped"]
    assert "missing manifest.json" in events[0]["reason"]
    assert "cannot be quarantined" in events[0]["reason"]
    assert "skipping checkpoint" in capfd.readouterr().err


def test_process_shortage_is_not_blamed_on_the_checkpoint(tmp_path):
    """Out of file descriptors says nothing about the checkpoint: verify lets it propagate rather
    than call the checkpoint invalid (which would have it quarantined)."""
    import resource

    newest = two_checkpoints(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        while True:  # use every descriptor left
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        with pytest.raises(OSError) as caught:
            verify(newest)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert caught.value.errno == errno.EMFILE
    assert not isinstance(caught.value, CheckpointInvalid)
    verify(newest)


@pytest.mark.timeout(120)
def test_cli_processes_on_a_run_full_of_hazards(tmp_path):
    """The real command line, as the supervisor's operators run it, on every hazard at once."""
    run_dir = tmp_path / "run"
    newest = two_checkpoints(run_dir)
    ckpts = run_dir / "checkpoints"
    for step, (_, target, damage, _) in enumerate(HAZARDS[:8], start=3):
        copy = ckpts / f"step-{step:08d}"
        subprocess.run(["cp", "-a", str(newest), str(copy)], check=True)
        reseal(copy, lambda man, s=step: (man.update(step=s), man["train_state"].update(step=s)))
        try:
            damage(copy / target)
        except pytest.skip.Exception:
            subprocess.run(["rm", "-rf", str(copy)], check=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "trainer.checkpoint"]
    res = subprocess.run([*cli, "ls", str(run_dir)], env=env, capture_output=True, text=True)
    assert res.returncode == EXIT_INVALID, res.stderr
    assert res.stderr == ""
    rows = res.stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows[-2:]] == ["2", "1"]
    assert all("INVALID" in r for r in rows[:-2]) and len(rows) >= 6
    res = subprocess.run(
        [*cli, "verify", str(ckpts / "step-00000003")], env=env, capture_output=True, text=True
    )
    assert res.returncode == EXIT_INVALID and res.stderr == ""
    assert res.stdout.count("\n") == 1 and "is a FIFO" in res.stdout
