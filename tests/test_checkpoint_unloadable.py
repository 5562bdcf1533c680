"""Checkpoints whose hashes match but whose contents no trainer can resume from.

State that JSON alone shows to be wrong (``train_state`` fields, optimizer steps) is invalid:
``verify`` refuses it and ``find_latest_valid`` quarantines it like a corrupt file. What only a
load against the model can find (tensor shape or dtype) verifies, and ``load`` names it. Every
case is a real checkpoint rewritten and resealed so that sizes and sha256s match again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.scripts.ckpt_model import fresh
from tests.scripts.ckpt_tamper import replace_file, replace_tensors, reseal, two_checkpoints
from trainer.checkpoint import (
    CheckpointIncompatible,
    CheckpointInvalid,
    CheckpointUnloadable,
    find_latest_valid,
    load,
    verify,
)
from trainer.checkpoint.integrity import mark_unloadable
from trainer.checkpoint.layout import (
    MANIFEST,
    MODEL_FILE,
    OPTIM_FILE,
    REASON_FILE,
    STATE_FILE,
    UNLOADABLE_FILE,
)


def _train_state(**fields: object) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        reseal(ckpt, lambda man: man["train_state"].update(fields))

    return damage


def _negative_step_tensor(ckpt: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        name = next(k for k in tensors if k.endswith(".step"))
        tensors[name] = torch.tensor(-1.0)

    replace_tensors(ckpt, OPTIM_FILE, edit)


def _negative_step_number(ckpt: Path) -> None:
    state = json.loads((ckpt / STATE_FILE).read_bytes())
    first = state["optimizer"]["state"]["__dict__"][0][1]
    first["step"] = -3
    replace_file(ckpt, STATE_FILE, json.dumps(state).encode())


def _missing_step_tensor(ckpt: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[next(k for k in tensors if k.endswith(".step"))]

    replace_tensors(ckpt, OPTIM_FILE, edit)


INVALID_STATE = [
    ("position-not-int", _train_state(position="abc"), "train_state position is 'abc'"),
    ("negative-step", _train_state(step=-1), "train_state step is -1"),
    ("step-not-manifests", _train_state(step=5), "train_state step 5 is not the manifest's step 2"),
    ("bool-position", _train_state(position=True), "train_state position is True"),
    ("negative-optimizer-step-tensor", _negative_step_tensor, "is -1.0, not a number >= 0"),
    ("negative-optimizer-step-number", _negative_step_number, "is -3, not a number >= 0"),
    ("missing-optimizer-step-tensor", _missing_step_tensor, f"missing from {OPTIM_FILE}"),
    (
        "state-not-an-object",
        lambda c: replace_file(c, STATE_FILE, b"[1, 2]"),
        "state.json is not a JSON object",
    ),
    (
        "skipped-backwards",
        _train_state(position=16, skipped=[[8, 4]]),
        "is not an ordered range of positions",
    ),
    (
        "skipped-past-position",
        _train_state(position=4, skipped=[[0, 8]]),
        "is not an ordered range of positions",
    ),
    ("skipped-not-pairs", _train_state(skipped=[3]), "range 3 is not"),
    (
        "finite-false",
        lambda c: reseal(c, lambda man: man.update(finite=False)),
        "records tensors holding NaN or infinity",
    ),
    (
        "finite-not-a-bool",
        lambda c: reseal(c, lambda man: man.update(finite="yes")),
        "field 'finite' is",
    ),
]


@pytest.mark.parametrize(
    ("damage", "reason"), [c[1:] for c in INVALID_STATE], ids=[c[0] for c in INVALID_STATE]
)
def test_state_no_trainer_can_resume_is_invalid_and_quarantined(tmp_path, damage, reason):
    newest = two_checkpoints(tmp_path)
    damage(newest)
    with pytest.raises(CheckpointInvalid, match=reason):
        verify(newest)
    assert find_latest_valid(tmp_path).name == "step-00000001"
    moved = tmp_path / "checkpoints" / "quarantine" / newest.name
    assert reason in (moved / REASON_FILE).read_text()


def test_flipped_format_version_byte_is_corruption_not_a_newer_format(tmp_path):
    newest = two_checkpoints(tmp_path)
    path = newest / MANIFEST
    path.write_bytes(path.read_bytes().replace(b'"format_version": 1', b'"format_version": 9'))
    with pytest.raises(CheckpointInvalid, match="does not match its own manifest_sha256"):
        verify(newest)
    assert find_latest_valid(tmp_path).name == "step-00000001"
    assert (tmp_path / "checkpoints" / "quarantine" / newest.name).is_dir()


def test_sealed_newer_format_is_skipped_not_quarantined(tmp_path):
    newest = two_checkpoints(tmp_path)
    reseal(newest, lambda man: man.update(format_version=9))
    with pytest.raises(CheckpointIncompatible, match="format_version 9"):
        verify(newest)
    events = []
    assert find_latest_valid(tmp_path, on_event=events.append).name == "step-00000001"
    assert newest.is_dir() and [e["type"] for e in events] == ["checkpoint_skipped"]


def _wider(tensors: dict[str, torch.Tensor]) -> None:
    tensors["up.weight"] = torch.zeros(33, 16)


def _float64(tensors: dict[str, torch.Tensor]) -> None:
    tensors["up.weight"] = tensors["up.weight"].double()


@pytest.mark.parametrize(
    ("edit", "words"),
    [(_wider, "up.weight: checkpoint (33, 16) vs model (32, 16)"), (_float64, "torch.float64")],
    ids=["shape", "dtype"],
)
def test_tensor_that_verifies_but_does_not_fit_is_named_by_load(tmp_path, edit, words):
    newest = two_checkpoints(tmp_path)
    replace_tensors(newest, MODEL_FILE, edit)
    verify(newest)  # every hash matches: only a load against the model can tell
    model, opt = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointIncompatible, match=words.replace("(", r"\(").replace(")", r"\)")):
        load(newest, model, opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_params_that_do_not_hash_to_the_manifest_are_unloadable(tmp_path):
    newest = two_checkpoints(tmp_path)
    replace_tensors(newest, MODEL_FILE, lambda t: t["up.weight"].add_(1.0))
    verify(newest)
    with pytest.raises(CheckpointUnloadable, match="do not match params_sha256"):
        load(newest, *fresh())


def test_unloadable_mark_makes_it_invalid_and_its_reason_reaches_the_quarantine(tmp_path):
    newest = two_checkpoints(tmp_path)
    verify(newest)
    mark_unloadable(newest, "up.weight: checkpoint (33, 16)\nvs model (32, 16)")
    with pytest.raises(CheckpointInvalid, match=r"unloadable: up.weight: checkpoint \(33, 16\) vs"):
        verify(newest)
    assert find_latest_valid(tmp_path).name == "step-00000001"
    moved = tmp_path / "checkpoints" / "quarantine" / newest.name
    assert "unloadable: up.weight" in (moved / REASON_FILE).read_text()
    assert (moved / UNLOADABLE_FILE).is_file()


def test_a_manifest_verified_elsewhere_is_not_hashed_again_but_the_parameters_are(
    tmp_path: Path,
) -> None:
    # What a rank does with the verdict rank 0 shared: no second read and hash of every file,
    # but its own check of the parameters it loaded.
    ckpt = two_checkpoints(tmp_path)
    manifest = verify(ckpt)
    optim = ckpt / OPTIM_FILE
    data = bytearray(optim.read_bytes())
    data[-1] ^= 0x01  # a byte of tensor data: the file no longer hashes to its manifest entry
    optim.write_bytes(bytes(data))
    with pytest.raises(CheckpointInvalid, match=OPTIM_FILE):
        load(ckpt, fresh()[0], fresh()[1])
    model, opt = fresh()
    assert load(ckpt, model, opt, verified=manifest)["step"] == 2
    # The parameters themselves are always checked: a manifest from another checkpoint fails.
    other = verify(tmp_path / "checkpoints" / "step-00000001")
    with pytest.raises(CheckpointUnloadable, match="params_sha256"):
        load(ckpt, fresh()[0], verified=other)
