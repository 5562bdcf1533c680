"""Retention: keep_last counts only valid checkpoints, prunes after a commit, keeps milestones."""

from __future__ import annotations

import pytest

from tests.scripts.ckpt_model import trained
from trainer.checkpoint import CheckpointStore, RetentionPolicy, find_latest_valid


def steps_on_disk(run_dir):
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_keep_last_and_milestones(tmp_path):
    model, opt = trained(1)
    events = []
    with CheckpointStore(
        tmp_path, is_writer=True, keep_last=2, keep_every=4, on_event=events.append
    ) as store:
        for step in range(1, 10):
            store.save(step, model, opt, None, {}, {})
    assert steps_on_disk(tmp_path) == [4, 8, 9]  # newest two (8, 9) plus milestone 4
    pruned = sorted(e["step"] for e in events if e["type"] == "checkpoint_pruned")
    assert pruned == [1, 2, 3, 5, 6, 7]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".del-")]


def test_invalid_checkpoints_do_not_count(tmp_path):
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, keep_last=2, async_save=False) as store:
        store.save(1, model, opt, None, {}, {})
        store.save(2, model, opt, None, {}, {})
    (tmp_path / "checkpoints" / "step-00000002" / "manifest.json").unlink()
    with CheckpointStore(tmp_path, is_writer=True, keep_last=2, async_save=False) as store:
        store.save(3, model, opt, None, {}, {})
    # Valid: 3 and 1 are the two newest valid ones; the broken 2 is left for quarantine.
    assert steps_on_disk(tmp_path) == [1, 2, 3]
    with CheckpointStore(tmp_path, is_writer=True, keep_last=2, async_save=False) as store:
        store.save(4, model, opt, None, {}, {})
    assert steps_on_disk(tmp_path) == [3, 4]
    assert find_latest_valid(tmp_path).name == "step-00000004"


def test_nothing_is_pruned_when_a_save_fails(tmp_path):
    model, opt = trained(1)
    with CheckpointStore(tmp_path, is_writer=True, keep_last=1, async_save=False) as store:
        store.save(1, model, opt, None, {}, {})
        # A failed save (here: state that cannot be captured) must leave step 1 in place.
        with pytest.raises(ValueError):
            store.save(2, model, opt, None, {"x": {1, 2}}, {})
    assert steps_on_disk(tmp_path) == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last must be an integer >= 1"),
        ({"keep_last": -3}, "got -3"),
        ({"keep_every": -1}, "keep_every must be an integer >= 0"),
        ({"keep_last": 2.5}, "got 2.5"),
    ],
)
def test_policy_validation_names_the_bad_value(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)
    with pytest.raises(ValueError, match=message):
        CheckpointStore(tmp_path, is_writer=True, **kwargs)
    assert not (tmp_path / "checkpoints").exists()  # rejected before touching the disk
