"""``manifest.json``: what a checkpoint claims to hold, and a self-check of its own bytes.

Fields (all written by :func:`build`):

``format_version``, ``step``, ``tokens_seen``, ``config``, ``world_size``, ``torch_version``,
``created_at`` (unix seconds), ``files`` (``{name: {"size": int, "sha256": hex}}``; the digest
is under the name of ``file_hash`` when a manifest records one: ``xxh3_128`` in the memory tier),
``params_sha256`` (sha256 over the parameters' bytes in ``named_parameters()`` order; under
``params_xxh3_128`` instead when ``file_hash`` is xxh3), ``finite`` (no parameter or optimizer
tensor holds a NaN or an infinity; a checkpoint without the field, written before it existed, is
not judged by it), ``train_state``,
any extra keys the trainer passed in ``meta``, and
``manifest_sha256``: sha256 of the manifest's canonical JSON without that field, so a flipped byte
inside the manifest itself is caught too.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, TypeGuard

from . import fsio, hashing
from .errors import CheckpointIncompatible, CheckpointInvalid, invalid_on_error
from .layout import FORMAT_VERSION, MANIFEST

RESERVED = (
    "format_version",
    "step",
    "tokens_seen",
    "config",
    "world_size",
    "torch_version",
    "created_at",
    "files",
    "file_hash",
    "params_sha256",
    "params_xxh3_128",
    "finite",
    "train_state",
    "manifest_sha256",
)


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def check_meta(meta: dict[str, Any]) -> None:
    """Raise ValueError when ``meta`` sets a manifest field the store itself owns."""
    clash = sorted(
        k for k in meta if k in RESERVED and k not in ("tokens_seen", "config", "world_size")
    )
    if clash:
        raise ValueError(f"meta may not set the manifest's own fields {clash}")


def params_key(algo: str) -> str:
    """The manifest field of the parameters' digest under the file hash ``algo``."""
    return f"params_{algo}"


def build(
    step: int,
    files: dict[str, dict[str, Any]],
    params_digest: str,
    train_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    finite: bool,
    file_hash: str = hashing.DEFAULT,
    sealed: bool = True,
) -> dict[str, Any]:
    """The manifest of one checkpoint; ``meta`` keys other than the reserved ones are kept as-is.
    ``finite`` records whether every parameter and optimizer tensor is finite; ``file_hash``
    names the files' checksum, recorded only when it is not sha256 (so disk manifests read as
    they always did), and the algorithm of ``params_digest`` (:func:`params_key`).
    ``sealed``: with its ``manifest_sha256`` (else :func:`compact_bytes` adds it).

    Raises ValueError when ``meta`` tries to set a field the store owns.
    """
    check_meta(meta)
    import torch  # here, not at the top: verifying must not pay for importing torch

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "tokens_seen": int(meta.get("tokens_seen", 0)),
        "config": meta.get("config", {}),
        "world_size": int(meta.get("world_size", 1)),
        "torch_version": torch.__version__,
        "created_at": time.time(),
        "files": files,
        params_key(file_hash): params_digest,
        "finite": bool(finite),
        "train_state": train_state,
    }
    if file_hash != hashing.SHA256:
        manifest["file_hash"] = file_hash
    for k, v in meta.items():
        manifest.setdefault(k, v)
    if sealed:
        manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    return manifest


def to_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes written to ``manifest.json``: indented, since people read a disk checkpoint's
    with ``inspect``."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def compact_bytes(body: dict[str, Any]) -> bytes:
    """The bytes of ``body`` (from ``build(..., sealed=False)``) in canonical form, with
    ``manifest_sha256`` appended: one JSON encoding instead of two, for the memory tier's
    snapshots, which nobody reads by eye. :func:`read` takes either form."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f'{canonical[:-1]},"manifest_sha256":"{digest}"}}\n'.encode()


#: A manifest is a few KB; anything far larger is not one (and is not read into memory).
MAX_MANIFEST_BYTES = 16 << 20


def read(ckpt: Path, dir_fd: int | None = None) -> dict[str, Any]:
    """Parse and self-check ``ckpt/manifest.json`` (``dir_fd``: ``ckpt`` already opened).

    The self-hash is checked before the format version: a flipped byte reads as corruption, never
    as a newer format (every format keeps ``manifest_sha256`` computed as it is here). Raises
    CheckpointInvalid (missing, not a regular file, unparsable, self-hash wrong, fields missing or
    of the wrong type) or CheckpointIncompatible (written by a newer format than this code reads).
    """
    if dir_fd is None:
        with invalid_on_error(ckpt, "the checkpoint directory"), fsio.open_dir(ckpt) as fd:
            return read(ckpt, fd)
    with invalid_on_error(ckpt, MANIFEST):
        try:
            raw = fsio.read_regular(MANIFEST, dir_fd, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise CheckpointInvalid("missing manifest.json", ckpt) from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointInvalid(f"manifest.json is not valid JSON ({e})", ckpt) from e
    except RecursionError:
        raise CheckpointInvalid("manifest.json is nested too deeply", ckpt) from None
    if not isinstance(manifest, dict):
        raise CheckpointInvalid("manifest.json is not a JSON object", ckpt)
    if manifest.get("manifest_sha256") != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise CheckpointInvalid("manifest.json does not match its own manifest_sha256", ckpt)
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointInvalid("manifest.json has no positive integer format_version", ckpt)
    if version > FORMAT_VERSION:
        raise CheckpointIncompatible(
            f"{ckpt} has checkpoint format_version {version}; this code reads up to "
            f"{FORMAT_VERSION}: a rosetrainer release that reads format {version} is needed"
        )
    required: list[tuple[str, type]] = [("step", int), ("files", dict), ("train_state", dict)]
    algo = manifest.get("file_hash", hashing.SHA256)
    if algo in hashing.NAMES:  # an unknown one is reported by file_hash(), by name
        required.append((params_key(algo), str))
    for key, typ in required:
        value = manifest.get(key)
        if not isinstance(value, typ) or (typ is int and not _is_int(value)):
            raise CheckpointInvalid(
                f"manifest.json field {key!r} is missing or not a {typ.__name__}", ckpt
            )
    if manifest["step"] < 0:
        raise CheckpointInvalid(f"manifest.json step {manifest['step']} is negative", ckpt)
    return manifest


def file_hash(manifest: dict[str, Any]) -> str:
    """The files' checksum a (read) manifest records: ``file_hash``, sha256 when absent. Raises
    ValueError when it names one this code does not know."""
    name = manifest.get("file_hash", hashing.SHA256)
    if not isinstance(name, str) or name not in hashing.NAMES:
        raise ValueError(f"manifest names an unknown file_hash {json.dumps(name)[:40]}")
    return name


def payload_bytes(manifest: dict[str, Any]) -> int:
    """The bytes of the files a (read) manifest lists: what its checkpoint takes on disk, whatever
    else someone left in its directory."""
    sizes = (f.get("size") for f in manifest["files"].values() if isinstance(f, dict))
    return sum(size for size in sizes if _is_int(size) and size > 0)


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int  # bool is an int to Python, never to a manifest
