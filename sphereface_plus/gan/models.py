"""The MHE-GAN networks: the DCGAN generator and the SN-DCGAN "standard CNN" discriminator.

A transcription of wy1iu/MHE ``MHE-GAN/sn-model/net.py`` (``DCGANGenerator``, ``SNDCGAN_Discrminator``)
with ``libs/ops.py`` (layers, initialisation, batch norm) and ``libs/sn.py`` (spectral norm). The
non-SN model (``MHE-GAN/non-sn-model``) is the same network with ``spectral_normed=False``.

Facts taken from the original files (and checked against them by ``tests/test_gan.py``):

* Every weight is drawn from ``tf.truncated_normal_initializer(stddev=0.02)``: a normal truncated at two
  standard deviations (``trunc_normal_(std=0.02, a=-0.04, b=0.04)``); biases start at zero.
* ``linear`` has no bias (``with_biases=False`` in both networks); ``conv2d`` and ``deconv2d`` have one.
* Batch norm is ``tf.contrib.layers.batch_norm(decay=0.9, epsilon=2e-5, center=True, scale=True,
  updates_collections=None)``: PyTorch ``momentum=0.1, eps=2e-5``. The first one normalises the flat
  8192-vector of the linear layer *before* the reshape (``BatchNorm1d(8192)``). With
  ``updates_collections=None`` contrib's batch norm takes its fused kernel for rank 2 and rank 4 inputs,
  whose moving variance is Bessel-corrected like PyTorch's running variance.
* TF ``"SAME"`` padding. For the sizes used here it is symmetric: a 4x4 stride-2 convolution of an even
  input needs ``(out - 1) * 2 + 4 - in = 2`` padding rows, one each side (``padding=1``), a 3x3 stride-1
  convolution one each side; the transposed convolutions are the adjoints of those, which is
  ``ConvTranspose2d(padding=1)`` with no ``output_padding`` (8 -> 16 -> 32 exactly). The test compares
  the layers with a numpy TF-SAME convolution and its adjoint, so no asymmetric padding is needed.
* TF's NHWC memory order is kept at the two reshapes (generator 8192 -> 4x4x512, discriminator
  4x4x512 -> 8192), so a TF checkpoint maps onto these modules by transposing the kernels only
  (``conv``: HWIO -> OIHW, ``deconv``: HW(out)(in) -> (in)(out)HW, ``linear``: transposed).
* Leaky ReLU slope 0.1 (``lrelu(x, leak=0.1)``).
* Spectral norm: one power iteration per call from a persistent ``u`` (``1 x out``, truncated-normal,
  std 1), ``_l2normalize(v) = v / (|v| + 1e-12)``, ``sigma = v W u^T`` with the *new* ``u`` and ``v``,
  and no stop-gradient: the gradient flows through ``u`` and ``v`` as functions of ``W``. ``u`` is
  stored only on the calls that ask for it (``update_u=True``); the original's ``train.py`` does that on
  the fake-image call (``update_collection=None``) and not on the real-image one (``"NO_OPS"``).
  :func:`torch.nn.utils.spectral_norm` differs on two points (it detaches ``u`` and ``v``, and it updates
  ``u`` on every training-mode forward), so it is not used.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Z_DIM",
    "Generator",
    "Discriminator",
    "spectral_normalize",
    "tf_truncated_normal_",
]

Z_DIM = 128  # DCGANGenerator(hidden_dim=128)
INIT_STD = 0.02  # stddev=0.02 on every layer of both networks
BN_MOMENTUM = 0.1  # TF decay 0.9
BN_EPS = 2e-5
LEAK = 0.1
SN_EPS = 1e-12  # libs/sn.py _l2normalize

# discriminator layers of net.py: (name, out channels, kernel, stride)
D_CONVS: Tuple[Tuple[str, int, int, int], ...] = (
    ("c0_0", 64, 3, 1),
    ("c0_1", 128, 4, 2),
    ("c1_0", 128, 3, 1),
    ("c1_1", 256, 4, 2),
    ("c2_0", 256, 3, 1),
    ("c2_1", 512, 4, 2),
    ("c3_0", 512, 3, 1),
)
D_LINEAR = "l4"


def tf_truncated_normal_(tensor: torch.Tensor, std: float = INIT_STD) -> torch.Tensor:
    """``tf.truncated_normal_initializer(stddev=std)``: a normal law cut at two standard deviations."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def _init_tf(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            tf_truncated_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """``DCGANGenerator`` with batch norm: z (128-d) -> 32x32x3 images in [-1, 1] (NCHW).

    ``l0`` linear 128 -> 8192 (no bias), ``bn0`` over the 8192 units, ReLU, reshape to 4x4x512;
    ``dc1..dc3`` 4x4 stride-2 transposed convs 512 -> 256 -> 128 -> 64, each BN + ReLU; ``dc4`` 3x3
    stride-1 transposed conv 64 -> 3; tanh.
    """

    def __init__(self, z_dim: int = Z_DIM):
        super().__init__()
        self.z_dim = int(z_dim)
        self.l0 = nn.Linear(self.z_dim, 4 * 4 * 512, bias=False)
        self.bn0 = nn.BatchNorm1d(4 * 4 * 512, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.dc1 = nn.ConvTranspose2d(512, 256, 4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(256, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.dc2 = nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(128, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.dc3 = nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(64, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.dc4 = nn.ConvTranspose2d(64, 3, 3, stride=1, padding=1)
        _init_tf(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.l0(z)))
        # tf.reshape(l0, [B, 4, 4, 512]) is NHWC; view it that way, then go to NCHW
        x = x.view(-1, 4, 4, 512).permute(0, 3, 1, 2)
        x = F.relu(self.bn1(self.dc1(x)))
        x = F.relu(self.bn2(self.dc2(x)))
        x = F.relu(self.bn3(self.dc3(x)))
        return torch.tanh(self.dc4(x))


def _l2normalize(v: torch.Tensor) -> torch.Tensor:
    return v / (v.pow(2).sum().sqrt() + SN_EPS)


def spectral_normalize(weight: torch.Tensor, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One power iteration of ``libs/sn.py spectral_normed_weight``: ``(W / sigma, u_new, sigma)``.

    ``weight`` is a PyTorch weight (``out x ...``); ``W = weight.reshape(out, -1)`` is the transpose of
    the original's ``W_reshaped`` (``k*k*in x out``), so ``v = l2n(u W)``, ``u_new = l2n(v W^T)`` and
    ``sigma = v W u_new^T`` are the original's ``u W_r^T``, ``v W_r`` and ``v W_r u^T``. The gradient
    flows through ``v`` and ``u_new`` (the original has no stop-gradient); ``u`` itself is a constant.
    """
    w = weight.reshape(weight.shape[0], -1)
    v = _l2normalize(u @ w)
    u_new = _l2normalize(v @ w.t())
    sigma = (v @ w.t() @ u_new.t())[0, 0]
    return weight / sigma, u_new, sigma


class Discriminator(nn.Module):
    """``SNDCGAN_Discrminator``: 32x32x3 images in [-1, 1] (NCHW) -> one logit per image.

    Seven convs (3x3 64, 4x4/2 128, 3x3 128, 4x4/2 256, 3x3 256, 4x4/2 512, 3x3 512), each followed by a
    leaky ReLU 0.1, then ``l4`` linear 8192 -> 1 without bias. With ``spectral_norm=True`` (the
    sn-model) every layer's weight is divided by its spectral norm estimate, one power iteration per
    call; the layers keep their raw weights as parameters (MHE acts on those, as in the original).

    ``forward(x, update_u=False)``: ``update_u=True`` stores the new power-iteration vectors (the
    original does that on the fake-image call only). Without spectral norm the flag does nothing.
    """

    def __init__(self, spectral_norm: bool = True):
        super().__init__()
        self.spectral_norm = bool(spectral_norm)
        in_ch = 3
        for name, out_ch, k, stride in D_CONVS:
            self.add_module(name, nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=1))
            in_ch = out_ch
        self.add_module(D_LINEAR, nn.Linear(4 * 4 * 512, 1, bias=False))
        _init_tf(self)
        if self.spectral_norm:
            for _, layer in self.layers():
                u = tf_truncated_normal_(torch.empty(1, layer.weight.shape[0]), std=1.0)
                layer.register_buffer("sn_u", u)

    def layers(self) -> Iterator[Tuple[str, nn.Module]]:
        """The eight weight layers in order, ``(name, module)``: the convs, then ``l4``."""
        for name, *_ in D_CONVS:
            yield name, getattr(self, name)
        yield D_LINEAR, getattr(self, D_LINEAR)

    def _weight(self, layer: nn.Module, update_u: bool) -> torch.Tensor:
        if not self.spectral_norm:
            return layer.weight
        # autograd keeps u for the backward pass; store the new one into the buffer, not the saved tensor
        u = layer.sn_u.clone() if update_u else layer.sn_u
        w_bar, u_new, _ = spectral_normalize(layer.weight, u)
        if update_u:
            with torch.no_grad():
                layer.sn_u.copy_(u_new)
        return w_bar

    def sigmas(self) -> List[torch.Tensor]:
        """The current spectral-norm estimates ``sigma`` of the eight layers (no update, no gradient)."""
        if not self.spectral_norm:
            raise ValueError("Discriminator(spectral_norm=False) has no spectral-norm estimates")
        with torch.no_grad():
            return [spectral_normalize(m.weight, m.sn_u)[2] for _, m in self.layers()]

    def forward(self, x: torch.Tensor, update_u: bool = False) -> torch.Tensor:
        for name, *_ in D_CONVS:
            conv = getattr(self, name)
            x = F.leaky_relu(
                F.conv2d(x, self._weight(conv, update_u), conv.bias, conv.stride, conv.padding), LEAK
            )
        # tf.reshape(c3_0, [B, -1]) flattens NHWC
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        linear = getattr(self, D_LINEAR)
        return F.linear(x, self._weight(linear, update_u)).reshape(-1)
