"""``python -m trainer.checkpoint ls | verify | inspect``: output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts.ckpt_model import trained
from trainer.checkpoint import CheckpointStore
from trainer.checkpoint.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, async_save=False) as store:
        for step in (10, 20):
            store.save(step, model, opt, None, {"cursor": step}, {"tokens_seen": step * 8})
    return tmp_path


def test_ls_lists_steps_sizes_and_validity(run_dir, capsys):
    assert main(["ls", str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "size", "status"]
    assert [line.split()[0] for line in out[1:]] == ["20", "10"]
    assert all(line.endswith("valid") and "KB" in line for line in out[1:])

    (run_dir / "checkpoints" / "step-00000020" / "state.json").write_text("{}")
    assert main(["ls", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "INVALID: state.json is 2 bytes" in out
    assert (run_dir / "checkpoints" / "step-00000020").exists(), "ls must not quarantine"


def test_verify_exit_codes(run_dir, capsys):
    good = run_dir / "checkpoints" / "step-00000010"
    assert main(["verify", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = run_dir / "checkpoints" / "step-00000020"
    (bad / "model.safetensors").unlink()
    assert main(["verify", str(bad)]) == 1
    assert "INVALID" in (out := capsys.readouterr().out) and "missing file model.safetensors" in out
    assert main(["verify", str(run_dir / "nope")]) == 2
    assert main(["verify", str(run_dir)]) == 2
    assert "run directory" in capsys.readouterr().err


def test_inspect_prints_the_manifest(run_dir, capsys):
    assert main(["inspect", str(run_dir / "checkpoints" / "step-00000020")]) == 0
    man = json.loads(capsys.readouterr().out)
    assert man["step"] == 20 and man["tokens_seen"] == 160 and man["train_state"] == {"cursor": 20}


def test_module_entry_point_runs_without_torch(run_dir):
    """The real command line, as a user types it; it must not import torch (fast to run)."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    code = (
        "import sys, runpy; sys.argv = ['x', 'verify', sys.argv[1]];"
        "rc = 0\n"
        "try:\n    runpy.run_module('trainer.checkpoint', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)"
    )
    good = run_dir / "checkpoints" / "step-00000010"
    res = subprocess.run([sys.executable, "-c", code, str(good)], env=env, capture_output=True)
    assert res.returncode == 0, res.stderr
    (good / "manifest.json").write_text("{")
    res = subprocess.run(
        [sys.executable, "-m", "trainer.checkpoint", "verify", str(good)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "not valid JSON" in res.stdout
