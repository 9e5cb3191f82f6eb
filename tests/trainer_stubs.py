"""Stand-ins shared by the trainer tests that drive ``Trainer.train_step`` with their own batches."""
from __future__ import annotations

import torch


class TinyFaces(torch.utils.data.Dataset):
    """Only what the Trainer reads at construction (``num_classes``, ``input_size``, a length): the steps
    get their batches from the test."""

    input_size = (112, 96)

    def __init__(self, num_classes: int, input_size=(112, 96)):
        self.num_classes = num_classes
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return 4 * self.num_classes

    def __getitem__(self, key):
        raise AssertionError("the test feeds train_step directly")
