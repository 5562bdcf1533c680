"""Preemption inside a worker: SIGTERM or SIGUSR1 asks the run to stop after the current step.

The signal handler only sets a flag (acting inside a handler could interrupt a collective or a
checkpoint write halfway). Once per step the trainer sums every rank's flag inside the step's one
all-reduce (trainer/train.py), so every rank stops after the same step even when only one of them
was signalled. A second signal means "now": the process dies of that signal — unless the
emergency checkpoint is already written, in which case it exits with the preemption exit code (a
peer that exits first makes torchrun SIGTERM the ranks still tearing down; that must not turn a
clean preemption into a death by signal).

"Now" is when the handler runs: Python runs handlers in the main thread between bytecodes, so
while that thread is blocked in one call into torch — a CUDA synchronisation, or a collective
waiting for a frozen or dead peer — no signal acts until the call returns (the collective: when
its peers join or its timeout expires). Only SIGKILL ends such a process at once.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Watches for SIGTERM/SIGUSR1 once `install()` is called."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved_exit_code: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGUSR1 (main thread only, as Python requires)."""
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give SIGTERM and SIGUSR1 back to the handlers they had before `install()`.

        After `checkpoint_written()` the handlers stay: the process is on its way out with the
        preemption exit code, and a late SIGTERM from torchrun must not change that."""
        if self._saved_exit_code is not None:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def checkpoint_written(self, exit_code: int) -> None:
        """The emergency checkpoint is durable: from now on any signal exits with ``exit_code``."""
        self._saved_exit_code = exit_code

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._saved_exit_code is not None:
            os._exit(self._saved_exit_code)
        if self.signum is not None:
            # Second signal: the caller has lost patience. Die of the signal itself, so the parent
            # sees exactly what happened, and skip every cleanup that could block.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether this process has received a preemption signal."""
        return self.signum is not None
