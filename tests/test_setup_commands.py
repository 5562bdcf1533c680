"""The README's two set-up commands, as written, in a fresh clone on a machine without the
virtualenv: each creates it, the second reuses it, and CI calls the test command the same way."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import kill_tree

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's first section's code block."""
    text = (ROOT / "README.md").read_text()
    first = text.split("\n## ", 2)[1]
    block = re.search(r"```bash\n(.*?)```", first, re.S)
    assert block is not None, first[:500]
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_starts_with_two_commands_and_ci_calls_the_test_one_as_written() -> None:
    run, test = readme_commands()
    assert (run, test) == ("make run", "make test")
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci


def _run(command: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` as a user types it; every process it started is gone afterwards."""
    proc = subprocess.Popen(
        command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            proc.communicate()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1800)
def test_the_readme_commands_work_in_a_fresh_clone(
    tmp_path: Path, train_env: dict[str, str]
) -> None:
    run, test = readme_commands()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=300)
    try:
        assert not (clone / ".venv").exists()
        env = dict(train_env)
        # A machine without our virtualenv: not active, not on PATH.
        venv_bin = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)
        # Narrowed through what the commands honour, to keep this short: the trainer's flags
        # for the main job, one small test file for the tests.
        env["ARGS"] = "-- --model tiny --steps 6 --threads 1"
        env["PYTEST_ADDOPTS"] = "-p no:cacheprovider tests/test_sampler.py"

        code, out = _run(run, clone, env, timeout=1200)
        assert code == 0, out[-5000:]
        assert "pip install" in out  # it built the virtualenv
        assert "run summary: success (exit 0)" in out, out[-3000:]
        assert (clone / ".venv" / "bin" / "python").exists()

        code, out = _run(test, clone, env, timeout=600)
        assert code == 0, out[-5000:]
        assert "pip install" not in out  # ...and the second command reused it
        assert re.search(r"\d+ passed", out), out[-3000:]
    finally:
        shutil.rmtree(clone, ignore_errors=True)
