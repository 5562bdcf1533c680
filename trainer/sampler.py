"""The resumable, deterministic distributed sampler.

There is one global order of training samples: epoch `e` is a permutation of all sample ids
seeded by `(seed, e)`, and the epochs follow each other. A *position* counts the samples consumed
so far in that order; the run's only data state is that one integer.

One optimizer step consumes the next `global_batch = world_size * micro_batch * grad_accum`
positions. Within a step, micro-step `k` of rank `r` reads the `micro_batch` positions starting at
`step_start + (k * world_size + r) * micro_batch`. Because the order is defined by position and
not by rank, a resume continues the same global order even with another world size: what was
consumed is never repeated and what was not is never skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (e.g. seed, rank, step), stable across runs,
    platforms and Python versions (unlike `hash`)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class ResumableSampler:
    """Maps global positions to sample ids and hands each rank its slice of a step.

    Raises ValueError when a count is not positive or the rank is outside the world.
    """

    num_samples: int
    """Sample ids are 0 .. num_samples-1."""
    seed: int
    """With the epoch, seeds the epoch's permutation."""
    world_size: int = 1
    rank: int = 0
    micro_batch: int = 1
    grad_accum: int = 1

    def __post_init__(self) -> None:
        for name in ("num_samples", "world_size", "micro_batch", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"ResumableSampler.{name} must be positive, got {getattr(self, name)}"
                )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of size {self.world_size}")
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        """Samples consumed by one optimizer step across all ranks."""
        return self.world_size * self.micro_batch * self.grad_accum

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all sample ids in `epoch` (cached: consecutive calls share it)."""
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64(derive_seed("sampler", self.seed, epoch)))
            self._perm = rng.permutation(self.num_samples)
            self._epoch = epoch
        return self._perm

    def ids_at(self, position: int, count: int) -> list[int]:
        """The sample ids at global positions `position .. position+count-1`, across epochs."""
        ids: list[int] = []
        while count > 0:
            epoch, offset = divmod(position, self.num_samples)
            take = min(count, self.num_samples - offset)
            ids.extend(int(i) for i in self.permutation(epoch)[offset : offset + take])
            position += take
            count -= take
        return ids

    def micro_batch_ids(self, step_start: int, micro_step: int) -> list[int]:
        """This rank's sample ids for `micro_step` of the step that begins at global position
        `step_start`."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step {micro_step} outside 0..{self.grad_accum - 1}")
        offset = (micro_step * self.world_size + self.rank) * self.micro_batch
        return self.ids_at(step_start + offset, self.micro_batch)
