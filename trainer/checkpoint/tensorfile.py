"""Write a dict of tensors as a safetensors file, streamed from the tensors' own memory.

The safetensors format is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``, space-padded) and the raw
little-endian bytes of each tensor, back to back. ``safetensors.torch.save`` first builds the
whole file as one ``bytes`` object (a second copy of the state, plus a slow per-tensor
conversion); writing the same layout straight from each tensor's buffer saves both. Reading stays
with the ``safetensors`` library, whose parser validates every offset and never executes anything.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from . import fsio, hashing

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_CHUNK = 8 << 20


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in place, no copy. Raises ValueError unless it is contiguous and on
    the host."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensors must be contiguous and on the host (snapshot them first)")
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[tuple[int, int]]]:
    """The head of a file holding ``tensors`` in order (length, JSON header, padding) and each
    tensor's ``(start, end)`` in the data after it. Raises ValueError for a dtype the format
    does not store."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    spans = []
    offset = 0
    for name, t in tensors.items():
        dtype = _DTYPES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which checkpoints do not store")
        span = (offset, offset + t.nbytes)
        meta[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": list(span)}
        spans.append(span)
        offset = span[1]
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(raw)) + raw, spans


def _pieces(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[memoryview]]:
    head, _ = header(tensors)
    return head, [host_bytes(t) for t in tensors.values()]


def _chunks(head: bytes, views: list[memoryview]) -> Iterator[memoryview]:
    yield memoryview(head)
    for view in views:
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]


def write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    pause_phase: str | None = None,
    algo: str = hashing.DEFAULT,
    durable: bool = True,
) -> dict[str, int | str]:
    """Write ``tensors`` (contiguous, on the host) to ``path``, fsync'd when ``durable``; return
    its size and its ``algo`` digest (``fsio.write_chunks``).

    Raises ValueError for a dtype the format does not store, OSError from the file system as-is.
    """
    if sys.byteorder != "little":  # safetensors is little-endian; we write memory as it is
        raise RuntimeError("checkpoints can only be written on a little-endian machine")
    head, views = _pieces(tensors)
    total = len(head) + sum(len(v) for v in views)
    return fsio.write_chunks(path, _chunks(head, views), total, pause_phase, algo, durable)
