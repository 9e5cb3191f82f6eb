"""The 9-convolution CIFAR network used by the MHE paper's CIFAR-100 experiments (docs/theory.md#cifar-setup).

Three stages of 3 x [conv3x3 (no bias) -> BatchNorm -> ReLU] with 64 / 128 / 256 channels, each stage
followed by a 2x2 max-pool (32 -> 16 -> 8 -> 4); ``fc6`` is a 4x4 convolution to 256 channels (no BN,
no ReLU, no bias) and ``score`` a 1x1 convolution to the class count. He-normal (fan-in) init.

Layer names are stable so that :class:`sphereface_plus.mhe.MHERegularizer` can select them:
``conv1_1`` .. ``conv3_3`` and ``fc6`` are the hidden layers, ``score`` is the output layer (the last
convolution in module order, which the regulariser takes as the output layer by default).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from sphereface_plus.models import register_backbone

__all__ = ["CifarCNN9", "cifar_cnn9"]

# TensorFlow's batch norm keeps ``moving = decay * moving + (1 - decay) * batch`` with decay 0.999
# (the "momentum 0.001" of docs/theory.md#cifar-setup is 1 - decay). PyTorch's convention is the other way round,
# ``running = (1 - momentum) * running + momentum * batch``, so the same moving average is
# ``momentum=0.001`` in PyTorch (NOT 0.999, which would nearly replace the statistics every step).
BN_EPS = 1e-3
BN_MOMENTUM = 0.001


class CifarCNN9(nn.Module):
    """CNN-9 for 3 x 32 x 32 inputs; returns B x ``num_classes`` logits.

    Args:
        num_classes: 100 for CIFAR-100, 10 for CIFAR-10.
        widths: channels of the three stages.
        fc_dim: channels of ``fc6``.
    """

    def __init__(self, num_classes: int = 100, widths=(64, 128, 256), fc_dim: int = 256, in_channels: int = 3):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.input_size = (32, 32)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        c_in = in_channels
        for s, c_out in enumerate(widths, start=1):
            for j in range(1, 4):
                layers[f"conv{s}_{j}"] = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
                layers[f"bn{s}_{j}"] = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
                layers[f"relu{s}_{j}"] = nn.ReLU(inplace=True)
                c_in = c_out
            layers[f"pool{s}"] = nn.MaxPool2d(2, 2)
        self.features = nn.Sequential(layers)
        self.fc6 = nn.Conv2d(c_in, fc_dim, 4, 1, 0, bias=False)
        self.score = nn.Conv2d(fc_dim, self.num_classes, 1, 1, 0, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He-normal, fan-in: std = sqrt(2 / fan_in)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.features.conv1_1.in_channels, 32, 32):
            raise ValueError(
                f"cifar_cnn9 expects B x {self.features.conv1_1.in_channels} x 32 x 32 input, got {tuple(x.shape)}"
            )
        return self.score(self.fc6(self.features(x))).flatten(1)


@register_backbone(input_sizes=((32, 32),), output="logits", options=("num_classes", "widths", "fc_dim", "in_channels"),
                   source="Liu et al., MHE (NeurIPS 2018), CIFAR CNN-9; wy1iu/MHE")
def cifar_cnn9(num_classes: int = 100, **kwargs) -> CifarCNN9:
    """CNN-9 of the MHE CIFAR experiments (docs/theory.md#cifar-setup)."""
    return CifarCNN9(num_classes=num_classes, **kwargs)
