"""eval.verification_metrics against independent references: per-threshold loops, a hand-worked case, sklearn."""
from __future__ import annotations

import math

import numpy as np
import pytest

from eval import verification_metrics as metrics


def _loop_best_threshold(scores, issame):
    """getThreshold of evaluation.m, literally: one Python iteration per threshold."""
    thresholds = [k / 10000.0 for k in range(-10000, 10001)]
    pos = scores[issame].tolist()
    neg = scores[~issame].tolist()
    accs = []
    for t in thresholds:
        accs.append(sum(s > t for s in pos) + sum(s < t for s in neg))
    best = max(accs)
    chosen = [t for t, a in zip(thresholds, accs) if a == best]
    return sum(chosen) / len(chosen)


def _brute_fold_accuracies(f1, f2, issame, folds, mean_sub):
    """Reference protocol: explicit means, a threshold x pair comparison matrix, no sorting."""
    thr = np.array([k / 10000.0 for k in range(-10000, 10001)])
    accs, thrs = [], []
    for k in sorted(set(folds.tolist())):
        test, train = folds == k, folds != k
        if mean_sub:
            mu = np.concatenate([f1[train], f2[train]]).mean(axis=0)
        else:
            mu = np.zeros(f1.shape[1])
        a = f1 - mu
        b = f2 - mu
        s = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
        st, yt = s[train], issame[train]
        correct = (st[None, :] > thr[:, None])[:, yt].sum(1) + (st[None, :] < thr[:, None])[:, ~yt].sum(1)
        t = thr[correct == correct.max()].mean()
        acc = ((s[test][issame[test]] > t).sum() + (s[test][~issame[test]] < t).sum()) / test.sum()
        accs.append(acc)
        thrs.append(t)
    return np.array(accs), np.array(thrs)


def _random_pairs(rng, n_folds, n_per_class, dim):
    n = n_folds * 2 * n_per_class
    base = rng.normal(size=(n, dim))
    issame = np.tile(np.r_[np.ones(n_per_class, bool), np.zeros(n_per_class, bool)], n_folds)
    other = rng.normal(size=(n, dim))
    f2 = np.where(issame[:, None], base + 0.9 * other, other) + 0.3  # offset: mean subtraction matters
    f1 = base + 0.3
    folds = np.repeat(np.arange(n_folds), 2 * n_per_class)
    return f1, f2, issame, folds


@pytest.mark.parametrize("mean_sub", [True, False])
def test_fold_accuracies_match_brute_force(mean_sub):
    rng = np.random.default_rng(0)
    f1, f2, issame, folds = _random_pairs(rng, 10, 30, 16)
    ref_acc, ref_thr = _brute_fold_accuracies(f1, f2, issame, folds, mean_sub)
    _, scores = metrics.fold_scores(f1, f2, folds, mean_sub=mean_sub)
    kf = metrics.kfold_accuracy(scores, issame, folds)
    np.testing.assert_array_equal(kf["fold_accuracies"], ref_acc)
    np.testing.assert_allclose(kf["fold_thresholds"], ref_thr, rtol=0, atol=1e-12)
    # the data is informative but not trivially separable
    assert 0.6 < ref_acc.mean() < 0.99


def test_ties_on_the_threshold_grid_match_python_loop():
    # scores on a 1e-3 grid fall exactly on thresholds: strictness and tie handling both matter
    rng = np.random.default_rng(1)
    n = 3 * 16
    issame = rng.random(n) < 0.5
    scores = np.round(np.where(issame, rng.normal(0.3, 0.2, n), rng.normal(0.0, 0.2, n)), 2)
    folds = np.repeat(np.arange(3), 16)
    kf = metrics.kfold_accuracy(scores, issame, folds)
    for f in range(3):
        train, test = folds != f, folds == f
        t = _loop_best_threshold(scores[train], issame[train])
        assert kf["fold_thresholds"][f] == pytest.approx(t, abs=1e-12)
        ref = (sum(s > t for s in scores[test][issame[test]]) + sum(s < t for s in scores[test][~issame[test]])) / 16
        assert kf["fold_accuracies"][f] == ref


def test_hand_worked_two_folds():
    # fold 0: positives 0.5, 0.3; negatives 0.1, 0.3.  fold 1: positives 0.6, 0.2; negatives -0.2, 0.4.
    scores = np.array([0.5, 0.3, 0.1, 0.3, 0.6, 0.2, -0.2, 0.4])
    issame = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    kf = metrics.kfold_accuracy(scores, issame, folds)
    # threshold for fold 0 from fold 1: 3/4 correct on (-0.2, 0.2) (3,999 grid points, mean 0) and on
    # (0.4, 0.6) (1,999 points, mean 0.5); mean of all 5,998 = 999.5 / 5998.
    assert kf["fold_thresholds"][0] == pytest.approx(999.5 / 5998, abs=1e-12)
    # threshold for fold 1 from fold 0: (0.1, 0.3) and (0.3, 0.5), 1,999 points each: mean 0.3.
    # 0.3 itself scores only 2/4 because both the positive and the negative at 0.3 are errors.
    assert kf["fold_thresholds"][1] == pytest.approx(0.3, abs=1e-12)
    # fold 0 at 0.1666: positives 0.5, 0.3 right; negative 0.1 right, 0.3 wrong -> 3/4
    # fold 1 at 0.3: positive 0.6 right, 0.2 wrong; negative -0.2 right, 0.4 wrong -> 2/4
    np.testing.assert_array_equal(kf["fold_accuracies"], [0.75, 0.5])
    assert metrics.threshold_correct_counts(scores[:4], issame[:4], np.array([0.3, 0.2]))[0] == 2


def test_roc_auc_eer_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    n = 4000
    y = rng.random(n) < 0.4
    s = np.round(np.where(y, rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)), 2)  # with ties
    fpr, tpr, thr = metrics.roc_curve(s, y)
    rf, rt, rth = sk.roc_curve(y, s)
    np.testing.assert_allclose(fpr, rf, atol=1e-15)
    np.testing.assert_allclose(tpr, rt, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], rth[1:])
    assert metrics.auc(fpr, tpr) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    e = metrics.eer(fpr, tpr)
    # the EER lies between the FPRs of the two sklearn ROC points where 1 - tpr crosses fpr
    fnr = 1 - rt
    i = np.flatnonzero(fnr <= rf)[0]
    assert rf[i - 1] <= e <= rf[i]
    assert min(max(a, b) for a, b in zip(rf, fnr)) >= e - 1e-12


def test_eer_gaussian_closed_form():
    # genuine ~ N(d, 1), impostor ~ N(0, 1): EER = Phi(-d / 2)
    rng = np.random.default_rng(3)
    n, d = 200_000, 2.0
    s = np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)]
    y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    fpr, tpr, _ = metrics.roc_curve(s, y)
    expected = 0.5 * math.erfc(d / 2 / math.sqrt(2))
    assert metrics.eer(fpr, tpr) == pytest.approx(expected, abs=3e-3)
    assert metrics.auc(fpr, tpr) == pytest.approx(0.5 * math.erfc(-d / 2), abs=3e-3)  # Phi(d / sqrt 2)


@pytest.mark.parametrize("far", [0.0, 1e-3, 0.01, 0.05, 0.5, 1.0])
def test_tar_at_far_brute_force(far):
    rng = np.random.default_rng(4)
    gen = np.round(rng.normal(0.6, 0.2, 500), 2)
    imp = np.round(rng.normal(0.1, 0.2, 2000), 2)
    best = 0.0
    for t in np.r_[-np.inf, np.unique(np.r_[gen, imp])]:
        if (imp > t).mean() <= far:
            best = max(best, (gen > t).mean())
    r = metrics.tar_at_far(gen, imp, far)
    assert r["tar"] == best
    assert r["far"] <= far
    # the same from only the needed top impostor scores
    k = metrics.allowed_false_accepts(far, imp.size)
    top = np.sort(imp)[::-1][: k + 1]
    assert metrics.tar_from_top_impostors(gen, top, imp.size, far)["tar"] == best


def test_allowed_false_accepts_rounding():
    assert metrics.allowed_false_accepts(1e-6, 1_000_000) == 1
    assert metrics.allowed_false_accepts(1e-4, 3000) == 0
    assert metrics.allowed_false_accepts(1e-3, 3000) == 3
    assert metrics.far_key(1e-2) == "1e-2" and metrics.far_key(1e-6) == "1e-6"


def test_report_keys_and_separable_case():
    rng = np.random.default_rng(5)
    f1, f2, issame, folds = _random_pairs(rng, 10, 20, 8)
    f2 = np.where(issame[:, None], f1 + 1e-3 * f2, f2)  # positives almost identical: perfect separation
    r = metrics.verification_report(f1, f2, issame, folds)
    assert r["fold_accuracies"] == [1.0] * 10
    assert r["mean_accuracy"] == 1.0 and r["std_accuracy"] == 0.0
    assert r["eer"] == 0.0 and r["auc"] == 1.0
    assert set(r["tar_at_far"]) == {"1e-2", "1e-3", "1e-4"}
    assert r["tar_at_far"]["1e-4"] == 1.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="NaN"):
        metrics.best_threshold(np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="different lengths"):
        metrics.threshold_correct_counts(np.zeros(3), np.zeros(2, bool))


def test_fold_scores_precise_with_a_large_common_offset():
    # features dominated by a shared component (an untrained or collapsed net): the fold-mean
    # expansion must still give the scores of centring each fold explicitly
    rng = np.random.default_rng(6)
    n, dim = 200, 32
    offset = 100.0 * rng.normal(size=dim)
    f1 = offset + rng.normal(size=(n, dim))
    f2 = offset + rng.normal(size=(n, dim))
    folds = np.arange(n) % 4
    fold_ids, got = metrics.fold_scores(f1, f2, folds)
    for f, k in enumerate(fold_ids):
        mu = np.concatenate([f1[folds != k], f2[folds != k]]).mean(0)
        a, b = f1 - mu, f2 - mu
        ref = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        np.testing.assert_allclose(got[f], ref, rtol=0, atol=1e-12)
