"""A signal delivered in the middle of a training run, for the tests that stop and resume one."""

import os
import signal

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
