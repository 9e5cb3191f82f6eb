"""Fixtures shared by several test modules."""
import os

import pytest
import torch

# train.compile=auto would compile the backbone of every trainer a test builds with the default (long)
# train.iterations; tests that want compilation say train.compile=true (sphereface_plus.engine.compile)
os.environ.setdefault("SPHEREFACE_PLUS_COMPILE_AUTO", "eager")


@pytest.fixture
def two_torch_threads():
    """Run the test with 2 torch CPU threads (the machine's cores), restoring the previous setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
