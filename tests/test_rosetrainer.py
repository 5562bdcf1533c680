"""rosetrainer, the public module for users' scripts: each of its four things supervised (the
``ROSE_*`` variables set) and not, and its import staying free of torch."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rosetrainer
from rosetrainer import _checkpoint, _worker
from runcontract.env import unsupervised
from runcontract.heartbeat import read_heartbeat
from tests.scripts.ckpt_model import assert_same_state, fresh, trained
from trainer.checkpoint import CheckpointInvalid, api, params_sha256, verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _unsupervised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test unsupervised, whatever runs the tests."""
    for name in [n for n in os.environ if n.startswith("ROSE_")] + ["RANK", "WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _close_stores():
    yield
    api._close_all()  # release writer locks between tests, as process exit would


def _supervise(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, resume: Path | None = None, rank: int = 0
) -> None:
    monkeypatch.setenv("ROSE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("ROSE_ATTEMPT", "2")
    monkeypatch.setenv("ROSE_RESUME_FROM", str(resume) if resume else "")
    monkeypatch.setenv("ROSE_HEARTBEAT_DIR", str(run_dir / "heartbeats"))
    monkeypatch.setenv("ROSE_SUPERVISOR_PID", str(os.getpid()))
    monkeypatch.setenv("RANK", str(rank))


def _python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# -- import ------------------------------------------------------------------------------------


@pytest.mark.parametrize("supervised", [False, True])
def test_import_and_the_torch_free_functions_do_not_import_torch(
    tmp_path: Path, supervised: bool
) -> None:
    env = unsupervised(os.environ)
    if supervised:
        env.update(ROSE_RUN_DIR=str(tmp_path), ROSE_ATTEMPT="1", RANK="0")
    code = (
        "import sys, rosetrainer as r\n"
        "r.resume_from(); r.run_dir(); r.is_supervised(); r.heartbeat(1); r.done(1)\n"
        "print('torch' in sys.modules, any(m.startswith('trainer.') and m not in "
        "('trainer.supervised',) for m in sys.modules))\n"
        "r.save_checkpoint\n"
        "print('torch' in sys.modules)\n"
    )
    assert _python(code, env).split() == ["False", "False", "True"]
    if supervised:
        assert read_heartbeat(tmp_path, 0)["phase"] == "done"


@pytest.mark.parametrize("theirs_first", [False, True])
def test_a_scripts_own_trainer_module_shadows_nothing(tmp_path: Path, theirs_first: bool) -> None:
    """A user's ``trainer.py`` beside the script (first on sys.path) stays the script's, and
    rosetrainer still finds its own package, checkpoints included."""
    (tmp_path / "trainer.py").write_text("OWN = 'theirs'\n")
    first, second = (
        ("import trainer", "import rosetrainer")
        if theirs_first
        else ("import rosetrainer", "import trainer")
    )
    (tmp_path / "script.py").write_text(
        f"{first}\n{second}\nimport torch\n"
        "model = torch.nn.Linear(2, 2)\n"
        "rosetrainer.save_checkpoint(rosetrainer.run_dir('.'), model, None, 3, extra={'e': 1})\n"
        "print(trainer.OWN, rosetrainer.load_checkpoint('.', torch.nn.Linear(2, 2)))\n"
    )
    env = unsupervised(os.environ)
    env["PYTHONPATH"] = str(ROOT)  # as the supervisor sets it: after the script's own directory
    out = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "theirs (3, {'e': 1})"


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rosetrainer.nope  # noqa: B018
    assert {"save_checkpoint", "load_checkpoint", "heartbeat", "done"} <= set(dir(rosetrainer))


# -- resume_from and run_dir -------------------------------------------------------------------


def test_resume_from_unsupervised_is_none() -> None:
    assert rosetrainer.resume_from() is None
    assert not rosetrainer.is_supervised()


def test_resume_from_supervised_is_the_chosen_checkpoint(monkeypatch, tmp_path: Path) -> None:
    chosen = tmp_path / "checkpoints" / "step-00000040"
    _supervise(monkeypatch, tmp_path, resume=chosen)
    assert rosetrainer.resume_from() == chosen
    assert rosetrainer.is_supervised()
    _supervise(monkeypatch, tmp_path, resume=None)  # a fresh start
    assert rosetrainer.resume_from() is None


def test_malformed_contract_is_a_value_error(monkeypatch, tmp_path: Path) -> None:
    _supervise(monkeypatch, tmp_path)
    monkeypatch.setenv("ROSE_ATTEMPT", "two")
    with pytest.raises(ValueError, match="ROSE_ATTEMPT"):
        rosetrainer.resume_from()


def test_run_dir_is_the_supervisors_or_the_default(monkeypatch, tmp_path: Path) -> None:
    assert rosetrainer.run_dir() == Path(".")
    assert rosetrainer.run_dir(tmp_path / "mine") == tmp_path / "mine"
    _supervise(monkeypatch, tmp_path / "run")
    assert rosetrainer.run_dir(tmp_path / "mine") == tmp_path / "run"


# -- heartbeat and done ------------------------------------------------------------------------


def test_heartbeat_and_done_unsupervised_write_nothing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert rosetrainer.heartbeat(1) is False
    assert rosetrainer.done(1) is False
    assert list(tmp_path.iterdir()) == []


def test_heartbeat_supervised_reports_step_rank_and_attempt(monkeypatch, tmp_path: Path) -> None:
    _supervise(monkeypatch, tmp_path, rank=3)
    assert rosetrainer.heartbeat(7) is True
    beat = read_heartbeat(tmp_path, 3)
    assert beat is not None
    assert (beat["step"], beat["phase"], beat["attempt"]) == (7, "train", 2)
    assert beat["pid"] == os.getpid()
    assert rosetrainer.heartbeat(8) is False  # throttled: one write per 0.2 s
    assert rosetrainer.heartbeat(8, "eval") is True  # a phase change is always written
    with pytest.raises(ValueError, match="phase"):
        rosetrainer.heartbeat(9, "lunch")


def test_heartbeat_follows_a_changed_environment(monkeypatch, tmp_path: Path) -> None:
    _supervise(monkeypatch, tmp_path / "a", rank=0)
    rosetrainer.heartbeat(1)
    _supervise(monkeypatch, tmp_path / "b", rank=1)
    rosetrainer.heartbeat(2)
    assert read_heartbeat(tmp_path / "a", 0)["step"] == 1
    assert read_heartbeat(tmp_path / "b", 1)["step"] == 2


def test_done_is_written_at_once_and_waits_for_background_saves(
    monkeypatch, tmp_path: Path
) -> None:
    _supervise(monkeypatch, tmp_path)
    model, opt = trained(2)
    rosetrainer.heartbeat(2)
    assert rosetrainer.save_checkpoint(tmp_path, model, opt, 2, async_save=True) is None
    assert rosetrainer.done(2) is True  # not throttled, though a beat was just written
    verify(tmp_path / "checkpoints" / "step-00000002")  # committed before done returned
    beat = read_heartbeat(tmp_path, 0)
    assert (beat["step"], beat["phase"]) == (2, "done")


def _peer_beat(run_dir: Path, rank: int, attempt: int, phase: str) -> None:
    record = {"rank": rank, "pid": 1, "attempt": attempt, "step": 5, "phase": phase, "time": 0}
    (run_dir / "heartbeats").mkdir(parents=True, exist_ok=True)
    (run_dir / "heartbeats" / f"rank-{rank}.json").write_text(json.dumps(record))


def test_done_waits_for_every_rank_of_this_attempt(monkeypatch, tmp_path: Path) -> None:
    """A rank that finished first must not abort at exit before its peers reported done."""
    _supervise(monkeypatch, tmp_path, rank=0)
    monkeypatch.setenv("WORLD_SIZE", "3")
    _peer_beat(tmp_path, 1, attempt=2, phase="done")
    _peer_beat(tmp_path, 2, attempt=1, phase="done")  # an earlier attempt's: not yet
    seen: list[bool] = []
    sleep = time.sleep

    def peer_finishes(seconds: float) -> None:  # rank 2 reports while rank 0 waits
        seen.append(True)
        _peer_beat(tmp_path, 2, attempt=2, phase="done")
        sleep(seconds)

    monkeypatch.setattr(_worker.time, "sleep", peer_finishes)
    assert rosetrainer.done(5) is True
    assert seen  # it waited for rank 2
    assert read_heartbeat(tmp_path, 0)["phase"] == "done"


def test_done_gives_up_waiting_for_a_peer_that_never_reports(monkeypatch, tmp_path: Path) -> None:
    _supervise(monkeypatch, tmp_path, rank=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _peer_beat(tmp_path, 0, attempt=2, phase="train")
    assert rosetrainer.done(5, wait=0.2) is True


# -- save_checkpoint and load_checkpoint -------------------------------------------------------


def test_save_and_load_unsupervised_in_a_directory_of_your_choice(tmp_path: Path) -> None:
    model, opt = trained(3)
    path = rosetrainer.save_checkpoint(
        rosetrainer.run_dir(tmp_path), model, opt, 3, extra={"epoch": 1, "seen": 96}
    )
    assert path == tmp_path / "checkpoints" / "step-00000003"
    assert verify(path)["params_sha256"] == rosetrainer.params_sha256(model)
    model2, opt2 = fresh(seed=5)
    assert rosetrainer.load_checkpoint(tmp_path, model2, opt2) == (3, {"epoch": 1, "seen": 96})
    assert_same_state(model, model2, opt, opt2)
    assert not (tmp_path / "heartbeats").exists()


def test_save_supervised_goes_to_the_run_dir_and_resume_loads_it(
    monkeypatch, tmp_path: Path
) -> None:
    _supervise(monkeypatch, tmp_path)
    model, opt = trained(4)
    rosetrainer.heartbeat(4)
    seen: list[dict] = []
    save = api.save_checkpoint

    def watched(*args, **kwargs):
        seen.append(read_heartbeat(tmp_path, 0))  # this rank's phase while it saves
        return save(*args, **kwargs)

    monkeypatch.setattr(_checkpoint.api, "save_checkpoint", watched)
    path = rosetrainer.save_checkpoint(rosetrainer.run_dir(), model, opt, 4, extra={"epoch": 2})
    assert path == tmp_path / "checkpoints" / "step-00000004"
    assert seen[0]["phase"] == "checkpoint"
    after = read_heartbeat(tmp_path, 0)
    assert (after["step"], after["phase"]) == (4, "train")  # back to training: judged as a step

    # The next attempt is told to resume from it.
    _supervise(monkeypatch, tmp_path, resume=path)
    model2, opt2 = fresh(seed=5)
    step, extra = rosetrainer.load_checkpoint(rosetrainer.resume_from(), model2, opt2)
    assert (step, extra) == (4, {"epoch": 2})
    assert_same_state(model, model2, opt, opt2)
    assert params_sha256(model2) == rosetrainer.params_sha256(model)


def test_a_save_before_the_first_step_keeps_the_startup_phase(monkeypatch, tmp_path: Path) -> None:
    _supervise(monkeypatch, tmp_path)
    model, opt = fresh()
    rosetrainer.save_checkpoint(rosetrainer.run_dir(), model, opt, 0)
    beat = read_heartbeat(tmp_path, 0)
    assert (beat["step"], beat["phase"]) == (0, "startup")


def test_a_failed_save_still_leaves_the_checkpoint_phase(monkeypatch, tmp_path: Path) -> None:
    _supervise(monkeypatch, tmp_path)
    model, opt = trained(1)
    rosetrainer.heartbeat(1)
    with pytest.raises(ValueError, match="extra"):
        rosetrainer.save_checkpoint(tmp_path, model, opt, 1, extra={"bad": object()})
    assert read_heartbeat(tmp_path, 0)["phase"] == "train"
    assert not list((tmp_path / "checkpoints").glob("step-*"))


def test_a_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    model, opt = trained(2)
    path = rosetrainer.save_checkpoint(tmp_path, model, opt, 2)
    assert path is not None
    manifest = json.loads((path / "manifest.json").read_text())
    victim = path / sorted(manifest["files"])[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointInvalid):
        rosetrainer.load_checkpoint(path, fresh()[0])


def test_a_ddp_style_module_prefix_loads(tmp_path: Path) -> None:
    """Scripts save ``model.module`` or the wrapper alike; both load into the bare model."""
    model, opt = trained(2)
    wrapper = torch.nn.Module()
    wrapper.module = model
    rosetrainer.save_checkpoint(tmp_path, wrapper, opt, 2)
    model2, _ = fresh(seed=5)
    rosetrainer.load_checkpoint(tmp_path, model2)
    assert params_sha256(model2) == params_sha256(model)


# -- the examples' pairs and their diffs in the docs ---------------------------------------------

USES = ("from rosetrainer import", "resume_from(", "load_checkpoint(", "save_checkpoint(")
USES += ("heartbeat(", "done(")


def example_diff(pair: str) -> str:
    """``diff -U1`` of a pair, as docs/supervisor.md shows it."""
    plain, adopted = (f"examples/{pair}/{name}.py" for name in ("plain", "adopted"))
    lines = [(ROOT / p).read_text().splitlines(keepends=True) for p in (plain, adopted)]
    return "".join(difflib.unified_diff(*lines, plain, adopted, n=1))


@pytest.mark.parametrize("pair", ["ddp_tutorial", "nanogpt"])
def test_adopted_is_plain_plus_the_rosetrainer_lines_and_the_docs_show_them(pair: str) -> None:
    """Editing one file of a pair without the other, or without the docs, fails here (print
    ``example_diff(pair)`` for the docs' new block)."""
    diff = example_diff(pair)
    added = [ln[1:] for ln in diff.splitlines()[2:] if ln.startswith("+")]
    assert all(not ln.strip() or any(use in ln for use in USES) for ln in added), added
    assert len(added) <= 10
    docs = (ROOT / "docs" / "supervisor.md").read_text()
    block = docs.split(f"examples/{pair}/adopted.py`:\n\n```diff\n", 1)[1].split("```", 1)[0]
    assert block == diff
