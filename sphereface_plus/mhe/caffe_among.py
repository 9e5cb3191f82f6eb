"""The Caffe SphereFace+ inter-class term: the ``InterClass`` layer of type ``AMONG`` that trained the
released SphereFace+ models (wy1iu/sphereface-plus, ``tools/caffe-sfplus/src/caffe/layers/inter_class_layer.cpp``).

It is not a pairwise kernel energy. With the classifier rows ``W`` (N of them, shared with the margin
layer, which has made them unit just before) and the batch labels ``y`` (M samples, repeats counted), the
CPU layer computes (formulas: ``docs/theory.md#caffe-among``)::

    Forward_cpu:  D = (1/N) sum_i sum_b |W_i - W_{y_b}|^2           (the layer's output, also logged)
                  w_n = w_mean / sqrt(|w_mean|^2 + 1e-5),  w_mean = (1/N) sum_i W_i   (normalize: true)
    Backward_cpu: diff[y_b] += -4 alpha / (M D^2 + 1e-5) * (W_{y_b} - w_n)   for every sample b;
                  top_diff is not read, so alpha (alpha_start_value) is a layer parameter there.

We implement the CPU layer; the release trained with ``inter_class_layer.cu``, whose forward recomputes D
only every tenth iteration and accumulates D and the mean row with unsynchronised additions.

One implementation serves both classifiers. The pure functions split the layer into sums over rows and
over samples (:func:`caffe_among_partial_sums` -> :func:`caffe_among_distance_from_sums`, the row mean
-> :func:`caffe_among_direction`, then :func:`caffe_among_diff`), each taking a block of rows and the
labels local to it (``-1`` for a sample whose class is in another block). :func:`caffe_among_layer`
chains them as an autograd op (value D, backward the layer's diff times the incoming gradient): the replicated
classifier (:func:`sphereface_plus.mhe.classifier_mhe`, ``mode='caffe_among'``) passes all rows; the
row-sharded one (:func:`sphereface_plus.parallel.mhe.sharded_classifier_mhe`) passes its block, the total
class count and an all-reduce that sums the row sum and the partial sums over the ranks.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = [
    "CAFFE_MEAN_EPS",
    "CAFFE_COEF_EPS",
    "caffe_among_layer",
    "caffe_among_row_mean",
    "caffe_among_partial_sums",
    "caffe_among_distance_from_sums",
    "caffe_among_distance",
    "caffe_among_direction",
    "caffe_among_diff",
]

CAFFE_MEAN_EPS = 1e-5  # w_n = w_mean / sqrt(|w_mean|^2 + 1e-5)   (Forward_cpu, "normalize weight")
CAFFE_COEF_EPS = 1e-5  # -4 alpha / (M D^2 + 1e-5)                   (Backward_cpu)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def caffe_among_row_mean(
    weight: torch.Tensor, num_classes: Optional[int] = None, all_reduce: Optional[AllReduce] = None
) -> torch.Tensor:
    """``w_mean = (1/N) sum_i W_i`` over ALL the classifier's rows.

    Without ``all_reduce`` ``weight`` is the whole classifier and this is its row mean; with it ``weight``
    is one block of rows, ``all_reduce`` sums the block's row sum over the blocks and ``num_classes`` is N.
    """
    if all_reduce is None:
        return weight.mean(dim=0)
    return all_reduce(weight.sum(dim=0)) / num_classes


def _target_sum(centred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_b |W_{y_b} - w_mean|^2`` over the samples whose label is a row of ``centred`` (``-1``: skipped)."""
    target = centred[labels[labels >= 0]]
    return (target * target).sum()


def caffe_among_partial_sums(
    weight: torch.Tensor, labels: torch.Tensor, row_mean: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i |W_i - w_mean|^2, sum_b |W_{y_b} - w_mean|^2)`` over the given rows and the samples whose
    label is one of them (labels ``-1`` are skipped); ``row_mean`` is the mean of ALL the classifier's rows.

    These two sums give D without the ``N x M`` loop of the C++ (see :func:`caffe_among_distance_from_sums`):
    ``sum_i |W_i - W_y|^2 = sum_i |W_i - w_mean|^2 + N |W_y - w_mean|^2`` because the centred rows sum to 0.
    """
    centred = weight - row_mean
    return (centred * centred).sum(), _target_sum(centred, labels)


def caffe_among_distance_from_sums(
    spread_sum: torch.Tensor, target_sum: torch.Tensor, num_classes: int, num_samples: int
) -> torch.Tensor:
    """``D = (1/N) sum_i sum_b |W_i - W_{y_b}|^2 = M * spread_sum / N + target_sum`` (N classes, M samples)."""
    return spread_sum * (float(num_samples) / float(num_classes)) + target_sum


def caffe_among_distance(weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Caffe AMONG layer's output ``D = (1/N) sum_i sum_b |W_i - W_{y_b}|^2`` (Forward_cpu), ``O((N + M) d)``.

    ``weight``: the ``N x d`` rows as given (no normalisation here; the Caffe margin layer has made them
    unit); ``labels``: ``M`` class indices, repeats counted. Plain autograd would give D's own gradient,
    which is NOT what the layer propagates: use :func:`caffe_among_layer` (or
    :func:`~sphereface_plus.mhe.classifier_mhe` with ``mode='caffe_among'``).
    """
    row_mean = weight.mean(dim=0)
    spread, target = caffe_among_partial_sums(weight, labels, row_mean)
    return caffe_among_distance_from_sums(spread, target, weight.shape[0], labels.numel())


def caffe_among_direction(row_mean: torch.Tensor) -> torch.Tensor:
    """``w_n = w_mean / sqrt(|w_mean|^2 + 1e-5)``: the normalised mean row the backward pushes away from."""
    return row_mean * torch.rsqrt((row_mean * row_mean).sum() + CAFFE_MEAN_EPS)


def caffe_among_diff(
    weight: torch.Tensor,
    labels: torch.Tensor,
    direction: torch.Tensor,
    distance: torch.Tensor,
    num_samples: Optional[int] = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """The Caffe AMONG weight diff (Backward_cpu) for the given rows: for every sample b whose label is one
    of them (``-1``: skipped), row ``y_b`` gets ``-4 alpha / (M D^2 + 1e-5) * (W_{y_b} - w_n)``.

    Rows of classes absent from the batch get exactly 0; a class seen k times gets k contributions.
    ``direction`` is :func:`caffe_among_direction` of the mean of ALL rows, ``distance`` the layer's D and
    ``num_samples`` M (default: ``labels.numel()``, the whole batch).
    """
    m = labels.numel() if num_samples is None else int(num_samples)
    coef = (-4.0 * alpha) / (m * distance * distance + CAFFE_COEF_EPS)
    own = labels[labels >= 0]
    diff = torch.zeros_like(weight)
    diff.index_add_(0, own, (weight[own] - direction) * coef)
    return diff


class _CaffeAmong(torch.autograd.Function):
    """D forward, the Caffe AMONG diff backward, scaled by the incoming gradient (:func:`caffe_among_layer`).

    ``groups``: ``replicas x M`` labels local to ``weight`` (``-1`` for rows held elsewhere), one row per
    Caffe GPU; ``all_reduce``: ``None`` when ``weight`` is the whole classifier.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, groups: torch.Tensor, num_classes: int,
                all_reduce: Optional[AllReduce]) -> torch.Tensor:
        row_mean = caffe_among_row_mean(weight, num_classes, all_reduce)
        centred = weight - row_mean
        sums = torch.stack([(centred * centred).sum()] + [_target_sum(centred, g) for g in groups])
        if all_reduce is not None:
            sums = all_reduce(sums)  # one all-reduce: the spread and every group's target sum
        distances = torch.stack([caffe_among_distance_from_sums(sums[0], t, num_classes, groups.shape[1])
                                 for t in sums[1:]])
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(weight, groups, caffe_among_direction(row_mean), distances)
        return distances.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        weight, groups, direction, distances = ctx.saved_tensors
        replicas = groups.shape[0]
        diff = torch.zeros_like(weight)
        for g, dist in zip(groups, distances):
            # Caffe's NCCL all-reduce sums the GPUs' diffs and divides by the solver count
            diff += caffe_among_diff(weight, g, direction, dist, alpha=1.0 / replicas)
        # the incoming gradient plays Caffe's alpha (see classifier_mhe)
        return diff * grad_out, None, None, None


def caffe_among_layer(
    weight: torch.Tensor,
    labels: torch.Tensor,
    replicas: int = 1,
    num_classes: Optional[int] = None,
    all_reduce: Optional[AllReduce] = None,
) -> torch.Tensor:
    """The AMONG layer as an autograd op: the value is D, the backward the layer's diff (not D's gradient).

    ``(alpha * caffe_among_layer(W, y)).backward()`` leaves exactly the Caffe diff for that alpha in ``W.grad``.

    Args:
        weight: the classifier's rows as given (no normalisation), or one block of them.
        labels: the batch's M labels as row indices into ``weight``; ``-1`` for a sample whose class is in
            another block. Checked by the caller.
        replicas: splits the labels into that many equal consecutive groups, each one Caffe GPU's layer
            with its own D; the value is the mean of the Ds and the diff the mean of their diffs (Caffe's
            multi-GPU all-reduce divides the summed diffs by the number of GPUs).
        num_classes: N of the whole classifier (default: the rows of ``weight``).
        all_reduce: for a block of rows, a function summing a tensor over all blocks (and every block's
            holder then has the same value); default none: ``weight`` is the whole classifier.
    """
    if num_classes is None:
        num_classes = weight.shape[0]
    return _CaffeAmong.apply(weight, labels.reshape(int(replicas), -1), int(num_classes), all_reduce)
