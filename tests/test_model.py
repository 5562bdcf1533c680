"""The GPT: shapes, weight tying, causality, and that it can learn."""

from __future__ import annotations

import pytest
import torch

from trainer.config import model_config
from trainer.model import GPT


def tiny(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("tiny", vocab_size=256, dropout=dropout))


def test_forward_shapes_and_initial_loss_near_uniform() -> None:
    model = tiny()
    idx, targets = torch.randint(0, 256, (2, 3, 40))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 40, 256)
    assert loss is not None
    # Small initial weights: predictions start close to uniform, loss close to ln(256) = 5.55.
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.2
    assert model(idx)[1] is None


def test_head_is_tied_to_the_embedding_and_counted_once() -> None:
    model = tiny()
    assert model.head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names and "wte.weight" in names
    assert model.num_params() == sum(p.numel() for _, p in model.named_parameters())
    assert model.num_params() < 1_000_000


def test_small_preset_has_a_few_million_parameters() -> None:
    n = GPT(model_config("small", vocab_size=256, dropout=0.0)).num_params()
    assert 2_000_000 < n < 10_000_000


def test_attention_is_causal() -> None:
    model = tiny().eval()
    a = torch.randint(0, 256, (1, 20))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 256  # change only the future of position 9
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    assert torch.equal(la[0, :10], lb[0, :10])
    assert not torch.equal(la[0, 10:], lb[0, 10:])


def test_dropout_is_random_in_training_and_off_in_eval() -> None:
    model = tiny(dropout=0.3)
    idx = torch.randint(0, 256, (2, 16))
    torch.manual_seed(1)
    first = model(idx)[0]
    torch.manual_seed(1)
    same = model(idx)[0]
    second = model(idx)[0]
    assert torch.equal(first, same)  # the global generator decides: reseeding replays it
    assert not torch.equal(first, second)
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_rejects_sequence_longer_than_context() -> None:
    with pytest.raises(ValueError, match="exceeds the context 64"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


def test_a_few_steps_fit_a_fixed_batch() -> None:
    model = tiny()
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=3e-3)
    idx = torch.randint(0, 256, (4, 32))
    first = None
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        assert loss is not None
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.0


def test_optimizer_groups_split_decay_from_no_decay() -> None:
    model = tiny()
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
