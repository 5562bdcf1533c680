"""Token corpora and the held-out split.

Sources (`--data`):
- `stdlib`: the bytes of every `.py` file in the running Python's standard library, in sorted
  path order, tokenised byte-level (vocabulary 256) and cached as a uint16 token file;
- a text file, or a directory of text files (byte-level, files in sorted path order);
- a file ending in `.bin`: pre-tokenised little-endian uint16 tokens, vocabulary `--vocab-size`;
- `random`: uniformly random tokens from a fixed seed (for speed measurements only).

The corpus is split once: the last `val_fraction` of the tokens is held out for eval loss. A
*sample* is one training sequence: sample id `i` covers tokens `[i*T, i*T + T + 1)` of the
training part (input plus its one-token-shifted target), so ids name fixed, disjoint windows.
Nothing here imports torch, so data errors surface before the heavy start-up.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

BYTE_VOCAB = 256
RANDOM_TOKENS = 1 << 22  # enough random tokens that a speed test never wraps an epoch quickly
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """The data source is missing, empty, unreadable or malformed; the message names the path."""


@dataclass
class Corpus:
    """Training and held-out tokens plus the vocabulary they are drawn from."""

    name: str
    """What the tokens came from (recorded in checkpoints)."""
    train: np.ndarray
    """uint16 tokens sampled for training."""
    val: np.ndarray
    """uint16 tokens held out for eval loss."""
    vocab_size: int
    """Every token is below this."""
    tokens_sha256: str | None = None
    """sha256 of all tokens (training then held-out) as little-endian uint16, when it is known
    without reading them (the embedded corpus caches it); else computed on first use."""

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short digest of the tokens, the split and the vocabulary: processes whose
        fingerprints are equal train on the same data."""
        digest = self.tokens_sha256 or tokens_sha256(self.train, self.val)
        key = f"{digest}|{len(self.train)}|{len(self.val)}|{self.vocab_size}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def num_samples(self, seq_len: int) -> int:
        """How many disjoint training sequences of `seq_len` tokens (+1 target) the corpus holds."""
        return (len(self.train) - 1) // seq_len

    def sample(self, sample_id: int, seq_len: int) -> np.ndarray:
        """The `seq_len + 1` tokens of training sample `sample_id` (input and shifted target)."""
        start = sample_id * seq_len
        return np.asarray(self.train[start : start + seq_len + 1], dtype=np.int64)

    def num_val_samples(self, seq_len: int) -> int:
        """How many disjoint held-out sequences of `seq_len` tokens (+1 target) exist."""
        return (len(self.val) - 1) // seq_len

    def val_sample(self, sample_id: int, seq_len: int) -> np.ndarray:
        """The `seq_len + 1` tokens of held-out sample `sample_id`."""
        start = sample_id * seq_len
        return np.asarray(self.val[start : start + seq_len + 1], dtype=np.int64)


def tokens_sha256(*parts: np.ndarray) -> str:
    """sha256 of the tokens of ``parts`` in order, as little-endian uint16 (the cache's bytes)."""
    h = hashlib.sha256()
    for part in parts:
        # No copy for the usual case (a little-endian uint16 array or memory map).
        h.update(np.ascontiguousarray(part, dtype="<u2").view(np.uint8).data)
    return h.hexdigest()


def stdlib_dir() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files in sorted relative-path order (third-party packages
    and bytecode caches excluded), so that every process sees the same byte stream."""
    root = stdlib_dir() if root is None else root
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_cache_path(cache_dir: Path) -> Path:
    """Cache file of the embedded corpus; its name changes with the Python version and library
    location so that two interpreters never share a stale file."""
    key = hashlib.sha256(f"{sys.version}|{stdlib_dir()}".encode()).hexdigest()[:12]
    v = sys.version_info
    return cache_dir / f"stdlib-py{v.major}.{v.minor}-{key}.u16"


def stdlib_digest_path(cache_path: Path) -> Path:
    """Where the token file's sha256 is cached, next to it (see :func:`build_stdlib_cache`)."""
    return cache_path.with_name(cache_path.name + ".sha256")


def read_cached_digest(cache_path: Path) -> str | None:
    """The cached sha256 of the token file at ``cache_path``, or None when there is no
    well-formed one."""
    try:
        digest = stdlib_digest_path(cache_path).read_text().strip()
    except OSError:
        return None
    ok = len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    return digest if ok else None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name and rename it into place: a write killed halfway
    leaves no partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_stdlib_cache(cache_dir: str | os.PathLike[str]) -> Path:
    """Make sure the embedded corpus' token file and its sha256 exist in `cache_dir`; return the
    token file's path.

    Safe when several processes call it at once: a file lock lets one build while the others
    wait, and each file is written under a temporary name and renamed into place, so a build
    killed halfway never leaves a partial cache behind. The sha256 (for the start-up check that
    every rank trains on the same corpus) is computed once, here, and read from then on. Raises
    DataError when the directory cannot be written or the standard library holds no source.
    """
    cache_dir = Path(cache_dir)
    path = stdlib_cache_path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not (path.exists() and path.stat().st_size > 0):
                chunks = [p.read_bytes() for p in stdlib_files()]
                tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype("<u2")
                if tokens.size == 0:
                    raise DataError(f"{stdlib_dir()}: no .py files found in the standard library")
                _write_atomically(path, tokens.tobytes())
            if read_cached_digest(path) is None:  # also for a cache built before it was kept
                digest = tokens_sha256(np.memmap(path, dtype="<u2", mode="r"))
                _write_atomically(stdlib_digest_path(path), (digest + "\n").encode())
    except OSError as e:
        raise DataError(
            f"{cache_dir}: cannot build the corpus cache there ({e.strerror or e})"
        ) from e
    return path


def _read_text_source(path: Path) -> np.ndarray:
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"{path}: directory holds no files")
    else:
        files = [path]
    try:
        raw = b"".join(p.read_bytes() for p in files)
    except OSError as e:
        raise DataError(f"{e.filename or path}: cannot read ({e.strerror or e})") from e
    return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)


def _read_bin(path: Path, vocab_size: int) -> np.ndarray:
    try:
        size = path.stat().st_size
        if size % 2:
            raise DataError(f"{path}: size {size} is odd; a .bin token file holds uint16 tokens")
        if size == 0:
            return np.zeros(0, dtype=np.uint16)
        with open(path, "rb"):  # surfaces a permission error here, not deep inside numpy
            pass
        tokens = np.memmap(path, dtype="<u2", mode="r")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"{path}: holds token {top}, not below --vocab-size {vocab_size}")
    return tokens


def load_corpus(
    source: str,
    *,
    cache_dir: Path,
    vocab_size: int = 0,
    val_fraction: float = 0.01,
    seq_len: int = 1,
) -> Corpus:
    """Load `source` (see the module docstring) and split off the held-out tokens.

    Raises DataError naming the path when it is missing, empty, unreadable, malformed, or too
    short to give at least one training and one held-out sequence of `seq_len` tokens.
    """
    digest: str | None = None  # known without reading the tokens only for the embedded corpus
    if source == "stdlib":
        if vocab_size not in (0, BYTE_VOCAB):
            raise DataError(f"--vocab-size {vocab_size} does not apply: stdlib text is bytes (256)")
        path = build_stdlib_cache(cache_dir)
        tokens: np.ndarray = np.memmap(path, dtype="<u2", mode="r")
        name, vocab = f"stdlib:{stdlib_dir()}", BYTE_VOCAB
        digest = read_cached_digest(path)
    elif source == "random":
        vocab = vocab_size or BYTE_VOCAB
        # A fixed seed: the corpus must be the same in every process and every attempt.
        tokens = np.random.default_rng(0).integers(0, vocab, RANDOM_TOKENS, dtype=np.uint16)
        name = f"random:{vocab}"
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        if path.suffix == ".bin" and path.is_file():
            if vocab_size == 0:
                raise DataError(f"{path}: a .bin token file needs --vocab-size")
            tokens, vocab = _read_bin(path, vocab_size), vocab_size
        else:
            if vocab_size not in (0, BYTE_VOCAB):
                raise DataError(
                    f"--vocab-size {vocab_size} does not apply: {path} is read as bytes"
                )
            tokens, vocab = _read_text_source(path), BYTE_VOCAB
        name = f"file:{path.resolve()}"
        if len(tokens) == 0:
            raise DataError(f"{path}: is empty")
    n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    if len(train) < seq_len + 1:
        raise DataError(
            f"{source}: {len(tokens)} tokens are too few for --seq-len {seq_len} "
            f"with --val-fraction {val_fraction}"
        )
    return Corpus(name=name, train=train, val=val, vocab_size=vocab, tokens_sha256=digest)
