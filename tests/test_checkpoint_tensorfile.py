"""The streamed safetensors writer: what it writes, the safetensors library reads back exactly."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint.tensorfile import write_safetensors


def test_every_stored_dtype_round_trips_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(9, generator=g).bfloat16(),
        "i64": torch.arange(-5, 5),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "t.safetensors"
    info = write_safetensors(path, tensors)
    data = path.read_bytes()
    assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(
            back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        ), k


def test_large_tensor_spans_many_chunks(tmp_path):
    big = torch.arange(5_000_000, dtype=torch.float32)  # 20 MB: several 8 MB chunks
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {"a": torch.ones(3), "big": big})
    back = load_file(path)
    assert torch.equal(back["big"], big) and torch.equal(back["a"], torch.ones(3))


def test_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        write_safetensors(tmp_path / "c", {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="contiguous"):
        write_safetensors(tmp_path / "t", {"t": torch.zeros(3, 4).t()})
