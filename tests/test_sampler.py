"""The sampler: a seeded global order, disjoint rank slices, and resume by position."""

from __future__ import annotations

import pytest

from trainer.sampler import ResumableSampler, derive_seed


def step_ids(samplers: list[ResumableSampler], step: int) -> list[int]:
    """All ids one optimizer step consumes, every rank's every micro-step."""
    s0 = samplers[0]
    start = step * s0.global_batch
    return [i for s in samplers for k in range(s.grad_accum) for i in s.micro_batch_ids(start, k)]


def world(n: int, world_size: int, micro: int, accum: int, seed: int = 7) -> list[ResumableSampler]:
    return [ResumableSampler(n, seed, world_size, r, micro, accum) for r in range(world_size)]


def test_an_epoch_is_a_permutation_seeded_by_seed_and_epoch() -> None:
    s = ResumableSampler(num_samples=50, seed=3)
    e0, e1 = list(s.permutation(0)), list(s.permutation(1))
    assert sorted(e0) == list(range(50)) and sorted(e1) == list(range(50))
    assert e0 != e1
    assert list(ResumableSampler(50, seed=3).permutation(0)) == e0
    assert list(ResumableSampler(50, seed=4).permutation(0)) != e0


def test_ranks_read_disjoint_slices_that_cover_each_step() -> None:
    samplers = world(n=1000, world_size=2, micro=3, accum=2)
    for step in range(5):
        ids = step_ids(samplers, step)
        assert len(ids) == len(set(ids)) == 12
        assert sorted(ids) == sorted(samplers[0].ids_at(step * 12, 12))


def test_no_sample_is_skipped_or_repeated_within_an_epoch() -> None:
    samplers = world(n=96, world_size=2, micro=4, accum=3)  # 24 per step, 4 steps per epoch
    consumed = [i for step in range(4) for i in step_ids(samplers, step)]
    assert sorted(consumed) == list(range(96))
    # The next epoch starts over with a fresh order.
    nxt = [i for step in range(4, 8) for i in step_ids(samplers, step)]
    assert sorted(nxt) == list(range(96)) and nxt != consumed


def test_epoch_boundary_inside_a_step_neither_skips_nor_repeats() -> None:
    s = ResumableSampler(num_samples=10, seed=1)
    ids = s.ids_at(7, 6)  # positions 7..12: 3 from epoch 0, 3 from epoch 1
    assert ids[:3] == list(s.permutation(0)[7:]) and ids[3:] == list(s.permutation(1)[:3])


def test_resume_from_a_position_continues_the_same_order() -> None:
    full = world(n=500, world_size=2, micro=2, accum=2)
    uninterrupted = [step_ids(full, step) for step in range(20)]
    resumed = world(n=500, world_size=2, micro=2, accum=2)  # fresh objects: no carried state
    assert [step_ids(resumed, step) for step in range(9, 20)] == uninterrupted[9:]


def test_resume_with_another_world_size_keeps_the_global_order() -> None:
    # Elastic resume: 2 ranks x 2 accum becomes 4 ranks x 1 accum; the global batch is the same
    # and each step consumes the same set of samples.
    before = world(n=500, world_size=2, micro=2, accum=2)
    after = world(n=500, world_size=4, micro=2, accum=1)
    for step in range(10):
        assert sorted(step_ids(before, step)) == sorted(step_ids(after, step))


def test_derive_seed_is_stable_and_sensitive_to_every_part() -> None:
    assert derive_seed("step", 1, 0, 5) == derive_seed("step", 1, 0, 5)
    seeds = {derive_seed("step", 1, r, s) for r in range(2) for s in range(50)}
    assert len(seeds) == 100
    assert 0 <= derive_seed("x") < 2**63


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_samples must be positive, got 0"):
        ResumableSampler(0, seed=1)
    with pytest.raises(ValueError, match="rank 2 is outside a world of size 2"):
        ResumableSampler(10, seed=1, world_size=2, rank=2)
    with pytest.raises(ValueError, match="micro_step 1"):
        ResumableSampler(10, seed=1).micro_batch_ids(0, 1)
