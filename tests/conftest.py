"""Shared test setup."""
import os

import pytest

# Set before torch loads OpenMP (see pipelines/cli.py): tests run beside subprocesses they start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine (up to 100x slower).
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CheckpointCrash(Exception):
    """Raised by ``crash_after_checkpoint`` right after the armed checkpoint is on disk."""


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """``arm(step)`` makes the next training run die with ``arm.error`` (``CheckpointCrash``) right after it
    has saved its step-``step`` checkpoint (a kill at the worst moment for resume); ``arm`` returns ``disarm``."""
    from harness import loop

    original = loop.save_checkpoint

    def arm(step: int):
        def save_then_crash(accelerator, run_dir, at, *args, **kwargs):
            folder = original(accelerator, run_dir, at, *args, **kwargs)
            if at == step:
                raise CheckpointCrash
            return folder

        monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
        return lambda: monkeypatch.setattr(loop, "save_checkpoint", original)

    arm.error = CheckpointCrash
    return arm
