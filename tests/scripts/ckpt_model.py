"""A tiny deterministic model and its training, shared by the checkpoint tests and their scripts.

``trained(steps)`` gives the same bytes in every process (one thread, fixed seed), so a test can
rebuild what a killed writer process saved and compare it bitwise with what loads back.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding tied to the output head, one layer norm, one MLP: every kind of state we save."""

    def __init__(self, vocab: int = 32, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: stored once, loaded into both names
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h)


def fresh(seed: int = 0, dim: int = 16, hidden: int = 32) -> tuple[TinyLM, torch.optim.Optimizer]:
    """A new model and AdamW optimizer, initialised from ``seed``."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = TinyLM(dim=dim, hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def train(model: TinyLM, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    """Optimizer steps ``start+1 .. stop``; the batch of each step depends only on its number."""
    for step in range(start + 1, stop + 1):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randint(0, 32, (4, 8), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        model.seen += 1


def trained(steps: int, seed: int = 0, **size: int) -> tuple[TinyLM, torch.optim.Optimizer]:
    """A model and optimizer after ``steps`` steps from a fresh start."""
    model, opt = fresh(seed, **size)
    train(model, opt, 0, steps)
    return model, opt


def assert_same_state(
    model_a: nn.Module,
    model_b: nn.Module,
    opt_a: torch.optim.Optimizer,
    opt_b: torch.optim.Optimizer,
) -> None:
    """Raise AssertionError unless both models and both optimizers hold bitwise-equal state."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"model tensor {k} differs"
    oa, ob = opt_a.state_dict(), opt_b.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        for key, va in oa["state"][pid].items():
            vb = ob["state"][pid][key]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), f"optimizer state[{pid}].{key} differs"
            else:
                assert va == vb
