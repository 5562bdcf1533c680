"""The device check runs its CPU part anywhere, and says for every CUDA row why it was skipped."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

CUDA_ROWS = [
    *(
        ("determinism", f"cuda tiny, amp {amp}{det}")
        for amp in ("off", "bf16", "fp16")
        for det in ("", " --deterministic")
    ),
    *(
        ("host reads, tokens/s", f"cuda {model}, amp bf16 {what}")
        for model in ("small", "gpt2")
        for what in ("fresh", "resumed", "fresh --deterministic")
    ),
    ("checkpoint stall", "cuda, 8 linear layers 4096 wide"),
    ("save host memory", "cuda, 8 linear layers 4096 wide"),
    ("GPU memory after SIGKILL", "cuda, a process holding 8 GiB"),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_part_fills_its_rows_and_every_cuda_row_says_why_it_was_skipped() -> None:
    # Where CUDA exists the CPU part is asked for explicitly: the whole check is a device's job.
    forced = torch.cuda.is_available()
    cmd = [sys.executable, "bench/gpu_check.py", "--quick", *(["--device", "cpu"] * forced)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in proc.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| check ")
    ]
    rows = {(c[0], c[1]): (c[2], c[3]) for c in cells}
    assert len(rows) == len(cells) == 24, proc.stdout

    why = "--device cpu" if forced else "no CUDA device (torch.cuda.is_available() is False)"
    for key in CUDA_ROWS:
        assert rows[key] == ("skipped", f"needs CUDA: {why}"), key
    assert sum(result == "skipped" for result, _ in rows.values()) == len(CUDA_ROWS)

    for amp in ("off", "bf16"):
        plain, plain_detail = rows[("determinism", f"cpu tiny, amp {amp}")]
        det, det_detail = rows[("determinism", f"cpu tiny, amp {amp} --deterministic")]
        assert plain == det == "equal", (plain_detail, det_detail)
        assert "stopped at step 1 + resumed" in plain_detail
        # The same params_sha256 with and without the flag: it changes nothing on CPU.
        assert det_detail == plain_detail + "; same bits as without"
    for what, steps in (("fresh", 10), ("resumed", 5), ("fresh --deterministic", 10)):
        result, detail = rows[("host reads, tokens/s", f"cpu small, amp off {what}")]
        assert result == "1.00/step" and detail.startswith(f"{steps} reads in {steps} steps")
    stall, _ = rows[("checkpoint stall", "cpu, 2 linear layers 1024 wide")]
    memory, memory_detail = rows[("save host memory", "cpu, 2 linear layers 1024 wide")]
    assert stall.endswith(" x sync") and float(stall.split()[0]) > 0
    # A sync save copies the whole state (25 MB) to host memory before writing it.
    assert memory.startswith("+") and int(memory[1:].split()[0]) >= 10, memory_detail
    assert proc.stdout.rstrip().splitlines()[-1].startswith("24 rows, 15 skipped, 0 failed")
