"""``--deterministic``: the settings under which a CUDA run repeats bit for bit.

On CPU the trainer is bitwise reproducible without them, and they change no CPU kernel: the
attention backend is pinned on CUDA only, because on CPU the math kernel would replace the
fused one the run has always used and change its bits (docs/trainer.md, "Determinism and
exact resume").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CUBLAS_WORKSPACE_VAR = "CUBLAS_WORKSPACE_CONFIG"
#: The workspace settings under which cuBLAS is deterministic (NVIDIA's cuBLAS docs, and what
#: torch.use_deterministic_algorithms checks for); the first is the one set when neither is.
DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


def set_cublas_workspace(environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask cuBLAS for a fixed workspace: with the default one its split reductions are not
    deterministic. cuBLAS reads the variable once, when this process first uses it, so this must
    run before anything touches CUDA. A deterministic value already there is kept."""
    if environ.get(CUBLAS_WORKSPACE_VAR) not in DETERMINISTIC_WORKSPACES:
        environ[CUBLAS_WORKSPACE_VAR] = DETERMINISTIC_WORKSPACES[0]


@contextlib.contextmanager
def deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """While inside: deterministic algorithms only (an op without one raises instead of running
    nondeterministically), no cuDNN autotuning, and on CUDA the math attention kernel (the flash
    and memory-efficient backwards accumulate with atomics). Everything is put back on exit.
    Does nothing when not ``enabled``."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        # The backend is chosen in the forward; its backward follows it, so pinning the forward
        # pins both. Process-wide: eval and the bucket-settling pass get the same kernel.
        with sdpa_kernel(SDPBackend.MATH) if device.type == "cuda" else contextlib.nullcontext():
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2:]
