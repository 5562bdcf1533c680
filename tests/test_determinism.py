"""--deterministic's settings: the cuBLAS workspace before CUDA starts, and what is pinned where."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer import determinism, train


@pytest.mark.parametrize(
    ("before", "after"),
    [(None, ":4096:8"), (":0:0", ":4096:8"), (":16:8", ":16:8"), (":4096:8", ":4096:8")],
)
def test_cublas_workspace_is_made_deterministic_and_a_deterministic_one_kept(
    before: str | None, after: str
) -> None:
    environ = {} if before is None else {"CUBLAS_WORKSPACE_CONFIG": before}
    determinism.set_cublas_workspace(environ)
    assert environ == {"CUBLAS_WORKSPACE_CONFIG": after}


def test_trainer_sets_the_workspace_before_its_first_cuda_call(
    monkeypatch: pytest.MonkeyPatch, data_cache: Path, tmp_path: Path
) -> None:
    # cuBLAS reads the variable once, so what counts is its value at the first CUDA call.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen: list[str | None] = []

    def no_cuda() -> bool:
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return False

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    argv = ["--model", "tiny", "--seq-len", "32", "--device", "cuda", "--deterministic",
            "--data-cache", str(data_cache), "--run-dir", str(tmp_path)]  # fmt: skip
    assert train.main(argv) == 2  # no CUDA here: refused right after the first CUDA call
    assert seen and seen[0] == ":4096:8"


def _state() -> tuple[bool, bool, bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )


def test_cuda_pins_math_attention_and_everything_is_put_back() -> None:
    before = _state()
    assert before[0] is False
    with determinism.deterministic(True, torch.device("cuda", 0)):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert _state() == before


def test_cpu_keeps_its_attention_kernel() -> None:
    # On CPU the math kernel would replace the fused one and change the run's bits.
    before = _state()
    with determinism.deterministic(True, torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert _state()[2:] == before[2:]
    assert _state() == before


def test_not_enabled_changes_nothing() -> None:
    before = _state()
    with determinism.deterministic(False, torch.device("cuda", 0)):
        assert _state() == before
