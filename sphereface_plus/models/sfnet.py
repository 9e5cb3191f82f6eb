"""OpenSphere's SFNet: the SphereFace residual networks with ReLU, without and with batch norm.

ydwen/opensphere (the SphereFace authors' PyTorch library) rebuilds the SphereFace-20/36/64 layout
(Liu et al., CVPR 2017: four stages of 64 / 128 / 256 / 512 channels, ``units`` residual units of
1, 2, 4, 1 (20), 2, 4, 8, 2 (36) or 3, 8, 16, 3 (64) per stage) with ReLU instead of PReLU, in three
variants, each registered for 20, 36 and 64 layers:

- ``sfnet20`` (``model/backbone/sfnet.py``, no norm layer): each stage opens with a 3x3 stride-2
  convolution (with bias) + ReLU; a residual unit is ``ReLU(x + conv(ReLU(conv(x))))`` (ReLU after the
  sum); ``flatten -> Dropout -> FC``. Kaiming-normal (fan-out) convolutions.
- ``sfnet20_bn`` (the same file with ``norm_layer`` set; "SFNet with BN", SphereFace-R, TPAMI 2022): a
  BN after every convolution (which then has no bias), ``ReLU(x + BN(conv(ReLU(BN(conv(x))))))``, and a
  BN1d ``features`` layer after the FC, its scale initialised at 0.1 (OpenSphere ``main``; ``OpenSphere_v0``
  uses 1.0: ``features_scale_init=1.0``).
- ``sfnet20_deprecated`` (``model/backbone/sfnet_deprecated.py`` of ``OpenSphere_v0``, the network of
  OpenSphere's published VGGFace2 "SFNet-20 (w/o BN)" models and its VGGFace2 recipes): the residual unit
  is ``x + ReLU(conv(ReLU(conv(x))))`` (ReLU before the sum, like the original SphereFace's PReLU
  units); no dropout, no features layer; Xavier-normal convolutions.

A 112x112 crop ends at 7x7, a 112x96 crop at 7x6; the FC's input follows.

State-dict keys are OpenSphere's: ``layer{1-4}.0.conv1`` (the stage convolution; ``bn1`` with BN),
``layer{1-4}.{k}.conv1/conv2`` (``bn1``/``bn2`` with BN), ``fc``, and ``features`` (BN variant). Both
no-BN variants have the same keys (OpenSphere_v0's deprecated file names them as the new one does; the
``SphereFace2_ICLR21`` branch names the stage convolution ``layer{i}.0.conv``).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn

from sphereface_plus.models import register_backbone
from sphereface_plus.models.layers import check_image_batch

__all__ = ["SFNet", "UNITS", "INPUT_SIZES"]

UNITS = {20: (1, 2, 4, 1), 36: (2, 4, 8, 2), 64: (3, 8, 16, 3)}
CHANNELS = (64, 128, 256, 512)
INPUT_SIZES = ((112, 112), (112, 96))
VARIANTS = ("plain", "bn", "deprecated")
SOURCE = "ydwen/opensphere model/backbone/sfnet.py (Liu et al. CVPR 2017; SphereFace-R TPAMI 2022)"
SOURCE_DEPRECATED = "ydwen/opensphere OpenSphere_v0 model/backbone/sfnet_deprecated.py (Liu et al. CVPR 2017)"


def _halve(size: int) -> int:
    return (size - 1) // 2 + 1


def _norm(batch_norm: bool, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class StageConv(nn.Module):
    """The stride-2 3x3 convolution that opens a stage: ``ReLU(BN(conv(x)))`` (BN only in the BN variant)."""

    def __init__(self, in_channels: int, channels: int, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 2, 1, bias=not batch_norm)
        self.bn1 = _norm(batch_norm, channels)
        self.relu = nn.ReLU(inplace=True)  # on a fresh convolution / BN output, as OpenSphere's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; ``ReLU(x + F(x))`` or, with ``relu_before_sum``, ``x + ReLU(F(x))``."""

    def __init__(self, channels: int, batch_norm: bool, relu_before_sum: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=not batch_norm)
        self.bn1 = _norm(batch_norm, channels)
        self.relu = nn.ReLU(inplace=True)  # applied to fresh tensors only (never to x itself)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = _norm(batch_norm, channels)
        self.relu_before_sum = bool(relu_before_sum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return x + self.relu(out) if self.relu_before_sum else self.relu(x + out)


class SFNet(nn.Module):
    """SFNet with ``units[i]`` residual units in stage ``i`` (module docstring); returns B x ``embedding_dim``.

    Args:
        units: residual units per stage, e.g. ``(1, 2, 4, 1)`` for SFNet-20.
        variant: ``plain`` (no BN), ``bn`` (BN everywhere + features BN1d) or ``deprecated`` (OpenSphere_v0).
        input_size: ``(H, W)``, ``(112, 112)`` or ``(112, 96)``.
        embedding_dim: FC width (OpenSphere's ``out_channel`` / ``embed_dim``, 512).
        channels: widths of the four stages (OpenSphere's ``channels``).
        dropout: before the FC (``plain`` and ``bn``; OpenSphere's default 0).
        zero_init_residual: zero the scale of each unit's last BN (``bn`` only).
        features_scale_init: initial scale of the features BN1d (``bn`` only; OpenSphere main 0.1, v0 1.0).
    """

    def __init__(self, units: Sequence[int], variant: str = "plain", input_size: Tuple[int, int] = (112, 112),
                 embedding_dim: int = 512, channels: Sequence[int] = CHANNELS, dropout: float = 0.0,
                 zero_init_residual: bool = False, features_scale_init: float = 0.1):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        units, channels = tuple(int(u) for u in units), tuple(int(c) for c in channels)
        if len(units) != 4 or any(u < 0 for u in units):
            raise ValueError(f"units must be 4 non-negative integers (one per stage), got {units}")
        if len(channels) != 4 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be 4 positive integers (one per stage), got {list(channels)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        batch_norm = variant == "bn"
        if zero_init_residual and not batch_norm:
            raise ValueError("zero_init_residual needs the BN variant (it zeroes each unit's last BN scale); "
                             "use an sfnet*_bn backbone or drop the option")
        h, w = (int(v) for v in input_size)
        self.units, self.variant, self.input_size, self.embedding_dim = units, variant, (h, w), int(embedding_dim)
        # made first, as OpenSphere does, so that the state-dict order is OpenSphere's too
        self.features = nn.BatchNorm1d(self.embedding_dim) if batch_norm else nn.Identity()
        c_in = 3
        for i, (c, n) in enumerate(zip(channels, units), start=1):
            mods = [StageConv(c_in, c, batch_norm)]
            mods += [BasicBlock(c, batch_norm, relu_before_sum=variant == "deprecated") for _ in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*mods))
            c_in, h, w = c, _halve(h), _halve(w)
        self.feature_size = (h, w)  # 7x7 for 112x112, 7x6 for 112x96
        if variant != "deprecated":  # the deprecated network has neither (no state either way)
            self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(c_in * h * w, self.embedding_dim)
        self.reset_parameters(zero_init_residual, features_scale_init)

    def reset_parameters(self, zero_init_residual: bool = False, features_scale_init: float = 0.1) -> None:
        """OpenSphere's initialisation: Kaiming-normal (fan-out) convolutions, BN 1 / 0 (``sfnet.py``);
        Xavier-normal convolutions (``sfnet_deprecated.py``). Biases and the FC keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if self.variant == "deprecated":
                    nn.init.xavier_normal_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
        if isinstance(self.features, nn.BatchNorm1d):
            nn.init.constant_(self.features.weight, float(features_scale_init))
            nn.init.zeros_(self.features.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The B x 512 x 7 x 7 (or 7 x 6) map before the FC."""
        check_image_batch(x, self.input_size)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.forward_features(x), 1)
        if self.variant != "deprecated":
            x = self.dropout(x)
        return self.features(self.fc(x))


def _register_plain(depth: int):
    units = UNITS[depth]

    def build(input_size=(112, 112), embedding_dim: int = 512, channels=CHANNELS, dropout: float = 0.0) -> SFNet:
        return SFNet(units, "plain", input_size, embedding_dim, channels, dropout)

    build.__doc__ = f"SFNet-{depth} without BN, ReLU after the sum ({SOURCE})."
    return _named(f"sfnet{depth}", build, SOURCE)


def _register_bn(depth: int):
    units = UNITS[depth]

    def build(input_size=(112, 112), embedding_dim: int = 512, channels=CHANNELS, dropout: float = 0.0,
              zero_init_residual: bool = False, features_scale_init: float = 0.1) -> SFNet:
        return SFNet(units, "bn", input_size, embedding_dim, channels, dropout, zero_init_residual,
                     features_scale_init)

    build.__doc__ = f"SFNet-{depth} with BN and a BN1d features layer ({SOURCE})."
    return _named(f"sfnet{depth}_bn", build, SOURCE)


def _register_deprecated(depth: int):
    units = UNITS[depth]

    def build(input_size=(112, 112), embedding_dim: int = 512, channels=CHANNELS) -> SFNet:
        return SFNet(units, "deprecated", input_size, embedding_dim, channels)

    build.__doc__ = (f"SFNet-{depth} of OpenSphere's published VGGFace2 models: no BN, ReLU before the sum "
                     f"({SOURCE_DEPRECATED}).")
    return _named(f"sfnet{depth}_deprecated", build, SOURCE_DEPRECATED)


def _named(name: str, build, source: str):
    build.__name__ = build.__qualname__ = name
    return register_backbone(name, input_sizes=INPUT_SIZES, source=source)(build)


sfnet20, sfnet36, sfnet64 = (_register_plain(d) for d in (20, 36, 64))
sfnet20_bn, sfnet36_bn, sfnet64_bn = (_register_bn(d) for d in (20, 36, 64))
sfnet20_deprecated, sfnet36_deprecated, sfnet64_deprecated = (_register_deprecated(d) for d in (20, 36, 64))
