"""dlib's face-recognition ResNet, ``dlib_resnet29`` (docs/theory.md#dlib-resnet; davisking/dlib
``examples/dnn_face_recognition_ex.cpp``, the network of ``dlib_face_recognition_resnet_model_v1.dat``).

A 150x150 RGB chip goes through a 7x7 stride-2 convolution (32 filters) + ReLU and a 3x3 stride-2 max
pooling (150 -> 72 -> 35), then 14 residual units: 3 of 32 channels, 4 of 64, 3 of 128, 3 of 256 and one
more of 256, the first unit of every group after the first halving the resolution (35 -> 17 -> 8 -> 4 ->
2). A unit is ``relu(s(x) + conv2(relu(conv1(x))))`` with 3x3 convolutions; ``s`` is the identity, or
for a halving unit a 2x2 stride-2 average pooling, and ``conv1`` has stride 2 and no padding. When the
two branches differ in size (more channels in the convolution branch; 3x3 against the pooling's 4x4
and 1x1 against 2x2 in the last two halving units), the smaller one is zero-padded at the end of each
dimension, as dlib's ``add_prev`` does. Global average pooling and a 128-d fully-connected layer without
bias give the embedding, which is NOT L2-normalised: dlib compares raw descriptors by Euclidean
distance (docs/verification.md).

dlib has an affine layer (frozen batch normalisation) after every convolution; the importer folds each
into its convolution (:mod:`sphereface_plus.importers.dlib_dnn`), so the convolutions here have a bias
and there is no normalisation layer. The network is only ever loaded from dlib's weights (its input
convention, ``(pixel - mean_c) / 256`` in RGB, is applied by :class:`~sphereface_plus.importers.
preprocessing.SourceInput`); built from scratch it has PyTorch's default initialisation.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from sphereface_plus.models import register_backbone

__all__ = ["DlibResNet", "DlibUnit", "add_zero_padded", "dlib_resnet29", "DLIB_LEVELS"]

#: (channels, units) of each group, input side first; every group after the first halves the resolution
DLIB_LEVELS: Tuple[Tuple[int, int], ...] = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))
SOURCE = "dlib dnn_face_recognition_ex.cpp (anet_type), dlib_face_recognition_resnet_model_v1.dat (King, 2017)"


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` where the smaller of two N x C x H x W tensors is zero-padded at the end of every
    dimension to the larger size (dlib's ``add_prev`` / ``tt::add``; docs/theory.md#dlib-resnet)."""
    if a.shape == b.shape:
        return a + b
    size = [max(x, y) for x, y in zip(a.shape, b.shape)]
    if list(a.shape) == size:
        out = a.clone()
    else:  # a new tensor: pad the channels, rows and columns of a up to the larger size
        out = F.pad(a, (0, size[3] - a.shape[3], 0, size[2] - a.shape[2], 0, size[1] - a.shape[1]))
    out[:, :b.shape[1], :b.shape[2], :b.shape[3]] += b  # b fits: size is the larger in every dimension
    return out


class DlibUnit(nn.Module):
    """``relu(shortcut(x) (+) conv2(relu(conv1(x))))``, ``(+)`` the zero-padded sum (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        # dlib's con_ pads size // 2 at stride 1 and nothing at stride 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 2 if downsample else 1, 0 if downsample else 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.pool = nn.AvgPool2d(2, 2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(add_zero_padded(self.pool(x), y))


class DlibResNet(nn.Module):
    """The network of the module docstring: ``forward(x)``: B x 3 x 150 x 150 -> B x 128 (raw)."""

    def __init__(self, input_size: Sequence[int] = (150, 150), embedding_dim: int = 128,
                 levels: Sequence[Tuple[int, int]] = DLIB_LEVELS):
        super().__init__()
        self.input_size = tuple(int(v) for v in input_size)
        self.embedding_dim = int(embedding_dim)
        self.stem = nn.Conv2d(3, levels[0][0], 7, 2, 0)
        self.stem_pool = nn.MaxPool2d(3, 2)
        units = []
        channels = levels[0][0]
        for g, (width, count) in enumerate(levels):
            for u in range(count):
                units.append(DlibUnit(channels, width, downsample=g > 0 and u == 0))
                channels = width
        self.units = nn.ModuleList(units)
        self.fc = nn.Linear(channels, self.embedding_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_pool(F.relu(self.stem(x)))
        for unit in self.units:
            x = unit(x)
        return self.fc(x.mean(dim=(2, 3)))


@register_backbone(input_sizes=[(150, 150)], options=("input_size", "embedding_dim"), source=SOURCE)
def dlib_resnet29(input_size=(150, 150), embedding_dim: int = 128) -> DlibResNet:
    """dlib's face ResNet: 29 convolutions, 150x150 RGB chips, 128-d raw descriptors (import only)."""
    return DlibResNet(input_size, embedding_dim)
