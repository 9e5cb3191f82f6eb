"""LFW View 2 (and any pairs list) from features, under a named protocol (:mod:`eval.protocols`).

``parse_pairs`` reads ``pairs.txt``; ``evaluate_features`` looks up the feature of both images of
every pair by relative path and runs the protocol's report: ``sphereface`` (the default here,
:func:`eval.verification_metrics.verification_report`: per-fold mean subtraction, L2 normalisation, cosine, strict
thresholds on the 1e-4 grid, mean of tied best thresholds; docs/theory.md#lfw-protocol) or
``insightface`` (docs/theory.md#protocol-insightface). The same function scores generic pairs files,
packs and folder pairs: only the fold indices of the pairs differ.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from eval.verification_metrics import DEFAULT_FARS
from eval.pairs import Pair, describe_missing, parse_lfw_pairs
from sphereface_plus.errors import InputFileError

logger = logging.getLogger(__name__)


def parse_pairs(pairs_path, ext: str = ".jpg"):
    """The 6,000 LFW pairs of ``pairs.txt`` as :class:`eval.pairs.Pair` with fold indices 0..9."""
    return parse_lfw_pairs(pairs_path, ext=ext)


def pair_features(paths: Sequence[str], features, pairs: Sequence[Pair], source: str = "the features file"):
    """``(feat1, feat2, issame, folds)`` for ``pairs``; every pair image must be among ``paths``."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != len(paths):
        raise InputFileError(f"features must be N x D with N = {len(paths)} paths, got {features.shape}")
    index = {p: i for i, p in enumerate(paths)}
    if len(index) != len(paths):
        logger.warning("%d duplicate paths in %s; the last feature of each is used", len(paths) - len(index), source)
    needed = list(dict.fromkeys([p.path1 for p in pairs] + [p.path2 for p in pairs]))
    missing = [p for p in needed if p not in index]
    if missing:
        raise InputFileError(describe_missing(missing, len(needed), f"from {source}",
                                        "Paths must be relative like Name/Name_0001.jpg, as in the pairs"))
    i1 = np.fromiter((index[p.path1] for p in pairs), dtype=np.int64, count=len(pairs))
    i2 = np.fromiter((index[p.path2] for p in pairs), dtype=np.int64, count=len(pairs))
    issame = np.fromiter((p.same for p in pairs), dtype=bool, count=len(pairs))
    folds = np.fromiter((p.fold for p in pairs), dtype=np.int64, count=len(pairs))
    return features[i1], features[i2], issame, folds


def evaluate_features(
    paths: Sequence[str],
    features,
    pairs: Sequence[Pair],
    mean_sub: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
    source: str = "the features file",
    protocol: str = "sphereface",
    flip_halves: bool = False,
) -> Dict[str, object]:
    """The verification report (``protocol``, ``fold_accuracies``, ``mean_accuracy``, ``std_accuracy``,
    ``eer``, ``auc``, ``tar_at_far``, ``threshold``, ``roc``, ``oracle_accuracy``...) of ``features``
    (rows named by ``paths``) under ``protocol`` (:mod:`eval.protocols`; ``flip_halves``: the rows are
    ``[f(crop), f(mirror)]``, which the insightface protocol sums)."""
    from eval.protocols import protocol_report

    f1, f2, issame, folds = pair_features(paths, features, pairs, source)
    return protocol_report(protocol, f1, f2, issame, folds, flip_halves=flip_halves, mean_sub=mean_sub, fars=fars)


def verify_on_pairs(model, root, pairs: Sequence[Pair], batch_size: int = 64, device="cpu",
                    num_workers: int = 0, precision: str = "fp32",
                    channels_last: Optional[bool] = None) -> Dict[str, object]:
    """Verify ``model`` (a backbone) on ``pairs`` of aligned crops under ``root`` and pick the compare threshold.

    Returns the protocol's report (:func:`evaluate_features`, crop + mirror features, per-fold mean
    subtraction) plus ``accuracy_without_mean_sub`` and ``compare_threshold``: ``sphereface-plus
    compare`` scores one pair by plain cosine, with no set to take a mean over, so the threshold stored
    with a model is the one chosen on plain-cosine scores. Used by the train runner (its verifier), the
    demo and the LFW bench.
    """
    from eval.features import extract_features

    paths = sorted({p for pair in pairs for p in (pair.path1, pair.path2)})
    was_training = model.training
    model.eval()
    try:
        feats = extract_features(model, root, paths, batch_size=batch_size, flip=True, device=device,
                                 num_workers=num_workers, precision=precision, channels_last=channels_last)
    finally:
        model.train(was_training)
    report = evaluate_features(paths, feats, pairs, mean_sub=True)
    plain = evaluate_features(paths, feats, pairs, mean_sub=False)
    report["accuracy_without_mean_sub"] = plain["mean_accuracy"]
    report["compare_threshold"] = float(plain["threshold"])
    return report


def pairs_verifier(pairs_path, root, batch_size: int = 64, num_workers: int = 0):
    """A verifier for :class:`sphereface_plus.trainer.Trainer`: ``verifier(backbone, device, precision=,
    channels_last=) -> report``; the trainer passes its own precision and memory format (a backbone
    trained in NHWC is embedded in NHWC, one trained in NCHW is not converted mid-run)."""
    pairs = parse_pairs(pairs_path)

    def verifier(model, device, precision: str = "fp32", channels_last: bool = False) -> Dict[str, object]:
        return verify_on_pairs(model, root, pairs, batch_size=batch_size, device=device, num_workers=num_workers,
                               precision=precision, channels_last=channels_last)

    return verifier


def lfw_people_split(pairs, image_counts: Dict[str, int], test_fold: int, min_images: int) -> Tuple[List[str], List[str]]:
    """(training people, test people) for a fold split of LFW View 2.

    Test people: everyone named in the pairs of ``test_fold`` (0-based). Training people: those named in
    the pairs of the other nine folds with at least ``min_images`` images. The View-2 folds are
    person-disjoint, so no test person is trained on (checked here all the same).
    """
    def people(fold_pred):
        return {p.split("/", 1)[0] for q in pairs if fold_pred(q.fold) for p in (q.path1, q.path2)}

    test_people = people(lambda f: f == test_fold)
    other = people(lambda f: f != test_fold)
    train = sorted(n for n in other - test_people if image_counts.get(n, 0) >= min_images)
    return train, sorted(test_people)
