"""``manifest.json``: what a checkpoint claims to hold, and a self-check of its own bytes.

Fields (all written by :func:`build`):

``format_version``, ``step``, ``tokens_seen``, ``config``, ``world_size``, ``torch_version``,
``created_at`` (unix seconds), ``files`` (``{name: {"size": int, "sha256": hex}}``),
``params_sha256``, ``train_state``, any extra keys the trainer passed in ``meta``, and
``manifest_sha256``: sha256 of the manifest's canonical JSON without that field, so a flipped byte
inside the manifest itself is caught too.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from .errors import CheckpointIncompatible, CheckpointInvalid
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
    "params_sha256",
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


def build(
    step: int,
    files: dict[str, dict[str, Any]],
    params_sha256: str,
    train_state: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of one checkpoint; ``meta`` keys other than the reserved ones are kept as-is.

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
        "params_sha256": params_sha256,
        "train_state": train_state,
    }
    for k, v in meta.items():
        manifest.setdefault(k, v)
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    return manifest


def to_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes written to ``manifest.json`` (indented: people read it with ``inspect``)."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def read(ckpt: Path) -> dict[str, Any]:
    """Parse and self-check ``ckpt/manifest.json``.

    Raises CheckpointInvalid (missing, unparsable, self-hash wrong, fields missing) or
    CheckpointIncompatible (written by a newer format than this code reads).
    """
    path = ckpt / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointInvalid("missing manifest.json", ckpt) from None
    except OSError as e:
        raise CheckpointInvalid(f"cannot read manifest.json: {e}", ckpt) from e
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointInvalid(f"manifest.json is not valid JSON ({e})", ckpt) from e
    if not isinstance(manifest, dict):
        raise CheckpointInvalid("manifest.json is not a JSON object", ckpt)
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CheckpointInvalid("manifest.json has no integer format_version", ckpt)
    if version > FORMAT_VERSION:
        raise CheckpointIncompatible(
            f"{ckpt} has checkpoint format_version {version}; this code reads up to "
            f"{FORMAT_VERSION}: a rosetrainer release that reads format {version} is needed"
        )
    want = manifest.get("manifest_sha256")
    if want != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise CheckpointInvalid("manifest.json does not match its own manifest_sha256", ckpt)
    for key, typ in (("step", int), ("files", dict), ("params_sha256", str), ("train_state", dict)):
        if not isinstance(manifest.get(key), typ):
            raise CheckpointInvalid(
                f"manifest.json field {key!r} is missing or not a {typ.__name__}", ckpt
            )
    return manifest
