"""IJB-B / IJB-C 1:N identification (``verify ijb --task 1:N|both``, docs/theory.md#ijb-1n), as insightface's
``ijb_evals.py`` / ``ijb_1n.py`` evaluate it, on the template features of :mod:`eval.ijb`.

Every probe template searches each gallery separately (G1 and G2, IJB-B's S1 and S2, are reported apart,
never merged): CMC rank-1/5/10 over the mated searches, and TPIR at FPIR 1e-2 / 1e-1 with the threshold set
on the best scores of the non-mated searches (the probes whose subject is in the other gallery).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from eval.ijb import IJB_GALLERIES, IJBMeta, meta_template_features, read_template_subjects
from sphereface_plus.errors import InputFileError

logger = logging.getLogger(__name__)

__all__ = ["IJB_FPIRS", "IJB_RANKS", "identification_report", "evaluate_ijb_1n",
           "format_identification"]

IJB_FPIRS = (1e-2, 1e-1)  # 1:N: TPIR at these FPIRs (insightface's table)
IJB_RANKS = (1, 5, 10)  # 1:N: CMC at these ranks
PROBE_BLOCK = 4096  # probe templates searched per block


def identification_report(probe_feats, probe_subjects, gallery_feats, gallery_subjects,
                          fpirs: Sequence[float] = IJB_FPIRS, ranks: Sequence[int] = IJB_RANKS,
                          block: int = PROBE_BLOCK) -> Dict[str, object]:
    """Open-set 1:N search of every probe template in ONE gallery (docs/theory.md#ijb-1n).

    Scores are cosines of L2-normalised template features. A probe whose subject has a template in
    the gallery is a mated search, the others are non-mated. For a mated search the rank of its mate
    is ``1 + #(other gallery templates scoring >= the mate)`` (a tie counts against the mate, so rank 1
    means the mate scores strictly above every other template, insightface's ``pos > neg.max()``);
    ``rank[k]`` is the fraction of mated searches with rank <= k (the CMC). TPIR at FPIR ``f``
    (insightface's ``evaluation_1N``): the non-mated searches' best scores sorted in decreasing
    order, the threshold is the ``max(int(n * f), 1)``-th of them, and TPIR is the fraction of mated
    searches at rank 1 whose mate scores strictly above it; ``fpir_reached`` is the fraction of
    non-mated searches whose best score lies strictly above it.
    """
    from eval.vector_index import inner_products
    from eval.verification_metrics import far_key

    pf = np.asarray(probe_feats, dtype=np.float64)
    gf = np.asarray(gallery_feats, dtype=np.float64)
    ps = np.asarray(probe_subjects, dtype=np.int64)
    gs = np.asarray(gallery_subjects, dtype=np.int64)
    order = np.argsort(gs, kind="mergesort")
    sorted_gs = gs[order]
    dup = np.flatnonzero(sorted_gs[1:] == sorted_gs[:-1])
    if dup.size:
        raise InputFileError(f"the gallery holds {dup.size + 1} or more templates of subject {int(sorted_gs[dup[0]])}; "
                             f"a 1:N gallery holds one template per subject")
    pos = np.searchsorted(sorted_gs, ps)
    pos_clipped = np.minimum(pos, gs.size - 1)
    mate = np.where(sorted_gs[pos_clipped] == ps, order[pos_clipped], -1)
    mated = mate >= 0
    mate_score = np.full(ps.size, np.nan)
    rank = np.zeros(ps.size, dtype=np.int64)
    top = np.full(ps.size, np.nan)
    for a in range(0, ps.size, block):
        sim = inner_products(pf[a:a + block], gf)  # exact: the kernel of eval.vector_index's exact index
        m = mate[a:a + block]
        rows = np.flatnonzero(m >= 0)
        ms = sim[rows, m[rows]]
        mate_score[a + rows] = ms
        rank[a + rows] = (sim[rows] >= ms[:, None]).sum(1)  # the mate itself included: rank >= 1
        top[a:a + block] = sim.max(1)
    n_mated, n_non = int(mated.sum()), int((~mated).sum())
    report: Dict[str, object] = {"num_probes": int(ps.size), "num_mated": n_mated, "num_nonmated": n_non,
                                 "num_gallery_templates": int(gs.size)}
    r = rank[mated]
    report["rank"] = {str(k): (float(np.mean(r <= k)) if n_mated else None) for k in ranks}
    tpir, thresholds, reached = {}, {}, {}
    non_top = np.sort(top[~mated])[::-1]
    for f in fpirs:
        key = far_key(f)
        if n_non == 0 or n_mated == 0:
            tpir[key] = thresholds[key] = reached[key] = None
            continue
        t = float(non_top[max(int(n_non * f) - 1, 0)])
        thresholds[key] = t
        tpir[key] = float(np.mean((r == 1) & (mate_score[mated] > t)))
        reached[key] = float(np.mean(non_top > t))
    if n_non == 0:
        logger.warning("no non-mated search in this gallery: TPIR at FPIR is undefined")
    report.update({"tpir_at_fpir": tpir, "threshold_at_fpir": thresholds, "fpir_reached": reached})
    return report


def evaluate_ijb_1n(meta: IJBMeta, names: Sequence[str], features: np.ndarray, dataset: str,
                    detector_score: bool = False, normalize_faces: bool = False,
                    fpirs: Sequence[float] = IJB_FPIRS, ranks: Sequence[int] = IJB_RANKS,
                    source: str = "the features") -> Dict[str, object]:
    """1:N identification of the mixed probe templates in each gallery, scored and reported separately
    (``galleries``: ``{"G1": report, "G2": report}``, ``S1`` / ``S2`` for IJB-B; never merged)."""
    tids, tfeats = meta_template_features(meta, names, features, detector_score, normalize_faces, source)

    def lookup(path: Path):
        t, sub = read_template_subjects(path)
        i = np.minimum(np.searchsorted(tids, t), tids.size - 1)
        bad = tids[i] != t
        if bad.any():
            raise InputFileError(f"{path}: {int(bad.sum())} template(s) (first {int(t[bad][0])}) have no face in "
                                 f"{meta.files['tid_mid'].name}; use the meta files of one release")
        return tfeats[i], sub

    probe_feats, probe_subjects = lookup(meta.files["probes"])
    galleries = {}
    for g in IJB_GALLERIES[dataset]:
        gallery_feats, gallery_subjects = lookup(meta.files[f"gallery_{g}"])
        galleries[g] = identification_report(probe_feats, probe_subjects, gallery_feats, gallery_subjects, fpirs, ranks)
    return {"galleries": galleries, "fpirs": [float(f) for f in fpirs], "ranks": [int(k) for k in ranks],
            "detector_score": bool(detector_score), "normalize_faces": bool(normalize_faces)}


def format_identification(report: Dict[str, object], dataset: str = "IJB") -> str:
    """One line per gallery: searches, TPIR at each FPIR, rank-1/5/10 (percent)."""
    ident = report["identification"]
    galleries = ident["galleries"]
    first = next(iter(galleries.values()))
    fk, rk = list(first["tpir_at_fpir"]), list(first["rank"])
    pct = lambda v: f"{100 * v:9.2f}" if v is not None else f"{'-':>9}"  # noqa: E731
    lines = [f"{dataset} 1:N identification (galleries scored separately, probes: mixed)",
             "gallery  mated/non-mated  " + "".join(f"{'TPIR@' + k:>12}" for k in fk)
             + "".join(f"{'rank-' + k:>9}" for k in rk)]
    for g, rep in galleries.items():
        lines.append(f"{g:<8} {rep['num_mated']:>6}/{rep['num_nonmated']:<8} "
                     + "".join(f"{pct(rep['tpir_at_fpir'][k]):>12}" for k in fk)
                     + "".join(pct(rep["rank"][k]) for k in rk))
    return "\n".join(lines)
