"""The SphereFace+ MHE term on a classifier's weights ``C x d``: :func:`classifier_mhe` and its modes.

SphereFace+ (Liu et al., "Learning towards Minimum Hyperspherical Energy", NeurIPS 2018) adds to the
A-Softmax loss an MHE term on the classifier's class rows; :data:`CLASSIFIER_MODES` lists the forms
offered (``docs/theory.md#classifier-mhe-modes``): the mini-batch form (the classes of the batch against
all other classes), the energy among the distinct batch classes, the exact full-space energy computed in
row blocks (memory ``O(block * C)``, never ``O(C^2)``), and the Caffe AMONG term of the released models
(:mod:`sphereface_plus.mhe.caffe_among`). The kernels are those of :mod:`sphereface_plus.mhe.kernels`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from sphereface_plus.heads.functional import check_labels
from sphereface_plus.mhe.caffe_among import caffe_among_layer
from sphereface_plus.mhe.energy import _check_weight, _default_block, _dense_pair_energy, mhe_energy
from sphereface_plus.mhe.kernels import check_variant, mhe_kernel, normalize_power, variant_rows

__all__ = ["CLASSIFIER_MODES", "classifier_mhe"]

CLASSIFIER_MODES = ("batch_vs_all", "batch_unique", "full", "caffe_among")


def _check_labels(labels: torch.Tensor, num_classes: int, check_range: bool = True) -> torch.Tensor:
    labels = check_labels(labels, None, num_classes, check_range=check_range)
    if labels.numel() == 0:
        raise ValueError("labels is empty: classifier_mhe needs at least one sample")
    return labels


def classifier_mhe(
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    power: Union[str, int] = "2",
    mode: str = "batch_vs_all",
    block_size: Optional[int] = None,
    check_finite: bool = True,
    replicas: int = 1,
    variant: str = "mhe",
    check_labels: bool = True,
) -> torch.Tensor:
    """The SphereFace+ MHE term on classifier weights ``C x d`` (``docs/theory.md#classifier-mhe-modes``).

    Modes:
        ``batch_vs_all``: ``1/(B(C-1)) Σ_b Σ_{j≠y_b} e(ŵ_{y_b}, ŵ_j)``, cost ``O(B C d)`` (a class that
        appears several times in the batch counts several times, as in the formula).
        ``batch_unique``: mean pair energy among the distinct classes of the batch; a batch of a
        single class has no pair and gives 0.
        ``full``: exactly :func:`mhe_energy` of ``weight`` (full space), computed in row blocks of
        ``block_size`` (default about 4M entries per block) so memory is ``O(block C)``; ``labels`` is
        not used (pass ``None`` or the batch labels, which are then only validated).
        ``caffe_among``: the Caffe ``InterClass`` layer (type ``AMONG``) that trained the released
        SphereFace+ models (``inter_class_layer.cpp``, CPU forward and backward; see
        :mod:`sphereface_plus.mhe.caffe_among` and ``docs/theory.md#caffe-among``). The value is the layer's
        output ``D = (1/N) Σ_i Σ_b |W_i - W_{y_b}|²`` on the rows as given (no normalisation: the head
        keeps them unit, as Caffe's margin layer does before this layer; ``power`` is not used). Its
        backward is not D's gradient: it is the layer's diff, ``-4/(M D² + 1e-5) (W_{y_b} - w_n)`` added
        to row ``y_b`` for every sample b (``w_n`` the normalised mean row; classes absent from the batch
        get nothing, a class seen k times gets k terms), multiplied by the incoming gradient. The Caffe
        layer ignores its top_diff and takes alpha as a parameter; here alpha arrives as that incoming
        gradient, so ``(alpha * classifier_mhe(W, y, mode='caffe_among')).backward()`` gives exactly the
        Caffe diff for that alpha (the trainer's ``mhe.lambda_m`` is alpha; a loss scaler or gradient
        accumulation then scales it as it scales every other gradient). ``replicas`` > 1 splits the
        labels into that many equal consecutive groups, each one Caffe GPU's layer with its own D, and
        averages them (Caffe's multi-GPU all-reduce divides the summed diffs by the number of GPUs): the
        released recipe ran 2 GPUs x 256, and D, hence the diff, depends on the per-GPU batch.

    ``check_finite``: as in :func:`mhe_energy`; ``check_labels=False`` leaves out the labels' range check
    (labels their owner checked already, without a host sync). ``replicas``: only for ``caffe_among``. ``variant``:
    ``'mhe'`` (default, the MHE reference code's kernels) or ``'opensphere_v0'`` (OpenSphere_v0's
    SphereFace+: unit rows, cosine clamped at 1e-5, kernels on theta itself; batch modes only; see
    :data:`~sphereface_plus.mhe.kernels.MHE_VARIANTS`, docs/theory.md#sphereface-plus-v0).

    Returns:
        A 0-dim tensor with gradient with respect to ``weight``.
    """
    power = normalize_power(power)
    if mode not in CLASSIFIER_MODES:
        raise ValueError(f"unknown classifier_mhe mode {mode!r}: choose one of {', '.join(CLASSIFIER_MODES)}")
    check_variant(variant, mode)
    _check_weight(weight, "classifier weight", check_finite)
    if weight.dim() != 2:
        raise ValueError(f"classifier weight must be C x d, got shape {tuple(weight.shape)}")
    num_classes = weight.shape[0]
    if mode == "full":
        if labels is not None:
            _check_labels(labels, num_classes, check_labels)
        return mhe_energy(weight, power, half_space=False, block_size=block_size or _default_block(num_classes),
                          check_finite=check_finite)
    if labels is None:
        raise ValueError(f"classifier_mhe mode {mode!r} needs the batch labels")
    labels = _check_labels(labels, num_classes, check_labels).to(weight.device)
    if replicas != 1 and mode != "caffe_among":
        raise ValueError(f"replicas={replicas!r} is only for mode 'caffe_among' (got mode {mode!r})")
    if mode == "caffe_among":
        if isinstance(replicas, bool) or int(replicas) != replicas or replicas < 1 or labels.numel() % int(replicas):
            raise ValueError(
                f"replicas must be a positive integer dividing the {labels.numel()} labels (one equal group per "
                f"Caffe GPU), got {replicas!r}"
            )
        return caffe_among_layer(weight, labels, replicas=int(replicas))
    w_hat = variant_rows(weight, variant)
    if mode == "batch_unique":
        classes = torch.unique(labels)
        if classes.numel() < 2:
            return (w_hat[classes] * 0.0).sum()  # no pair: zero energy, still part of the graph
        return _dense_pair_energy(w_hat[classes], power, variant)
    # batch_vs_all
    bsz = labels.numel()
    cos = w_hat[labels] @ w_hat.t()  # B x C
    own = torch.zeros_like(cos, dtype=torch.bool)
    own[torch.arange(bsz, device=cos.device), labels] = True
    e = mhe_kernel(cos.masked_fill(own, 0.0), power, variant).masked_fill(own, 0.0)
    return e.sum() / (bsz * (num_classes - 1))
