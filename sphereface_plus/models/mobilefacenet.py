"""MobileFaceNet (Chen et al., "MobileFaceNets", CCBR 2018, Table 1) as insightface arcface_torch builds it.

Inverted-residual (MobileNetV2) bottlenecks with PReLU, a global depthwise convolution (GDConv) instead
of global pooling, and a linear embedding:

- ``conv 3x3 s2`` (64·scale) -> ``depthwise conv 3x3`` (64·scale, groups 64; or ``blocks[0]`` residual
  bottlenecks when ``blocks[0] > 1``);
- bottleneck ``64·s`` s2 (expansion width 128) + ``blocks[1]`` residual ones; ``128·s`` s2 (width 256)
  + ``blocks[2]``; ``128·s`` s2 (width 512) + ``blocks[3]`` (width 256);
- ``conv 1x1`` to 512 -> linear GDConv (512 groups, kernel = the final map, 7x7 for 112x112 or 7x6 for
  112x96) -> FC (no bias) -> BN1d: the embedding.

A bottleneck (``DepthWise``) is ``1x1 conv+BN+PReLU -> kxk depthwise conv+BN+PReLU -> 1x1 conv+BN``
(linear), with an identity shortcut inside a ``Residual`` stack. Every convolution has no bias.

``scale=2, blocks=(1, 4, 6, 2), embedding_dim=512`` is insightface's ``mbf`` (the default here);
``scale=1`` with ``embedding_dim=128`` is the paper's network (0.99 M parameters); insightface's
``mbf_large`` is ``scale=4, blocks=(2, 8, 12, 4)``. Initialisation as insightface: Kaiming-normal
(fan-out) convolutions and FC, BN 1 / 0, PReLU 0.25.

Module and state-dict key names are insightface's (``layers.{i}...``, ``conv_sep.layers.{0,1,2}``,
``features.layers.{0.layers.0, 0.layers.1, 2, 3}``), so an arcface_torch ``mbf`` ``backbone.pth``
loads with ``load_state_dict`` unchanged.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn

from sphereface_plus.models import register_backbone
from sphereface_plus.models.layers import PReLU, check_image_batch

__all__ = ["MobileFaceNet", "INPUT_SIZES", "mobilefacenet"]

INPUT_SIZES = ((112, 112), (112, 96))
SOURCE = "Chen et al., MobileFaceNets (CCBR 2018), Table 1; insightface arcface_torch backbones/mobilefacenet.py"


def _out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # 3x3 convolution, padding 1


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c), PReLU(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) -> BN, no activation."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``width`` -> 3x3 depthwise (``stride``) -> 1x1 linear projection."""

    def __init__(self, in_c: int, out_c: int, width: int, stride: int = 2, residual: bool = False):
        super().__init__()
        self.residual = bool(residual)
        self.layers = nn.Sequential(
            ConvBlock(in_c, width),
            ConvBlock(width, width, (3, 3), (stride, stride), (1, 1), groups=width),
            LinearBlock(width, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` stride-1 bottlenecks with identity shortcuts."""

    def __init__(self, channels: int, num_block: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, width, 1, residual=True) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution over the whole final map (linear), FC without bias, BN1d."""

    def __init__(self, channels: int, kernel: Tuple[int, int], embedding_dim: int):
        super().__init__()
        self.layers = nn.Sequential(LinearBlock(channels, channels, kernel, groups=channels), nn.Flatten(),
                                    nn.Linear(channels, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet (module docstring); returns B x ``embedding_dim``.

    Args:
        input_size: ``(112, 112)`` or ``(112, 96)`` (the GDConv kernel is the final 7x7 / 7x6 map).
        embedding_dim: width of the linear embedding (512 in insightface, 128 in the paper).
        scale: channel multiplier of the bottlenecks (insightface ``mbf`` 2, the paper 1).
        blocks: bottleneck counts (first stage, then the residual stacks of the three stride-2 stages).
    """

    def __init__(self, input_size: Tuple[int, int] = (112, 112), embedding_dim: int = 512, scale: int = 2,
                 blocks: Sequence[int] = (1, 4, 6, 2)):
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must be 4 positive integers, got {list(blocks)}")
        if int(scale) < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        s = int(scale)
        h, w = (int(v) for v in input_size)
        self.input_size, self.embedding_dim, self.scale, self.blocks = (h, w), int(embedding_dim), s, blocks
        c1, c2 = 64 * s, 128 * s
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, (3, 3), (2, 2), (1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, (3, 3), (1, 1), (1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], width=128))
        self.layers.extend([
            DepthWise(c1, c1, width=128, stride=2),
            Residual(c1, blocks[1], width=128),
            DepthWise(c1, c2, width=256, stride=2),
            Residual(c2, blocks[2], width=256),
            DepthWise(c2, c2, width=512, stride=2),
            Residual(c2, blocks[3], width=256),
        ])
        for _ in range(4):
            h, w = _out(h, 2), _out(w, 2)
        self.feature_size = (h, w)  # 7x7 for 112x112, 7x6 for 112x96
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(512, (h, w), self.embedding_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.input_size)
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


@register_backbone(input_sizes=INPUT_SIZES, source=SOURCE)
def mobilefacenet(input_size=(112, 112), embedding_dim: int = 512, scale: int = 2,
                  blocks=(1, 4, 6, 2)) -> MobileFaceNet:
    """MobileFaceNet, insightface's ``mbf`` by default; ``scale=1, embedding_dim=128`` is the paper's."""
    return MobileFaceNet(input_size, embedding_dim, scale, blocks)
