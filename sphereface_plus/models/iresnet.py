"""Improved residual networks ``iresnet18`` .. ``iresnet200``: insightface arcface_torch's face backbone.

The architecture of ``recognition/arcface_torch/backbones/iresnet.py`` (deepinsight/insightface; Duta
et al., "Improved Residual Networks", 2020, as ArcFace (Deng et al., CVPR 2019) trains it), the backbone
of most face-recognition papers since 2019:

- stem: 3x3 convolution, stride 1, 64 channels, no bias -> BN -> PReLU (112x112 stays 112x112);
- four stages of 64 / 128 / 256 / 512 channels with ``layers[i]`` blocks; the first block of each
  stage has stride 2 (on its second convolution) and a 1x1 stride-2 convolution + BN shortcut;
- block (``IBasicBlock``): ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN``, plus the
  shortcut, no activation after the sum;
- head: ``BN2d -> flatten -> Dropout -> FC(512*H*W -> embedding_dim) -> BN1d`` ("features"), whose
  scale (gamma) insightface fixes at 1 (``requires_grad=False``).

112x112 crops end at 7x7, 112x96 crops at 7x6; the FC's input follows. Initialisation as insightface:
convolutions N(0, 0.1), BN weight 1 and bias 0, the FC PyTorch's default.

Module and state-dict key names are insightface's (``conv1``, ``bn1``, ``prelu``,
``layer{1-4}.{j}.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0,downsample.1}``, ``bn2``, ``fc``,
``features``), so an arcface_torch ``backbone.pth`` (and OpenSphere's ``iresnet``, which uses the same
names) loads with ``load_state_dict`` unchanged.

Peers differ on the features BN's scale: insightface fixes it at 1 (the default here), OpenSphere
``main`` initialises it at 0.1 and trains it (``features_scale_init=0.1, train_features_scale=True``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from sphereface_plus.models import register_backbone
from sphereface_plus.models.layers import PReLU, check_image_batch

__all__ = ["IResNet", "IBasicBlock", "LAYERS", "INPUT_SIZES",
           "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]

STAGE_CHANNELS = (64, 128, 256, 512)
INPUT_SIZES = ((112, 112), (112, 96))
LAYERS = {  # blocks per stage, arcface_torch backbones/iresnet.py
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
BN_EPS = 1e-5
SOURCE = "insightface recognition/arcface_torch/backbones/iresnet.py (Duta et al. 2020; Deng et al. CVPR 2019)"


def _halve(size: int) -> int:
    # 3x3 convolution, stride 2, padding 1
    return (size - 1) // 2 + 1


class IBasicBlock(nn.Module):
    """``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` + shortcut; no activation after the sum."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """iResNet with ``layers[i]`` blocks in stage ``i``; returns B x ``embedding_dim`` (see module docstring).

    Args:
        layers: blocks per stage, e.g. ``(3, 13, 30, 3)`` for iresnet100.
        input_size: ``(H, W)``: ``(112, 112)`` (insightface) or ``(112, 96)`` (SphereFace crops).
        embedding_dim: FC / features width (insightface's ``num_features``, 512).
        dropout: dropout probability before the FC (insightface trains with 0).
        zero_init_residual: insightface's option: zero the ``bn2`` scale of every block.
        features_scale_init: initial scale (gamma) of the features BN1d (insightface 1.0, OpenSphere 0.1).
        train_features_scale: whether that scale is trained (insightface False, OpenSphere True).
    """

    def __init__(self, layers: Sequence[int], input_size: Tuple[int, int] = (112, 112), embedding_dim: int = 512,
                 dropout: float = 0.0, zero_init_residual: bool = False, features_scale_init: float = 1.0,
                 train_features_scale: bool = False):
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive integers (blocks per stage), got {layers}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        h, w = (int(v) for v in input_size)
        self.layers, self.input_size, self.embedding_dim = layers, (h, w), int(embedding_dim)
        self.conv1 = nn.Conv2d(3, STAGE_CHANNELS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0], eps=BN_EPS)
        self.prelu = PReLU(STAGE_CHANNELS[0])
        c_in = STAGE_CHANNELS[0]
        for i, (c, n) in enumerate(zip(STAGE_CHANNELS, layers), start=1):
            blocks = [IBasicBlock(c_in, c, stride=2)] + [IBasicBlock(c, c) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            c_in, h, w = c, _halve(h), _halve(w)
        self.feature_size = (h, w)  # 7x7 for 112x112, 7x6 for 112x96
        self.bn2 = nn.BatchNorm2d(c_in, eps=BN_EPS)
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(c_in * h * w, self.embedding_dim)
        self.features = nn.BatchNorm1d(self.embedding_dim, eps=BN_EPS)
        self.reset_parameters(zero_init_residual, features_scale_init)
        self.features.weight.requires_grad_(bool(train_features_scale))

    def reset_parameters(self, zero_init_residual: bool = False, features_scale_init: float = 1.0) -> None:
        """insightface's initialisation (module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn2.weight)
        nn.init.constant_(self.features.weight, float(features_scale_init))
        nn.init.zeros_(self.features.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The B x 512 x 7 x 7 (or 7 x 6) map before the final BN."""
        check_image_batch(x, self.input_size)
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.bn2(self.forward_features(x)), 1)
        return self.features(self.fc(self.dropout(x)))


def _register(name: str):
    layers = LAYERS[name]

    def build(input_size=(112, 112), embedding_dim: int = 512, dropout: float = 0.0, zero_init_residual: bool = False,
              features_scale_init: float = 1.0, train_features_scale: bool = False) -> IResNet:
        return IResNet(layers, input_size, embedding_dim, dropout, zero_init_residual, features_scale_init,
                       train_features_scale)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"iResNet-{name[len('iresnet'):]}: {', '.join(map(str, layers))} blocks per stage ({SOURCE})."
    return register_backbone(name, input_sizes=INPUT_SIZES, source=SOURCE)(build)


iresnet18 = _register("iresnet18")
iresnet34 = _register("iresnet34")
iresnet50 = _register("iresnet50")
iresnet100 = _register("iresnet100")
iresnet200 = _register("iresnet200")
