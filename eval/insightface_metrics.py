"""insightface's verification protocol (docs/theory.md#protocol-insightface), beside the SphereFace one of
:mod:`eval.verification_metrics`, whose report keys it shares.

The facts of insightface's ``recognition/arcface_torch/eval/verification.py`` (not its code): the feature of
an image is the sum of the embeddings of the crop and of its mirror, L2-normalised; a pair is scored by the
squared L2 distance of its two features and called "same" when the distance is strictly below the
threshold; the accuracy threshold is chosen on the grid ``np.arange(0, 4, 0.01)`` (400 values) as the FIRST
best one on the other folds (``np.argmax``); folds are ``KFold(10, shuffle=False)`` (contiguous blocks);
VAL@FAR uses the finer grid ``np.arange(0, 4, 0.001)`` and a linear interpolation of threshold against FAR.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from eval.verification_metrics import DEFAULT_FARS, scores_and_labels, fold_report

__all__ = ["INSIGHTFACE_THRESHOLDS", "INSIGHTFACE_VAL_THRESHOLDS", "INSIGHTFACE_VAL_FAR", "l2_normalise_like_sklearn",
           "insightface_embeddings", "squared_distances", "distance_correct_counts", "insightface_kfold",
           "threshold_at_far_slinear", "insightface_val_far", "insightface_report"]

#: ``np.arange(0, 4, 0.01)`` itself (not ``k / 100``): the exact doubles insightface compares with
INSIGHTFACE_THRESHOLDS: np.ndarray = np.arange(0, 4, 0.01)
INSIGHTFACE_THRESHOLDS.setflags(write=False)
#: the VAL@FAR grid, ``np.arange(0, 4, 0.001)``
INSIGHTFACE_VAL_THRESHOLDS: np.ndarray = np.arange(0, 4, 0.001)
INSIGHTFACE_VAL_THRESHOLDS.setflags(write=False)
INSIGHTFACE_VAL_FAR = 1e-3


def l2_normalise_like_sklearn(x) -> np.ndarray:
    """Rows divided by their L2 norm in float64, as ``sklearn.preprocessing.normalize`` does it
    (``sqrt(einsum)`` norms; a norm below ``10 * eps`` is taken as 1, so a zero row stays zero)."""
    x = np.array(x, dtype=np.float64, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    x /= norms[:, np.newaxis]
    return x


def insightface_embeddings(features, flip_halves: bool) -> np.ndarray:
    """The protocol's image features: ``f(crop) + f(mirror)`` (when the rows hold the two halves
    side by side, as :func:`eval.features.embed_batch` writes them), then L2-normalised (float64)."""
    f = np.asarray(features, dtype=np.float64)
    if flip_halves:
        if f.shape[1] % 2:
            raise ValueError(f"crop + mirror features must have an even width, got {f.shape[1]}")
        d = f.shape[1] // 2
        f = f[:, :d] + f[:, d:]
    return l2_normalise_like_sklearn(f)


def squared_distances(emb1, emb2) -> np.ndarray:
    """``sum((e1 - e2)**2)`` per pair, the operations in insightface's order (float64)."""
    diff = np.subtract(np.asarray(emb1, dtype=np.float64), np.asarray(emb2, dtype=np.float64))
    return np.sum(np.square(diff), 1)


def distance_correct_counts(dist, issame, thresholds: np.ndarray = INSIGHTFACE_THRESHOLDS) -> np.ndarray:
    """Correct decisions at every threshold: ``#(same with dist < t) + #(different with dist >= t)``."""
    dist, issame = scores_and_labels(dist, issame)
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    t = np.asarray(thresholds, dtype=np.float64)
    tp = np.searchsorted(pos, t, side="left")  # same pairs strictly below t
    tn = neg.size - np.searchsorted(neg, t, side="left")  # different pairs at or above t
    return tp.astype(np.int64) + tn.astype(np.int64)


def insightface_kfold(dist, issame, folds, thresholds: np.ndarray = INSIGHTFACE_THRESHOLDS) -> Dict[str, object]:
    """Per fold: the first threshold of the grid with the best accuracy on the other folds, and the
    accuracy ``(tp + tn) / n`` it gives on the fold (insightface's ``calculate_roc``)."""
    dist, issame = scores_and_labels(dist, issame)
    folds = np.asarray(folds).ravel()
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError("k-fold accuracy needs at least 2 folds")
    t = np.asarray(thresholds, dtype=np.float64)
    accs, thrs = np.zeros(fold_ids.size), np.zeros(fold_ids.size)
    for f, k in enumerate(fold_ids):
        test = folds == k
        best = int(np.argmax(distance_correct_counts(dist[~test], issame[~test], t)))  # the first best
        correct = int(distance_correct_counts(dist[test], issame[test], t[best:best + 1])[0])
        accs[f] = float(correct) / float(test.sum())
        thrs[f] = t[best]
    return {"fold_ids": fold_ids, "fold_accuracies": accs, "fold_thresholds": thrs}


def threshold_at_far_slinear(far_curve, thresholds, target: float) -> float:
    """The threshold where the FAR curve reaches ``target``: scipy's ``interp1d(far, thresholds,
    kind='slinear')(target)`` as scipy computed it before it refused repeated x values.

    ``far_curve`` is non-decreasing along ``thresholds`` and has plateaus (repeated FAR values); scipy
    then built the linear B-spline with knots ``[x0, x, x_last]`` and coefficients ``thresholds``
    (``make_interp_spline``, k=1), which evaluates at ``target`` to the straight line between the
    LAST grid point whose FAR is ``<= target`` and the next point (the first with a larger FAR). So a
    target equal to a plateau's FAR gives the plateau's largest threshold, and a target between two
    plateaus interpolates from the end of the lower one to the start of the upper one. A target equal
    to the last FAR value gives the last threshold. The caller checks ``max(far) >= target``.
    """
    x = np.asarray(far_curve, dtype=np.float64)
    y = np.asarray(thresholds, dtype=np.float64)
    i = int(np.searchsorted(x, target, side="right")) - 1  # the last point with far <= target
    if i < 0:
        raise ValueError(f"target FAR {target} lies below the curve's first value {x[0]}")
    if i >= x.size - 1:
        return float(y[-1])
    lo, hi = x[i], x[i + 1]
    # de Boor for k=1 on [lo, hi): c_i * (hi - t) / (hi - lo) + c_{i+1} * (t - lo) / (hi - lo)
    return float(y[i] * ((hi - target) / (hi - lo)) + y[i + 1] * ((target - lo) / (hi - lo)))


def insightface_val_far(dist, issame, folds, far_target: float = INSIGHTFACE_VAL_FAR,
                        thresholds: np.ndarray = INSIGHTFACE_VAL_THRESHOLDS) -> Dict[str, object]:
    """VAL at ``far_target`` (insightface's ``calculate_val``): per fold, the threshold where the
    other folds' FAR reaches the target (:func:`threshold_at_far_slinear`; 0.0 when their FAR never
    reaches it), then VAL = TA / #same and FAR = FA / #different on the fold with ``dist < t``.

    Returns ``val`` (mean over folds), ``val_std`` (population), ``far`` (mean), and per fold
    ``fold_val``, ``fold_far``, ``fold_thresholds``. A fold without same (different) pairs gives NaN.
    """
    dist, issame = scores_and_labels(dist, issame)
    folds = np.asarray(folds).ravel()
    t = np.asarray(thresholds, dtype=np.float64)
    vals, fars, thrs = [], [], []
    for k in np.unique(folds):
        test = folds == k
        neg_train = np.sort(dist[~test & ~issame])
        far_train = (np.searchsorted(neg_train, t, side="left").astype(np.float64) / float(neg_train.size)
                     if neg_train.size else np.zeros(t.size))
        thr = threshold_at_far_slinear(far_train, t, far_target) if far_train.max() >= far_target else 0.0
        same, diff = dist[test & issame], dist[test & ~issame]
        vals.append(float((same < thr).sum()) / float(same.size) if same.size else float("nan"))
        fars.append(float((diff < thr).sum()) / float(diff.size) if diff.size else float("nan"))
        thrs.append(float(thr))
    vals_a = np.asarray(vals)
    return {"val": float(np.mean(vals_a)), "val_std": float(np.std(vals_a)), "far": float(np.mean(fars)),
            "fold_val": vals, "fold_far": fars, "fold_thresholds": thrs, "far_target": float(far_target)}


def insightface_report(emb1, emb2, issame, folds, fars: Sequence[float] = DEFAULT_FARS,
                       roc_points: bool = True) -> Dict[str, object]:
    """insightface's verification report on L2-normalised pair features (:func:`insightface_embeddings`).

    The same keys as :func:`verification_report` (thresholds are squared distances here), plus
    ``val_at_far`` (VAL, its std, the FAR reached and the target, insightface's VAL@FAR=1e-3). ROC,
    EER, AUC and TAR@FAR score the pairs by ``-distance`` (no fold enters the score).
    """
    issame = np.asarray(issame).astype(bool).ravel()
    dist = squared_distances(emb1, emb2)
    kf = insightface_kfold(dist, issame, folds)
    vf = insightface_val_far(dist, issame, folds)
    val = {"val_at_far": {"val": vf["val"], "val_std": vf["val_std"], "far": vf["far"], "far_target": vf["far_target"],
                          "fold_val": vf["fold_val"], "fold_far": vf["fold_far"],
                          "fold_thresholds": vf["fold_thresholds"]}}
    return fold_report(kf["fold_accuracies"], kf["fold_thresholds"], -dist, issame, int(kf["fold_ids"].size), False,
                        fars, roc_points, extra=val)
