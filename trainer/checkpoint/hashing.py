"""The file hashes a manifest may record: sha256 for disk, xxh3-128 for the memory tier.

A manifest names its algorithm in ``file_hash`` (absent: sha256, as every manifest before the
field existed), and each file entry carries its digest under that name. xxh3 is not
cryptographic; it catches a flipped byte or a torn write at memory speed, which is what a
snapshot in shared memory needs. The manifest's own self-hash stays sha256 (it is a few KB).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

SHA256 = "sha256"
XXH3_128 = "xxh3_128"
DEFAULT = SHA256
FAST = XXH3_128


class Hasher(Protocol):
    """What :mod:`hashlib` and :mod:`xxhash` objects share."""

    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


def _xxh3_128() -> Hasher:
    import xxhash  # only the memory tier pays for the import

    return xxhash.xxh3_128()


_MAKERS: dict[str, Callable[[], Hasher]] = {SHA256: hashlib.sha256, XXH3_128: _xxh3_128}
NAMES = tuple(_MAKERS)


def new(name: str) -> Hasher:
    """A fresh hasher of algorithm ``name``; ValueError for a name this code does not know."""
    maker = _MAKERS.get(name)
    if maker is None:
        raise ValueError(f"unknown file hash {name!r} (this code knows {', '.join(NAMES)})")
    return maker()
