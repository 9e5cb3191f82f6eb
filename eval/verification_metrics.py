"""Verification metrics in pure numpy: the LFW k-fold threshold protocol, ROC, AUC, EER, TAR@FAR.

The k-fold protocol is the one of the SphereFace release (``evaluation.m``, docs/theory.md#lfw-protocol):

- thresholds ``t`` in ``{-1, -0.9999, ..., 1}`` (``(-10000:10000) / 10000``, 20,001 values);
- the accuracy of ``t`` counts the positives with ``score > t`` and the negatives with
  ``score < t`` (both strict: a score equal to ``t`` is an error on either side);
- the threshold of fold ``k`` is the mean of *all* thresholds that reach the best accuracy on the
  other folds, and the fold accuracy is that threshold applied to fold ``k``;
- with mean subtraction, the features of fold ``k`` are centred on the mean of both sides of every
  pair of the other folds, L2-normalised, and scored by cosine.

Nothing here loops over thresholds: the scores are sorted once and ``searchsorted`` gives, for all
20,001 thresholds at once, how many positives lie at or below and how many negatives lie strictly
below each threshold. Accuracies are compared as integer counts, so ties are exact.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Sequence

import numpy as np

from sphereface_plus.errors import InputFileError

logger = logging.getLogger(__name__)

# (-10000:10000) / 10000 as in evaluation.m; dividing integers keeps every threshold the exact
# double nearest to k / 10000 (np.arange(-1, 1, 1e-4) would accumulate rounding).
THRESHOLDS: np.ndarray = np.arange(-10000, 10001, dtype=np.float64) / 10000.0
THRESHOLDS.setflags(write=False)

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)


def scores_and_labels(scores, issame):
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame).ravel()
    if issame.dtype != np.bool_:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError("issame must be booleans or 0/1 values")
        issame = issame.astype(bool)
    if scores.shape != issame.shape:
        raise ValueError(f"scores ({scores.size}) and issame ({issame.size}) have different lengths")
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise InputFileError(f"{bad} score(s) are NaN or infinite (are some features all zero?)")
    return scores, issame


def threshold_correct_counts(scores, issame, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Number of correct decisions at every threshold: ``#(pos > t) + #(neg < t)`` (int64 array).

    Vectorised form of ``getAccuracy`` of evaluation.m for all thresholds at once.
    """
    scores, issame = scores_and_labels(scores, issame)
    pos = np.sort(scores[issame])
    neg = np.sort(scores[~issame])
    thresholds = np.asarray(thresholds, dtype=np.float64)
    # positives strictly above t = all positives minus those <= t ('right' counts equal values)
    pos_above = pos.size - np.searchsorted(pos, thresholds, side="right")
    # negatives strictly below t ('left' excludes equal values)
    neg_below = np.searchsorted(neg, thresholds, side="left")
    return pos_above.astype(np.int64) + neg_below.astype(np.int64)


def accuracy_at(scores, issame, threshold: float) -> float:
    """Accuracy of one threshold with strict inequalities on both sides (``getAccuracy``)."""
    scores, issame = scores_and_labels(scores, issame)
    if scores.size == 0:
        raise ValueError("no pairs to score")
    correct = int((scores[issame] > threshold).sum()) + int((scores[~issame] < threshold).sum())
    return correct / scores.size


def best_threshold(scores, issame, thresholds: np.ndarray = THRESHOLDS) -> float:
    """Mean of all thresholds that reach the best accuracy (``getThreshold`` of evaluation.m)."""
    counts = threshold_correct_counts(scores, issame, thresholds)
    best = counts == counts.max()
    return float(np.mean(np.asarray(thresholds, dtype=np.float64)[best]))


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputFileError(f"{int((norms == 0).sum())} feature vector(s) are zero after centring; cannot normalise")
    return x / norms


def fold_scores(feat1, feat2, folds, mean_sub: bool = True):
    """Cosine scores of every pair under the feature mean of each held-out fold.

    Returns ``(fold_ids, scores)`` where ``scores[f]`` holds the scores of *all* pairs computed with
    the mean of the folds other than ``fold_ids[f]`` (the same row for every fold when
    ``mean_sub=False``). Features are used in float64.
    """
    feat1 = np.asarray(feat1, dtype=np.float64)
    feat2 = np.asarray(feat2, dtype=np.float64)
    folds = np.asarray(folds).ravel()
    if feat1.ndim != 2 or feat1.shape != feat2.shape:
        raise ValueError(f"feature arrays must both be N x D, got {feat1.shape} and {feat2.shape}")
    if folds.size != feat1.shape[0]:
        raise ValueError(f"{folds.size} fold indices for {feat1.shape[0]} pairs")
    fold_ids = np.unique(folds)
    if not mean_sub:
        s = np.einsum("nd,nd->n", _normalise_rows(feat1), _normalise_rows(feat2))
        return fold_ids, np.broadcast_to(s, (fold_ids.size, s.size))
    # Centre once on the mean over all pairs, m. The mean of the other folds is then m + d_k with
    # d_k small, and (a - d_k).(b - d_k) = a.b - d_k.(a + b) + d_k.d_k with a = f1 - m: ten folds
    # cost a few N x D x 10 products instead of ten passes that centre and normalise copies of the
    # features. Because |d_k| is small next to |a|, the expansion loses no precision that matters
    # (unlike expanding around 0). Rows are processed in blocks that stay in cache: no N x D
    # temporaries (allocating those costs more than the arithmetic).
    n, dim = feat1.shape
    m = (feat1.sum(0) + feat2.sum(0)) / (2 * n)
    fold_index = np.searchsorted(fold_ids, folds)
    n_fold = np.bincount(fold_index, minlength=fold_ids.size).astype(np.float64)
    if (n_fold == n).any():
        raise ValueError("every fold needs pairs outside it")
    block = max(1, (1 << 18) // max(1, dim))  # ~2 MB of float64 per block
    fold_sum = np.zeros((fold_ids.size, dim))
    ab, aa, bb = np.empty(n), np.empty(n), np.empty(n)
    for s in range(0, n, block):  # pass 1: per-fold sums and the centred dot products
        a = feat1[s:s + block] - m
        b = feat2[s:s + block] - m
        onehot = (fold_index[None, s:s + block] == np.arange(fold_ids.size)[:, None]).astype(np.float64)
        fold_sum += np.einsum("fn,nd->fd", onehot, a + b)
        ab[s:s + block] = np.einsum("nd,nd->n", a, b)
        aa[s:s + block] = np.einsum("nd,nd->n", a, a)
        bb[s:s + block] = np.einsum("nd,nd->n", b, b)
    d = (fold_sum.sum(0, keepdims=True) - fold_sum) / (2 * (n - n_fold))[:, None]  # F x D
    ad, bd = np.empty((n, fold_ids.size)), np.empty((n, fold_ids.size))
    for s in range(0, n, block):  # pass 2: projections on the fold offsets
        ad[s:s + block] = np.einsum("nd,fd->nf", feat1[s:s + block] - m, d)
        bd[s:s + block] = np.einsum("nd,fd->nf", feat2[s:s + block] - m, d)
    dd = np.einsum("fd,fd->f", d, d)
    num = ab[:, None] - ad - bd + dd[None, :]
    na = aa[:, None] - 2 * ad + dd[None, :]
    nb = bb[:, None] - 2 * bd + dd[None, :]
    if (na <= 0).any() or (nb <= 0).any():
        raise InputFileError("some feature vectors equal the fold mean; cannot normalise")
    return fold_ids, np.ascontiguousarray((num / np.sqrt(na * nb)).T)


def kfold_accuracy(scores_per_fold, issame, folds, thresholds: np.ndarray = THRESHOLDS) -> Dict[str, object]:
    """k-fold threshold accuracy from precomputed scores.

    ``scores_per_fold`` is either one score per pair (1-D; the same scores for every fold) or the
    ``F x N`` output of :func:`fold_scores`. For each fold the threshold is chosen on the other
    folds (:func:`best_threshold`) and applied to the fold.

    Returns ``fold_ids``, ``fold_accuracies``, ``fold_thresholds`` and ``test_scores`` (every pair's
    score from the fold in which it was tested, the out-of-fold scores used for ROC curves).
    """
    issame = np.asarray(issame).astype(bool).ravel()
    folds = np.asarray(folds).ravel()
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError("k-fold accuracy needs at least 2 folds")
    scores = np.asarray(scores_per_fold, dtype=np.float64)
    if scores.ndim == 1:
        scores = np.broadcast_to(scores, (fold_ids.size, scores.size))
    if scores.shape != (fold_ids.size, issame.size):
        raise ValueError(f"scores shape {scores.shape} does not match {fold_ids.size} folds x {issame.size} pairs")
    accs, thrs = [], []
    test_scores = np.empty(issame.size, dtype=np.float64)
    for f, k in enumerate(fold_ids):
        test = folds == k
        thr = best_threshold(scores[f][~test], issame[~test], thresholds)
        accs.append(accuracy_at(scores[f][test], issame[test], thr))
        thrs.append(thr)
        test_scores[test] = scores[f][test]
    return {
        "fold_ids": fold_ids,
        "fold_accuracies": np.asarray(accs),
        "fold_thresholds": np.asarray(thrs),
        "test_scores": test_scores,
    }


def roc_curve(scores, issame, drop_intermediate: bool = True):
    """ROC curve ``(fpr, tpr, thresholds)``; the decision at a threshold is ``score >= threshold``.

    Same points as ``sklearn.metrics.roc_curve`` (first threshold ``inf``; collinear points dropped
    with ``drop_intermediate``), written here so the reports need no sklearn at run time.
    """
    scores, issame = scores_and_labels(scores, issame)
    n_pos, n_neg = int(issame.sum()), int((~issame).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC curve needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], issame[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    thr = s[last_of_run]
    if drop_intermediate and tps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thr = np.r_[np.inf, thr]
    return fps / n_neg, tps / n_pos, thr


def auc(fpr, tpr) -> float:
    """Area under a ROC curve by the trapezoidal rule."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def eer(fpr, tpr) -> float:
    """Equal error rate: where the false-reject rate ``1 - tpr`` meets ``fpr`` on the ROC curve.

    The ROC points are joined by straight lines (as the curve is drawn) and the crossing of
    ``fnr - fpr`` through zero is interpolated linearly.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    fnr = 1.0 - np.asarray(tpr, dtype=np.float64)
    d = fnr - fpr  # decreasing from 1 (at fpr=0, tpr=0) to -1 (at fpr=1, tpr=1)
    i = int(np.flatnonzero(d <= 0)[0])
    if i == 0 or d[i] == 0:
        return float(fpr[i])
    w = d[i - 1] / (d[i - 1] - d[i])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def allowed_false_accepts(far: float, n_impostors: int) -> int:
    """``floor(far * n)``, robust to the binary rounding of ``far`` (1e-6 * 1e6 must give 1)."""
    return int(math.floor(far * n_impostors * (1.0 + 1e-12)))


def tar_at_far(genuine, impostor, far: float) -> Dict[str, float]:
    """Best true-accept rate whose false-accept rate is at most ``far`` (decision ``score > t``).

    With ``k = floor(far * n_impostor)`` false accepts allowed, the lowest usable threshold is the
    ``(k+1)``-th largest impostor score: at ``t`` equal to it at most ``k`` impostors lie strictly
    above, and any lower ``t`` lets in ``k + 1``. ``t = -inf`` when ``k`` covers every impostor.
    """
    genuine = np.asarray(genuine, dtype=np.float64).ravel()
    impostor = np.asarray(impostor, dtype=np.float64).ravel()
    if genuine.size == 0 or impostor.size == 0:
        raise ValueError("TAR@FAR needs genuine and impostor scores")
    return tar_from_top_impostors(genuine, np.sort(impostor)[::-1][: allowed_false_accepts(far, impostor.size) + 1],
                                  impostor.size, far)


def tar_from_top_impostors(genuine, top_impostors, n_impostors: int, far: float) -> Dict[str, float]:
    """:func:`tar_at_far` given only the largest impostor scores (enough: ``floor(far*n)+1`` of them).

    Lets the MegaFace scorer keep a bounded buffer instead of 3.5 billion impostor scores.
    """
    genuine = np.asarray(genuine, dtype=np.float64).ravel()
    k = allowed_false_accepts(far, n_impostors)
    top = np.sort(np.asarray(top_impostors, dtype=np.float64).ravel())[::-1]
    if k >= n_impostors:
        t = -np.inf
    else:
        if top.size < k + 1:
            raise ValueError(f"need the {k + 1} largest impostor scores, got {top.size}")
        t = float(top[k])
    false_accepts = int((top > t).sum()) if np.isfinite(t) else n_impostors
    return {
        "tar": float((genuine > t).mean()),
        "threshold": float(t),
        "far": false_accepts / n_impostors,
    }


def tar_at_nearest_far(fpr, tpr, thresholds, far: float) -> Dict[str, float]:
    """TAR at the ROC point whose FPR is nearest to ``far`` (insightface's IJB tables, ``ijb_11.py``).

    insightface flips the ``roc_curve`` arrays and takes the first minimum of ``|fpr - far|``:
    among equally near points that is the last one in ROC order, the one with the highest TPR.
    The chosen FPR may exceed ``far``; :func:`tar_at_far` gives the FAR-bounded figure.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    d = np.abs(fpr - far)
    i = int(np.flatnonzero(d == d.min())[-1])
    return {"tar": float(np.asarray(tpr)[i]), "far": float(fpr[i]), "threshold": float(np.asarray(thresholds)[i])}


def far_key(far: float) -> str:
    """``1e-2`` -> ``"1e-2"`` (the JSON key of a FAR)."""
    mant, exp = f"{far:e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def verification_report(
    feat1,
    feat2,
    issame,
    folds,
    mean_sub: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
    roc_points: bool = True,
) -> Dict[str, object]:
    """The full report of the k-fold protocol on paired features (docs/theory.md#lfw-protocol).

    Keys: ``fold_accuracies`` (in fold order), ``mean_accuracy``, ``std_accuracy`` (population
    standard deviation over folds, numpy's default and insightface's convention), ``fold_thresholds``,
    ``threshold`` (their mean), ``eer``, ``auc``, ``tar_at_far`` (keyed ``"1e-2"``...), ``num_pairs``,
    ``num_positive``, ``mean_sub``, and ``roc`` (``fpr``, ``tpr`` lists). ROC, EER, AUC and TAR@FAR
    are computed on the out-of-fold scores: each pair scored with the mean of the folds it was not
    part of, exactly as in the accuracy.
    """
    issame = np.asarray(issame).astype(bool).ravel()
    fold_ids, scores = fold_scores(feat1, feat2, folds, mean_sub=mean_sub)
    kf = kfold_accuracy(scores, issame, folds)
    return fold_report(kf["fold_accuracies"], kf["fold_thresholds"], kf["test_scores"], issame, int(fold_ids.size),
                        bool(mean_sub), fars, roc_points)


def fold_report(accs, fold_thresholds, scores, issame, num_folds: int, mean_sub: bool, fars: Sequence[float],
                 roc_points: bool, extra: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """The report both protocols share: fold accuracies (mean, population std), thresholds, and the ROC,
    EER, AUC and TAR@FAR of ``scores`` (higher = more alike); ``extra`` keys follow ``tar_at_far``."""
    fpr, tpr, _ = roc_curve(scores, issame)
    report: Dict[str, object] = {
        "fold_accuracies": [float(a) for a in accs],
        "mean_accuracy": float(np.mean(accs)),
        "std_accuracy": float(np.std(accs)),
        "fold_thresholds": [float(t) for t in fold_thresholds],
        "threshold": float(np.mean(fold_thresholds)),
        "eer": eer(fpr, tpr),
        "auc": auc(fpr, tpr),
        "tar_at_far": {far_key(f): tar_at_far(scores[issame], scores[~issame], f)["tar"] for f in fars},
        **(extra or {}),
        "num_pairs": int(issame.size),
        "num_positive": int(issame.sum()),
        "num_folds": num_folds,
        "mean_sub": mean_sub,
    }
    if roc_points:
        report["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return report


def oracle_accuracy(scores, issame) -> Dict[str, float]:
    """The best accuracy of any threshold chosen on these same pairs (decision ``score >= t``).

    This is what OpenSphere reports as ACC (``max(tpr * P + tnr * N) / (P + N)`` over its ROC): the
    threshold is fitted to the test pairs themselves, so it is optimistic and is NOT a k-fold
    accuracy. Returns ``accuracy`` and ``threshold`` (the lowest score of the accepted pairs; ``inf``
    when rejecting everything is best).
    """
    scores, issame = scores_and_labels(scores, issame)
    n_neg = int((~issame).sum())
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], issame[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # accept everything down to each distinct score
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    correct = np.r_[n_neg, tps + (n_neg - fps)]
    thr = np.r_[np.inf, s[last_of_run]]
    best = int(np.argmax(correct))
    return {"accuracy": float(correct[best]) / scores.size, "threshold": float(thr[best])}
