"""Corpora: the embedded standard-library text and its cache, files, .bin tokens, bad paths."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TRAIN_PY
from trainer import train
from trainer.data import (
    DataError,
    load_corpus,
    stdlib_cache_path,
    stdlib_digest_path,
    stdlib_files,
    tokens_sha256,
)


def test_embedded_corpus_is_the_sorted_stdlib_bytes(data_cache: Path) -> None:
    corpus = load_corpus("stdlib", cache_dir=data_cache, seq_len=64)
    files = stdlib_files()
    assert len(files) > 500 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    first = files[0].read_bytes()
    assert bytes(np.asarray(corpus.train[: len(first)], dtype=np.uint8)) == first
    total = len(corpus.train) + len(corpus.val)
    assert total == sum(p.stat().st_size for p in files)
    assert corpus.vocab_size == 256 and int(corpus.train[:100000].max()) < 256
    # The held-out split is the tail, about --val-fraction of the tokens.
    assert abs(len(corpus.val) / total - 0.01) < 0.001


def test_cache_build_is_safe_when_two_processes_race(tmp_path: Path, data_cache: Path) -> None:
    code = "import sys; from trainer.data import build_stdlib_cache as b; print(b(sys.argv[1]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    paths = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert paths[0] == paths[1] == str(stdlib_cache_path(tmp_path))
    built = Path(paths[0]).read_bytes()
    assert built == stdlib_cache_path(data_cache).read_bytes()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_text_file_and_directory_are_read_as_bytes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_bytes(b"world " * 100)
    (tmp_path / "d" / "a.txt").write_bytes(b"hello " * 100)
    corpus = load_corpus(str(tmp_path / "d"), cache_dir=tmp_path, val_fraction=0.1, seq_len=8)
    whole = np.concatenate([corpus.train, corpus.val]).astype(np.uint8).tobytes()
    assert whole == b"hello " * 100 + b"world " * 100  # sorted file order
    sample = corpus.sample(1, 8)
    assert sample.tolist() == list(whole[8:17])


def test_bin_tokens_with_vocab_size(tmp_path: Path) -> None:
    tokens = np.arange(5000, dtype="<u2") % 1000
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    corpus = load_corpus(str(path), cache_dir=tmp_path, vocab_size=1000, seq_len=16)
    assert corpus.vocab_size == 1000
    assert np.array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
    with pytest.raises(DataError, match="holds token 999, not below --vocab-size 500"):
        load_corpus(str(path), cache_dir=tmp_path, vocab_size=500, seq_len=16)


def test_random_corpus_is_the_same_every_time(tmp_path: Path) -> None:
    a = load_corpus("random", cache_dir=tmp_path, vocab_size=300, seq_len=16)
    b = load_corpus("random", cache_dir=tmp_path, vocab_size=300, seq_len=16)
    assert a.vocab_size == 300 and np.array_equal(a.train, b.train)


def test_fingerprint_tells_corpora_apart(tmp_path: Path) -> None:
    text = bytes(range(256)) * 40
    (tmp_path / "a.txt").write_bytes(text)
    (tmp_path / "b.txt").write_bytes(text[:-1] + b"x")  # one byte differs
    (tmp_path / "a.bin").write_bytes(np.frombuffer(text, dtype=np.uint8).astype("<u2").tobytes())

    def fingerprint(name: str, **kw: int) -> str:
        return load_corpus(str(tmp_path / name), cache_dir=tmp_path, seq_len=16, **kw).fingerprint

    a = fingerprint("a.txt")
    assert len(a) == 16 and a == fingerprint("a.txt")
    assert fingerprint("b.txt") != a
    assert fingerprint("a.bin", vocab_size=256) == a  # the same tokens, vocabulary and split
    assert fingerprint("a.bin", vocab_size=300) != a  # another vocabulary
    split = load_corpus(str(tmp_path / "a.txt"), cache_dir=tmp_path, seq_len=16, val_fraction=0.2)
    assert split.fingerprint != a  # another split


def test_embedded_corpus_digest_is_cached_with_it(tmp_path: Path, data_cache: Path) -> None:
    corpus = load_corpus("stdlib", cache_dir=data_cache, seq_len=64)
    digest_file = stdlib_digest_path(stdlib_cache_path(data_cache))
    assert corpus.tokens_sha256 == digest_file.read_text().strip()
    assert corpus.tokens_sha256 == tokens_sha256(corpus.train, corpus.val)
    # Read, not recomputed: a start-up does not hash 60 MB. A cache whose digest is missing
    # (built before it was kept) or malformed gets it on the next start.
    cache = tmp_path / "cache"
    cache.mkdir()
    copy = stdlib_cache_path(cache)
    copy.write_bytes(stdlib_cache_path(data_cache).read_bytes())
    stdlib_digest_path(copy).write_text("f" * 64 + "\n")
    assert load_corpus("stdlib", cache_dir=cache, seq_len=64).tokens_sha256 == "f" * 64
    stdlib_digest_path(copy).write_text("not a digest")
    assert load_corpus("stdlib", cache_dir=cache, seq_len=64).tokens_sha256 == corpus.tokens_sha256
    stdlib_digest_path(copy).unlink()
    assert load_corpus("stdlib", cache_dir=cache, seq_len=64).fingerprint == corpus.fingerprint


def _unreadable(tmp_path: Path) -> Path:
    # A socket file cannot be opened for reading, not even by root (unlike a chmod 000 file).
    path = tmp_path / "sock.txt"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path


def _odd_bin(tmp_path: Path) -> Path:
    path = tmp_path / "odd.bin"
    path.write_bytes(b"abc")
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    return path


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "nothing"
    path.mkdir()
    return path


def _short(tmp_path: Path) -> Path:
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 40)
    return path


BAD_DATA = [
    ("missing", lambda t: t / "no-such.txt", [], "no such file or directory"),
    ("empty file", _empty, [], "is empty"),
    ("empty dir", _empty_dir, [], "directory holds no files"),
    ("unreadable", _unreadable, [], "cannot read"),
    ("odd .bin", _odd_bin, ["--vocab-size", "300"], "is odd"),
    ("bin without vocab", _odd_bin, [], "needs --vocab-size"),
    ("too short", _short, [], "too few for --seq-len 64"),
]


@pytest.mark.parametrize(("make", "extra", "reason"), [b[1:] for b in BAD_DATA],
                         ids=[b[0] for b in BAD_DATA])  # fmt: skip
def test_bad_data_is_one_line_naming_the_path(
    tmp_path: Path, make, extra: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path)
    code = train.main(["--data", str(path), "--seq-len", "64", *extra, "--run-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and reason in err, err


def test_unwritable_cache_dir_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = train.main(["--data-cache", str(blocker / "cache"), "--run-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker / "cache") in err, err


def test_missing_data_from_the_command_line_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "corpus"
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--data", str(missing)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"train.py: error: {missing}: no such file or directory"]
