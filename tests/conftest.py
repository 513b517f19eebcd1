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
