"""The trainer's train state (a checkpoint's ``train_state``) and its metrics log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trainer.metrics import MetricsLog
from trainer.train_state import TrainState

# What the trainer has always stored: the field names are the on-disk format.
STORED = {
    "step": 12,
    "position": 96,
    "global_batch": 8,
    "seq_len": 32,
    "num_samples": 975311,
    "metrics_offset": 2509,
}


def test_train_state_round_trips_the_stored_json() -> None:
    state = TrainState.from_dict(STORED)
    assert state == TrainState(**STORED)
    assert state.to_dict() == STORED
    assert list(state.to_dict()) == list(STORED)
    assert json.loads(json.dumps(state.to_dict())) == STORED


def test_skipped_ranges_round_trip_and_are_left_out_when_none() -> None:
    state = TrainState.from_dict({**STORED, "skipped": [[16, 32], [40, 48]]})
    assert state.skipped == ((16, 32), (40, 48)) and state.skipped_samples == 24
    stored = json.loads(json.dumps(state.to_dict()))
    assert stored["skipped"] == [[16, 32], [40, 48]]
    assert TrainState.from_dict(stored) == state
    assert "skipped" not in TrainState.from_dict(STORED).to_dict()


@pytest.mark.parametrize(
    ("skipped", "words"),
    [
        ([[32, 16]], "not an ordered range"),
        ([[16, 32], [24, 40]], "not an ordered range"),  # overlaps the one before
        ([[-8, 0]], "not an ordered range"),
        ([[0, 97]], "not an ordered range"),  # past the position reached (96)
        ([[0, 8.0]], "is not [start, end]"),
        ([[0, True]], "is not [start, end]"),
        ([[0, 8, 16]], "is not [start, end]"),
        ({"0": 8}, "must be a list of ranges"),
    ],
)
def test_skipped_ranges_must_be_ordered_ranges_behind_the_position(
    skipped: object, words: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        TrainState.from_dict({**STORED, "skipped": skipped})


def test_train_state_of_older_checkpoints_takes_defaults() -> None:
    old = {k: v for k, v in STORED.items() if k not in ("global_batch", "metrics_offset")}
    state = TrainState.from_dict({**old, "extra": "ignored"}, default_global_batch=16)
    assert (state.global_batch, state.metrics_offset) == (16, 0)
    with pytest.raises(ValueError, match="lacks global_batch"):
        TrainState.from_dict(old)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("step", -1),
        ("position", -8),
        ("metrics_offset", -1),
        ("global_batch", 0),
        ("seq_len", 0),
        ("num_samples", 0),
        ("step", 3.0),
        ("position", "96"),
        ("step", True),
        ("seq_len", None),
    ],
)
def test_train_state_refuses_wrong_types_and_ranges(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"train_state\.{field} must be an integer"):
        TrainState.from_dict({**STORED, field: value})


def test_train_state_needs_a_json_object() -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        TrainState.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lacks step, position"):
        TrainState.from_dict({"extra": 1}, default_global_batch=8)


def test_metrics_log_appends_and_is_cut_back_to_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    log.open()
    assert log.offset == 0
    log.append({"step": 1, "loss": 5.0})
    at_checkpoint = log.offset
    log.append({"step": 2, "loss": 4.0})
    assert log.offset == path.stat().st_size > at_checkpoint
    log.close()
    log.close()  # idempotent

    kept = MetricsLog(path, enabled=True)
    kept.open(truncate_to=None)  # a checkpoint from another run: the file stays whole
    assert kept.offset == path.stat().st_size
    kept.close()

    resumed = MetricsLog(path, enabled=True)
    resumed.open(truncate_to=at_checkpoint)
    assert resumed.offset == at_checkpoint
    resumed.append({"step": 2, "loss": 3.5})
    resumed.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 3.5}]


def test_disabled_metrics_log_writes_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl", enabled=False)
    log.open(truncate_to=0)
    log.append({"step": 1})
    log.close()
    assert log.offset == 0 and not (tmp_path / "run").exists()
