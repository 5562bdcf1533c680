"""Corpus samples as (input, target) token tensors on the training device."""

from __future__ import annotations

import numpy as np
import torch

from trainer.data import Corpus


class Batches:
    """Builds micro-batches on the host and copies them to the device.

    On CUDA the host rows are pinned first: only a copy from pinned memory is asynchronous, and
    the trainer asks for the next micro-batch (:meth:`prefetch`) while the device still works on
    the current one, so building and copying it overlaps the compute.
    """

    def __init__(self, corpus: Corpus, seq_len: int, device: torch.device) -> None:
        self.corpus, self.seq_len, self.device = corpus, seq_len, device
        self._ahead: tuple[list[int], torch.Tensor] | None = None

    def train(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The training samples ``ids``: the prefetched batch when it is the one, else loaded
        now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == ids:
            return _split(ahead[1])
        return _split(self._load(ids))

    def prefetch(self, ids: list[int] | None) -> None:
        """Start loading the training samples ``ids`` (None: nothing follows)."""
        self._ahead = None if ids is None else (ids, self._load(ids))

    def val(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` held-out samples from ``start`` on, wrapping around the held-out part."""
        n = self.corpus.num_val_samples(self.seq_len)
        rows = [self.corpus.val_sample((start + j) % n, self.seq_len) for j in range(count)]
        return _split(self._to_device(rows))

    def _load(self, ids: list[int]) -> torch.Tensor:
        return self._to_device([self.corpus.sample(i, self.seq_len) for i in ids])

    def _to_device(self, rows: list[np.ndarray]) -> torch.Tensor:
        t = torch.from_numpy(np.stack(rows))
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and target: each row of ``seq_len + 1`` tokens, and the same shifted by one."""
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
