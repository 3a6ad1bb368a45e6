"""A signal delivered in the middle of a training run, for the tests that stop and resume one."""

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from metamask_fast.meta import MetaMaskStep


def interrupt_at(monkeypatch, calls: int, signum=signal.SIGTERM) -> None:
    """Deliver ``signum`` to this process during the ``calls``-th training step."""
    original, seen = MetaMaskStep.step, []

    def step(self, x0, x1):
        seen.append(1)
        if len(seen) == calls:
            os.kill(os.getpid(), signum)
        return original(self, x0, x1)

    monkeypatch.setattr(MetaMaskStep, "step", step)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0, poll: float = 0.02):
    """``condition()``'s first true value while ``process`` runs (None if it ended first)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    return None


def checkpoint_past(folder: Path, step: int):
    """A condition for :func:`wait_for`: ``folder/checkpoint.pt`` holds a step after ``step`` (the file is loaded
    only when it was replaced since the last look)."""
    seen = [None]

    def condition() -> bool:
        try:
            stamp = (folder / "checkpoint.pt").stat().st_mtime_ns
            if stamp == seen[0]:
                return False
            seen[0] = stamp
            return torch.load(folder / "checkpoint.pt", weights_only=True)["step"] > step
        except (OSError, RuntimeError, EOFError):
            return False

    return condition
