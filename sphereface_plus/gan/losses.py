"""GAN losses and the MHE term of MHE-GAN, as pure functions.

Adversarial losses (on the discriminator's logits):

* ``"nonsaturating"`` (the original, ``MHE-GAN/*/train.py``): ``D = mean(softplus(d_fake) +
  softplus(-d_real))``, ``G = mean(softplus(-d_fake))``.
* ``"hinge"`` (an option, not in the original): ``D = mean(relu(1 - d_real)) + mean(relu(1 + d_fake))``,
  ``G = -mean(d_fake)``.

MHE (``libs/ops.py``, the ``mhe=True`` blocks of ``conv2d`` and ``linear``), per layer with filters ``w``
reshaped to ``(k*k*in) x out``::

    filt  = [w; -w]                         # along the input axis: 2*k*k*in x out
    filt /= sqrt(sum(filt^2, axis=0) + 1e-4)  # column norm sqrt(2|w_j|^2 + 1e-4)
    M     = triu(2 - 2 filt^T filt) * (1 - I) # diagonal and lower part zeroed
    term  = -magnitude * mean(log(M + 1e-4))  # mean over all out x out entries

The concatenation keeps each filter's direction (it is not the half-space ``[W; -W]`` over neurons) but
doubles the squared norm, so the cosines are ``2 w_i.w_j / sqrt((2|w_i|^2 + 1e-4)(2|w_j|^2 + 1e-4))``;
the zeroed entries each contribute ``log(1e-4)`` to the mean. The discriminator's last layer has one
unit, so its term is the constant ``-magnitude * log(1e-4)``. The magnitude is hard-coded in ``ops.py``:
``1e-7`` in the sn-model, ``1e-6`` in the non-sn-model.

The task this module implements (docs/gan.md) describes the term as summed once over the layers. The
original adds each layer's term to the ``d_mhe_loss`` collection *every time the discriminator is built*,
and ``train.py`` builds it twice (``d_fake`` and ``d_real``), so the ``d_mhe_loss`` added to D's loss is
twice the per-layer sum. :func:`gan_mhe_loss` reproduces that by default (``copies=2``) so that the
published magnitudes mean the same here.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from sphereface_plus.errors import UsageError
from sphereface_plus.mhe import POWERS, MHERegularizer, ObjectiveSettings, mhe_energy, normalize_power

__all__ = [
    "LOSSES",
    "MHE_MAGNITUDE",
    "MHE_KERNELS",
    "ORIGINAL_COPIES",
    "d_loss_nonsaturating",
    "g_loss_nonsaturating",
    "d_loss_hinge",
    "g_loss_hinge",
    "adversarial_losses",
    "original_mhe_term",
    "gan_mhe_loss",
    "discriminator_regularizer",
]

MHE_EPS = 1e-4  # eps of ops.py, both in the column norm and inside the log
# the magnitude hard-coded in ops.py, by model
MHE_MAGNITUDE: Dict[str, float] = {"sn": 1e-7, "no_sn": 1e-6}
# each layer's term enters d_mhe_loss once per discriminator call; train.py calls it twice
ORIGINAL_COPIES = 2
# "original" is ops.py's formula; the rest are the toolkit's kernels (sphereface_plus.mhe.POWERS)
MHE_KERNELS: Tuple[str, ...] = ("original",) + tuple(POWERS)


def d_loss_nonsaturating(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(d_fake) + softplus(-d_real))`` (train.py)."""
    return (F.softplus(d_fake) + F.softplus(-d_real)).mean()


def g_loss_nonsaturating(d_fake: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(-d_fake))`` (train.py)."""
    return F.softplus(-d_fake).mean()


def d_loss_hinge(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - d_real)) + mean(relu(1 + d_fake))`` (Lim & Ye 2017; Miyato et al. 2018)."""
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def g_loss_hinge(d_fake: torch.Tensor) -> torch.Tensor:
    """``-mean(d_fake)``."""
    return -d_fake.mean()


DLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GLoss = Callable[[torch.Tensor], torch.Tensor]
LOSSES: Dict[str, Tuple[DLoss, GLoss]] = {
    "nonsaturating": (d_loss_nonsaturating, g_loss_nonsaturating),
    "hinge": (d_loss_hinge, g_loss_hinge),
}


def adversarial_losses(name: str) -> Tuple[DLoss, GLoss]:
    """``(d_loss(d_real, d_fake), g_loss(d_fake))`` of a loss in :data:`LOSSES`."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown GAN loss {name!r}; choose one of: {', '.join(LOSSES)}") from None


def original_mhe_term(weight: torch.Tensor, magnitude: float) -> torch.Tensor:
    """One layer's MHE term of ``libs/ops.py`` (see the module docstring), literally.

    ``weight`` is a PyTorch weight whose dim 0 indexes the filters (``Conv2d``: ``out x in x k x k``,
    ``Linear``: ``out x in``); ``weight.reshape(out, -1).t()`` is the original's ``(k*k*in) x out``
    ``filt`` up to the order of its rows, which the term does not depend on.
    """
    out = weight.shape[0]
    filt = weight.reshape(out, -1).t()
    filt = torch.cat([filt, -filt], dim=0)
    filt = filt / torch.sqrt((filt * filt).sum(dim=0, keepdim=True) + MHE_EPS)
    inner = filt.t() @ filt
    cross = torch.triu(2.0 - 2.0 * inner, diagonal=1)  # == band_part(., 0, -1) * (1 - eye)
    return -magnitude * torch.log(cross + MHE_EPS).mean()


def gan_mhe_loss(
    discriminator: torch.nn.Module,
    magnitude: float,
    kernel: Union[str, int] = "original",
    half_space: bool = False,
    copies: int = ORIGINAL_COPIES,
    regularizer: Optional[MHERegularizer] = None,
) -> torch.Tensor:
    """The MHE term added to the discriminator's loss, on its raw (not spectrally normalised) weights.

    Args:
        discriminator: a :class:`~sphereface_plus.gan.models.Discriminator` (anything with a ``layers()``
            method yielding ``(name, module)`` for its weight layers).
        magnitude: the coefficient (``1e-7`` with spectral norm, ``1e-6`` without, in the original);
            ``0`` gives a zero tensor.
        kernel: ``"original"``: the ``ops.py`` term on all eight layers (the last one contributes the
            constant ``-magnitude * log(1e-4)``), times ``copies``. Otherwise one of the toolkit's kernels
            (``'0' '1' '2' 'a0' 'a1' 'a2'``, :func:`sphereface_plus.mhe.mhe_energy`):
            ``magnitude * sum(E_layer)`` over the seven conv layers (the one-unit linear layer has no
            pair), with ``copies`` not applied.
        half_space: with a toolkit kernel, half-space MHE (``[W; -W]`` over the neurons). Not allowed
            with ``"original"``, whose formula is full-space.
        copies: how many times the original's terms are counted (2: once per discriminator call of
            ``train.py``, see the module docstring). ``1`` gives the plain per-layer sum.
        regularizer: another objective of the MHE family on D's convs
            (:func:`discriminator_regularizer`; ``docs/gan.md#gan-family``): ``magnitude`` times its
            weighted sum (coefficient 1 per layer); ``kernel`` and ``half_space`` are then the
            regulariser's own.

    Returns:
        A 0-dim tensor with gradient with respect to the discriminator's weights.
    """
    magnitude = float(magnitude)
    if not math.isfinite(magnitude) or magnitude < 0:
        raise UsageError(f"MHE magnitude must be a finite number >= 0, got {magnitude}")
    layers = list(discriminator.layers())
    if magnitude == 0:
        return layers[0][1].weight.new_zeros(())
    if regularizer is not None:
        return magnitude * regularizer()[0]
    if str(kernel) == "original":
        if half_space:
            raise UsageError("the original MHE-GAN term is full-space; half_space needs a toolkit kernel (0 1 2 a0 a1 a2)")
        if int(copies) < 1:
            raise UsageError(f"copies must be a positive integer, got {copies}")
        total = sum(original_mhe_term(m.weight, magnitude) for _, m in layers)
        return total * int(copies)
    try:
        power = normalize_power(kernel)
    except ValueError:
        raise UsageError(f"unknown MHE kernel {kernel!r}; choose one of: {', '.join(MHE_KERNELS)}") from None
    energies = [
        mhe_energy(m.weight, power, half_space=half_space, check_finite=False)
        for _, m in layers
        if m.weight.shape[0] >= 2
    ]
    return magnitude * sum(energies)


def discriminator_regularizer(discriminator: torch.nn.Module, objective: str, kernel: Union[str, int] = "2",
                              half_space: bool = False, settings: Optional[ObjectiveSettings] = None) -> MHERegularizer:
    """An objective of the MHE family (``sphereface_plus.mhe.OBJECTIVES``) on the discriminator's layers with at
    least two neurons (its seven convs: the last linear layer has one unit), every layer a hidden layer of
    coefficient 1, so that :func:`gan_mhe_loss`'s ``magnitude`` is the objective's only weight.

    ``kernel``: the kernel of MHE and CoMHE (a toolkit kernel; ``"original"`` is only for MHE's own term);
    ignored by the objectives without one. Its :meth:`~sphereface_plus.mhe.MHERegularizer.advance` runs once
    per discriminator update, before the loss, with D's learning rate.
    """
    from sphereface_plus.mhe import OBJECTIVES

    spec = OBJECTIVES[objective]
    names = [name for name, m in discriminator.layers() if m.weight.shape[0] >= 2]
    power = normalize_power(kernel) if spec.uses_power else None
    return MHERegularizer(discriminator, power=power, half_space=half_space, hidden_coef=1.0, include=names,
                          output_layers=(), objective=objective, settings=settings)
