"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def two_torch_threads():
    """Run the test with 2 torch CPU threads (the machine's cores), restoring the previous setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
