"""SphereFace residual networks ``sphere4`` .. ``sphere64`` (docs/theory.md#sphere-backbones; Liu et al., CVPR 2017).

Four stages of 64 / 128 / 256 / 512 channels. Each stage opens with a 3x3 stride-2 convolution (with
bias) + per-channel PReLU, followed by ``n`` residual units ``x + PReLU(conv(PReLU(conv(x))))`` (no
activation after the sum, no batch norm anywhere). A 112x96 input ends at 7x6 (112x112 at 7x7) and
``fc5`` maps the flattened 512·H·W map to the 512-d embedding, with no activation after it.

Initialisation follows the original Caffe prototxt: stage convolutions and ``fc5`` are Xavier-uniform
with a (zero-initialised, trainable) bias; residual convolutions are Gaussian with std 0.01 and a
*fixed* zero bias (``lr_mult: 0`` in Caffe), which is exactly a convolution without bias, so they are
built with ``bias=False``. ``residual_bias=True`` gives them a trainable bias (zero-initialised): the
network of PyTorch ports that train those biases, e.g. clcarwin/sphereface_pytorch's ``sphere20a``, whose
residual ``nn.Conv2d`` keep PyTorch's default ``bias=True`` (docs/import.md#from-pytorch). PReLU slopes
start at 0.25. The PReLU is
:class:`sphereface_plus.models.layers.PReLU` (``nn.PReLU`` with a backward as cheap as ReLU's, same
parameters and state-dict keys).

Each size is a data-only builder registered by name::

    net = create_backbone("sphere20", input_size=(112, 96))
    emb = net(x)  # B x 3 x 112 x 96 -> B x 512
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn

from sphereface_plus.models import register_backbone
from sphereface_plus.models.layers import PReLU

__all__ = ["SphereNet", "ResidualUnit", "sphere4", "sphere10", "sphere20", "sphere36", "sphere64"]

STAGE_CHANNELS = (64, 128, 256, 512)
SUPPORTED_INPUT_SIZES = ((112, 96), (112, 112))
SPHERE_OPTIONS = ("input_size", "embedding_dim", "in_channels", "residual_bias")  # SphereNet's arguments the builders pass on
SOURCE = "Liu et al., SphereFace (CVPR 2017), wy1iu/sphereface sphereface_model.prototxt"


def _stage_out(size: int) -> int:
    # 3x3 convolution, stride 2, padding 1
    return (size + 2 * 1 - 3) // 2 + 1


class ResidualUnit(nn.Module):
    """``x + PReLU(conv2(PReLU(conv1(x))))``: two 3x3 convolutions, no activation after the sum."""

    def __init__(self, channels: int, bias: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.prelu1 = PReLU(channels, init=0.25)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.prelu2 = PReLU(channels, init=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


class SphereStage(nn.Module):
    """A stride-2 3x3 convolution (with bias) + PReLU, then ``num_units`` residual units."""

    def __init__(self, in_channels: int, out_channels: int, num_units: int, residual_bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1, bias=True)
        self.prelu = PReLU(out_channels, init=0.25)
        self.units = nn.Sequential(*[ResidualUnit(out_channels, residual_bias) for _ in range(num_units)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.prelu(self.conv(x)))


class SphereNet(nn.Module):
    """SphereFace network with ``units[i]`` residual units in stage ``i``; returns B x ``embedding_dim``.

    Args:
        units: residual units per stage, e.g. ``(1, 2, 4, 1)`` for sphere20.
        input_size: ``(H, W)`` of the aligned crops, ``(112, 96)`` (SphereFace) or ``(112, 112)``.
        embedding_dim: size of ``fc5`` (512 in the paper).
        in_channels: 3 for BGR crops.
        residual_bias: give the residual convolutions a bias (see the module docstring; default False, the
            Caffe release's fixed zero bias).
    """

    def __init__(
        self,
        units: Sequence[int],
        input_size: Tuple[int, int] = (112, 96),
        embedding_dim: int = 512,
        in_channels: int = 3,
        residual_bias: bool = False,
    ):
        super().__init__()
        units = tuple(int(u) for u in units)
        if len(units) != 4 or any(u < 0 for u in units):
            raise ValueError(f"units must be 4 non-negative integers (one per stage), got {units}")
        try:
            h, w = (int(s) for s in input_size)
        except (TypeError, ValueError):
            raise ValueError(f"input_size must be (height, width), e.g. (112, 96); got {input_size!r}") from None
        if (h, w) not in SUPPORTED_INPUT_SIZES:
            raise ValueError(
                f"input_size {(h, w)} is not supported: SphereFace crops are 112x96 or 112x112 "
                f"(pass input_size=(112, 96) or (112, 112))"
            )
        self.units = units
        self.input_size = (h, w)
        self.embedding_dim = int(embedding_dim)
        stages = []
        c_in = in_channels
        for c_out, n in zip(STAGE_CHANNELS, units):
            stages.append(SphereStage(c_in, c_out, n, bool(residual_bias)))
            c_in = c_out
            h, w = _stage_out(h), _stage_out(w)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # 7x6 for 112x96 crops, 7x7 for 112x112 (docs/theory.md#sphere-backbones)
        self.feature_size = (h, w)
        self.fc5 = nn.Linear(STAGE_CHANNELS[-1] * h * w, self.embedding_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original Caffe initialisation (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, SphereStage):
                nn.init.xavier_uniform_(module.conv.weight)
                nn.init.zeros_(module.conv.bias)
            elif isinstance(module, ResidualUnit):
                for conv in (module.conv1, module.conv2):
                    nn.init.normal_(conv.weight, std=0.01)
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
        nn.init.xavier_uniform_(self.fc5.weight)
        nn.init.zeros_(self.fc5.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The B x 512 x 7 x 6 (or 7 x 7) map before ``fc5``."""
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.input_size or x.shape[1] != self.layer1.conv.in_channels:
            raise ValueError(
                f"expected input of shape B x {self.layer1.conv.in_channels} x {self.input_size[0]} x "
                f"{self.input_size[1]} (this network was built with input_size={self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc5(torch.flatten(self.forward_features(x), 1))


def _build(units: Sequence[int], input_size=(112, 96), **kwargs) -> SphereNet:
    return SphereNet(units, input_size=tuple(input_size), **kwargs)


@register_backbone(input_sizes=SUPPORTED_INPUT_SIZES, options=SPHERE_OPTIONS, source=SOURCE)
def sphere4(input_size=(112, 96), **kwargs) -> SphereNet:
    """SphereFace-4: 0, 0, 0, 0 residual units (4 conv layers)."""
    return _build((0, 0, 0, 0), input_size, **kwargs)


@register_backbone(input_sizes=SUPPORTED_INPUT_SIZES, options=SPHERE_OPTIONS, source=SOURCE)
def sphere10(input_size=(112, 96), **kwargs) -> SphereNet:
    """SphereFace-10: 0, 1, 2, 0 residual units (10 conv layers)."""
    return _build((0, 1, 2, 0), input_size, **kwargs)


@register_backbone(input_sizes=SUPPORTED_INPUT_SIZES, options=SPHERE_OPTIONS, source=SOURCE)
def sphere20(input_size=(112, 96), **kwargs) -> SphereNet:
    """SphereFace-20: 1, 2, 4, 1 residual units (20 conv layers), the paper's CASIA model."""
    return _build((1, 2, 4, 1), input_size, **kwargs)


@register_backbone(input_sizes=SUPPORTED_INPUT_SIZES, options=SPHERE_OPTIONS, source=SOURCE)
def sphere36(input_size=(112, 96), **kwargs) -> SphereNet:
    """SphereFace-36: 2, 4, 8, 2 residual units (36 conv layers)."""
    return _build((2, 4, 8, 2), input_size, **kwargs)


@register_backbone(input_sizes=SUPPORTED_INPUT_SIZES, options=SPHERE_OPTIONS, source=SOURCE)
def sphere64(input_size=(112, 96), **kwargs) -> SphereNet:
    """SphereFace-64: 3, 8, 16, 3 residual units (64 conv layers)."""
    return _build((3, 8, 16, 3), input_size, **kwargs)
