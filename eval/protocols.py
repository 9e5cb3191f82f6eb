"""The verification protocols: the one list of their names, their defaults, and the report of each.

Two protocols score the same pair features, and their numbers are not interchangeable (on the same
features of the 6,000 LFW pairs they differ by tenths of a point):

``sphereface``
    The SphereFace release's ``evaluation.m`` (docs/theory.md#lfw-protocol): the feature of
    an image is its crop's and its mirror's embeddings concatenated; each fold's features are centred
    on the mean of the other folds, L2-normalised and compared by cosine; the threshold is the mean of
    all best thresholds of the 1e-4 grid on [-1, 1] (strict inequalities) on the other folds. The
    numbers of the SphereFace / SphereFace+ papers (LFW pairs.txt, 10 person-disjoint folds) and of
    this toolkit before protocols were named. Default for ``verify lfw|pairs|folder``.
``insightface``
    insightface's ``eval/verification.py`` (docs/theory.md#protocol-insightface): crop + mirror
    embeddings summed, then L2-normalised; squared L2 distance; thresholds 0, 0.01, ..., 3.99; the
    FIRST best threshold on the other folds; 10 contiguous folds; accuracy mean and population std
    over folds; VAL@FAR=1e-3. The protocol of the numbers papers report on the ``.bin`` packs (LFW,
    CFP-FP, AgeDB-30, CALFW, CPLFW...: ArcFace, CosFace tables, insightface's model zoo, training
    logs of arcface_torch). Default for ``verify bin|packs`` and training validation on packs.

Every report names its protocol (``report["protocol"]``) and carries the oracle-threshold accuracy
(``oracle_accuracy``: the threshold picked on the test pairs themselves, what OpenSphere reports),
labelled as such wherever it is printed, never as the k-fold accuracy.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from eval.verification_metrics import (DEFAULT_FARS, fold_scores, insightface_embeddings, insightface_kfold,
                                       insightface_report, kfold_accuracy, oracle_accuracy, squared_distances,
                                       verification_report)
from sphereface_plus.errors import UsageError

#: the protocol names (the one list: ``verify --protocol``, reports, docs)
PROTOCOLS = ("sphereface", "insightface")

#: the default protocol of each pairs source of ``verify`` (and of training validation on packs)
DEFAULT_PROTOCOL = {"lfw": "sphereface", "pairs": "sphereface", "folder": "sphereface", "bin": "insightface",
                    "packs": "insightface"}

#: what each protocol's numbers can be put next to (printed under the tables, docs/verification.md)
COMPARABLE_TO = {
    "sphereface": "SphereFace / SphereFace+ papers (evaluation.m: mean-subtracted cosine, concatenated crop+mirror)",
    "insightface": "insightface / ArcFace / CosFace tables on the .bin packs (verification.py: flip-summed, "
                   "squared L2, first best threshold)",
}

#: how the oracle-threshold accuracy is labelled wherever it is shown
ORACLE_LABEL = ("oracle-threshold accuracy (threshold picked on these test pairs themselves, as OpenSphere "
                "reports it; optimistic, not a k-fold accuracy)")


def resolve_protocol(name: Optional[str], source: str) -> str:
    """``name`` checked against :data:`PROTOCOLS`, or the default of ``source`` when None."""
    if name is None:
        return DEFAULT_PROTOCOL.get(source, "sphereface")
    if name not in PROTOCOLS:
        raise UsageError(f"--protocol {name!r} is not a protocol; choose one of {', '.join(PROTOCOLS)}")
    return name


def protocol_report(protocol: str, feat1, feat2, issame, folds, *, flip_halves: bool = False, mean_sub: bool = True,
                    fars: Sequence[float] = DEFAULT_FARS, roc_points: bool = True) -> Dict[str, object]:
    """The report of ``protocol`` on paired features (rows of ``feat1`` / ``feat2`` are the two images).

    ``flip_halves``: the rows hold ``[f(crop), f(mirror)]`` side by side (``eval.features``' layout);
    the insightface protocol sums the halves, the sphereface protocol uses the concatenation as it is.
    ``mean_sub`` belongs to the sphereface protocol (the insightface one subtracts nothing). Adds ``protocol``, ``oracle_accuracy`` and
    ``oracle_threshold`` (in the protocol's own unit: cosine, or squared distance) to the report.
    """
    issame = np.asarray(issame).astype(bool).ravel()
    if protocol == "sphereface":
        report = verification_report(feat1, feat2, issame, folds, mean_sub=mean_sub, fars=fars, roc_points=roc_points)
        # on the scores each pair was tested with (its fold's mean subtracted), those of the ROC
        _, scores = fold_scores(feat1, feat2, folds, mean_sub=mean_sub)
        oracle = oracle_accuracy(kfold_accuracy(scores, issame, folds)["test_scores"], issame)
        oracle_threshold = oracle["threshold"]
    elif protocol == "insightface":
        e1 = insightface_embeddings(feat1, flip_halves)
        e2 = insightface_embeddings(feat2, flip_halves)
        report = insightface_report(e1, e2, issame, folds, fars=fars, roc_points=roc_points)
        oracle = oracle_accuracy(-squared_distances(e1, e2), issame)
        oracle_threshold = -oracle["threshold"]  # accepted: distance <= this
    else:
        raise UsageError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return {"protocol": protocol, **report, "oracle_accuracy": oracle["accuracy"],
            "oracle_threshold": float(oracle_threshold)}


def pair_outcomes(protocol: str, feat1, feat2, issame, folds, *, flip_halves: bool = False,
                  mean_sub: bool = True) -> Dict[str, np.ndarray]:
    """How every pair fared when its fold was tested (docs/theory.md#hardest-errors): ``score`` (the
    protocol's own: the cosine each pair was tested with, or the squared distance), ``threshold`` (its
    fold's, chosen on the other folds), ``error`` (the protocol called it wrongly: a same pair not
    accepted, a different pair accepted, with the protocol's strict or non-strict inequality) and
    ``wrongness`` (how far the score lies on the wrong side of the threshold, in the score's unit:
    positive for errors, so sorting it ranks the hardest errors first)."""
    issame = np.asarray(issame).astype(bool).ravel()
    folds = np.asarray(folds).ravel()
    if protocol == "sphereface":
        _, scores = fold_scores(feat1, feat2, folds, mean_sub=mean_sub)
        kf = kfold_accuracy(scores, issame, folds)
        score = kf["test_scores"]
    elif protocol == "insightface":
        score = squared_distances(insightface_embeddings(feat1, flip_halves), insightface_embeddings(feat2, flip_halves))
        kf = insightface_kfold(score, issame, folds)
    else:
        raise UsageError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    threshold = np.asarray(kf["fold_thresholds"], dtype=np.float64)[np.searchsorted(kf["fold_ids"], folds)]
    if protocol == "sphereface":  # same when score > t (evaluation.m); both inequalities strict
        accept = score > threshold
        reject = score < threshold
        wrongness = np.where(issame, threshold - score, score - threshold)
    else:  # same when distance < t, different when distance >= t (verification.py)
        accept = score < threshold
        reject = ~accept
        wrongness = np.where(issame, score - threshold, threshold - score)
    error = np.where(issame, ~accept, ~reject)
    return {"score": score, "threshold": threshold, "error": error, "wrongness": wrongness, "issame": issame,
            "fold": folds}
