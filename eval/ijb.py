"""IJB-B / IJB-C 1:1 template verification and 1:N identification (``sphereface-plus verify ijb``), as
insightface evaluates them.

The facts follow insightface's ``recognition/_evaluation_/ijb/ijb_11.py`` (and ``ijb_onnx.py``) for
1:1 and ``ijb_evals.py`` / ``ijb_1n.py`` for 1:N; the code is this toolkit's own. The official layout
under ``--root``::

    meta/<ds>_face_tid_mid.txt          image_name template_id media_id        (one line per face)
    meta/<ds>_template_pair_label.txt   template_id_1 template_id_2 label      (1 = same subject)
    meta/<ds>_name_5pts_score.txt       image_name x1 y1 ... x5 y5 detector_score
    meta/<ds>_1N_gallery_G1.csv, _G2.csv (IJB-B: _S1, _S2), <ds>_1N_probe_mixed.csv
                                        header, then TEMPLATE_ID,SUBJECT_ID,... per face   (1:N only)
    loose_crop/<image_name>

with ``<ds>`` = ``ijbc`` or ``ijbb``. The pipeline:

1. every face is aligned with its 5 points to the model's template (``data_prep.align_face``; the
   landmarks are 0-based pixel coordinates) and embedded with its mirror; the face feature is the
   *sum* ``f(crop) + f(mirror)`` (insightface's flip mode F2), not normalised: its norm acts as a
   quality weight (mode N1). ``normalize_faces`` L2-normalises each face first (mode N0);
2. optionally (``detector_score``, mode D1) each face feature is multiplied by its detector score;
3. media pooling: the faces of one media (one video, or one still) inside a template are averaged;
4. template pooling: the media features of a template are summed, then L2-normalised (a zero sum
   stays zero, like ``sklearn.preprocessing.normalize``);
5. the score of a template pair is the cosine (dot product) of the two template features;
6. the ROC is sklearn's ``roc_curve`` (decision ``score >= t``, collinear points dropped), and
   TAR@FAR takes, for each FAR in 1e-6 .. 1e-1, the ROC point whose FPR is *nearest* to it, the
   highest TPR among equally near points (insightface flips the arrays and takes the first minimum
   of ``|fpr - far|``). That point's FPR can lie slightly above the target, so the report also
   gives ``tar_at_far_bounded``: the best TAR with FAR <= target (``eval.verification_metrics.tar_at_far``).

1:N (``--task 1:N|both``, docs/theory.md#ijb-1n, :mod:`eval.ijb_1n`): the same template features; every probe template
searches each gallery separately (G1 and G2 are reported apart, never merged): CMC rank-1/5/10 over
the mated searches, and TPIR at FPIR 1e-2 / 1e-1 with the threshold set on the best scores of the
non-mated searches (the probes whose subject is in the other gallery), as ``ijb_evals.py`` does.

Faces are joined to the meta files by image name (insightface joins by line order; the official
files list the same names in the same order, so the two agree), which lets a features file hold
its rows in any order. Everything after the embedding is vectorised numpy in float64.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sphereface_plus.errors import InputFileError, MissingFileError, UsageError

logger = logging.getLogger(__name__)

IJB_DATASETS = ("IJBC", "IJBB")
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_TASKS = ("1:1", "1:N", "both")  # verify ijb --task
#: the 1:N galleries of each release (the file name's last part, used as the report's key) and the probe set
IJB_GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
PAIR_BLOCK = 100_000  # template pairs scored per block
FACE_CHUNK = 65_536  # faces pooled per chunk (bounded float64 memory)
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # the ids are held as int64


# --------------------------------------------------------------------------- meta files


def meta_files(root, dataset: str) -> Dict[str, Path]:
    """The three meta files and the image folder of ``dataset`` under ``root`` (official names)."""
    if dataset not in IJB_DATASETS:
        raise UsageError(f"--dataset {dataset!r} is not one of {', '.join(IJB_DATASETS)}")
    root, ds = Path(root), dataset.lower()
    return {
        "tid_mid": root / "meta" / f"{ds}_face_tid_mid.txt",
        "pairs": root / "meta" / f"{ds}_template_pair_label.txt",
        "landmarks": root / "meta" / f"{ds}_name_5pts_score.txt",
        "images": root / "loose_crop",
        "probes": root / "meta" / f"{ds}_1N_probe_mixed.csv",
        **{f"gallery_{g}": root / "meta" / f"{ds}_1N_gallery_{g}.csv" for g in IJB_GALLERIES[dataset]},
    }


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise MissingFileError(f"{path} does not exist ({what}); --root must be the IJB folder holding meta/ and "
                               f"loose_crop/ as distributed (and --dataset must match the file names)")


def _bad_line(path, line_no: int, line: str, problem: str, fix: str) -> InputFileError:
    text = line.strip()
    shown = repr(text if len(text) <= 120 else text[:120] + "...")  # a damaged line can be megabytes long
    return InputFileError(f"{path}:{line_no}: {problem}: {shown}; {fix}")


def _ids(fields: Sequence[str], path: Path, line_no: int, line: str, what: str, fix: str) -> List[int]:
    """``fields`` as integers that fit the int64 arrays they go into; one error line naming the line otherwise."""
    try:
        values = [int(v) for v in fields]
    except ValueError:
        raise _bad_line(path, line_no, line, f"{what} must be integers", fix) from None
    if any(not _INT64_MIN <= v <= _INT64_MAX for v in values):
        raise _bad_line(path, line_no, line, f"{what} must fit a 64-bit integer", fix)
    return values


def _data_lines(path: Path):
    """``(line number, text, fields)`` of every non-blank line."""
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            fields = line.split()
            if fields:
                yield line_no, line, fields


def read_face_tid_mid(path) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``(image names, template ids, media ids)``, one entry per line of ``<ds>_face_tid_mid.txt``."""
    path = Path(path)
    _require(path, "the face -> template, media list")
    fix = "each line must be 'image_name template_id media_id' (integer ids), as in the official meta files"
    names, tids, mids = [], [], []
    for line_no, line, f in _data_lines(path):
        if len(f) != 3:
            raise _bad_line(path, line_no, line, f"expected 3 fields, got {len(f)}", fix)
        tid, mid = _ids(f[1:], path, line_no, line, "template and media ids", fix)
        tids.append(tid)
        mids.append(mid)
        names.append(f[0])
    if not names:
        raise InputFileError(f"{path} lists no faces; {fix}")
    return names, np.asarray(tids, dtype=np.int64), np.asarray(mids, dtype=np.int64)


def _scan_pairs(path: Path) -> None:
    """Raise the one-line error of the first malformed line of a pairs file (the slow, exact path)."""
    fix = "each line must be 'template_id_1 template_id_2 label' with integer ids and label 0 or 1"
    for line_no, line, f in _data_lines(path):
        if len(f) != 3:
            raise _bad_line(path, line_no, line, f"expected 3 fields, got {len(f)}", fix)
        values = _ids(f, path, line_no, line, "fields", fix)
        if values[2] not in (0, 1):
            raise _bad_line(path, line_no, line, f"label must be 0 or 1, got {values[2]}", fix)


def _nth_data_line(path: Path, index: int) -> Tuple[int, str]:
    for i, (line_no, line, _) in enumerate(_data_lines(path)):
        if i == index:
            return line_no, line
    return -1, ""


def read_template_pairs(path) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(template_1, template_2, label)`` int64 arrays of ``<ds>_template_pair_label.txt``.

    The 15.7 M lines of IJB-C go through numpy's C parser; a malformed file is rescanned line by
    line to name the first bad line.
    """
    path = Path(path)
    _require(path, "the template pairs")
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": refused below, in one line
            data = np.loadtxt(fh, dtype=np.int64, ndmin=2, comments=None)
        ok = data.ndim == 2 and data.shape[1] == 3 and bool(np.isin(data[:, 2], (0, 1)).all())
    except ValueError:
        ok = False
    if not ok:
        _scan_pairs(path)
        raise InputFileError(f"{path} cannot be read as 'template_id_1 template_id_2 label' lines")
    if data.shape[0] == 0:
        raise InputFileError(f"{path} lists no template pairs")
    genuine = int(data[:, 2].sum())
    if genuine in (0, data.shape[0]):  # the ROC and TAR@FAR need both kinds of pair
        raise InputFileError(f"{path}: all {data.shape[0]} template pairs have label {data[0, 2]}; the 1:1 protocol "
                             "needs genuine (1) and impostor (0) pairs")
    return data[:, 0].copy(), data[:, 1].copy(), data[:, 2].copy()


def read_name_5pts_score(path) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``(image names, N x 5 x 2 landmarks, N detector scores)`` of ``<ds>_name_5pts_score.txt``."""
    path = Path(path)
    _require(path, "the landmarks and detector scores")
    fix = "each line must be 'image_name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score' (11 numbers), as in the official files"
    names, values, first_line = [], [], {}
    for line_no, line, f in _data_lines(path):
        if len(f) != 12:
            raise _bad_line(path, line_no, line, f"expected a name and 11 numbers, got {len(f)} fields", fix)
        try:
            row = [float(v) for v in f[1:]]
        except ValueError:
            raise _bad_line(path, line_no, line, "landmarks and score must be numbers", fix) from None
        if not np.isfinite(row).all():
            raise _bad_line(path, line_no, line, "landmarks and score must be finite", fix)
        if f[0] in first_line:
            raise _bad_line(path, line_no, line, f"image {f[0]} is already listed on line {first_line[f[0]]}",
                            "keep one line per image")
        first_line[f[0]] = line_no
        names.append(f[0])
        values.append(row)
    if not names:
        raise InputFileError(f"{path} lists no faces; {fix}")
    arr = np.asarray(values, dtype=np.float64)
    return names, arr[:, :10].reshape(-1, 5, 2), arr[:, 10]


@dataclass
class IJBMeta:
    """The parsed meta files (``landmarks`` and ``scores`` follow ``landmark_names``)."""

    files: Dict[str, Path]
    face_names: List[str]  # one per face -> template, media line
    templates: np.ndarray
    medias: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    landmark_names: Optional[List[str]] = None
    landmarks: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None

    def landmark_index(self) -> Dict[str, int]:
        return {n: i for i, n in enumerate(self.landmark_names or [])}


def load_ijb_meta(root, dataset: str, need_landmarks: bool = True, need_pairs: bool = True) -> IJBMeta:
    """Read and cross-check the meta files: every face has landmarks, every pair's templates exist.

    ``need_pairs=False`` (1:N only) leaves the 1:1 pairs file unread (empty pair arrays)."""
    from eval.pairs import describe_missing

    files = meta_files(root, dataset)
    names, templates, medias = read_face_tid_mid(files["tid_mid"])
    if need_pairs:
        t1, t2, labels = read_template_pairs(files["pairs"])
    else:
        t1 = t2 = labels = np.zeros(0, dtype=np.int64)
    meta = IJBMeta(files, names, templates, medias, t1, t2, labels)
    known = np.unique(templates)
    for side, t in (("first", t1), ("second", t2)):
        bad = ~np.isin(t, known)
        if bad.any():
            line_no, line = _nth_data_line(files["pairs"], int(np.flatnonzero(bad)[0]))
            raise _bad_line(files["pairs"], line_no, line,
                            f"the {side} template ({int(t[bad][0])}) has no face in {files['tid_mid'].name}",
                            f"{int(bad.sum())} pairs name unknown templates: use the meta files of one release")
    if need_landmarks:
        meta.landmark_names, meta.landmarks, meta.scores = read_name_5pts_score(files["landmarks"])
        index = meta.landmark_index()
        missing = list(dict.fromkeys(n for n in names if n not in index))
        if missing:
            raise InputFileError(describe_missing(missing, len(set(names)), f"from {files['landmarks']}",
                                                  f"every face of {files['tid_mid'].name} needs its 5 points and "
                                                  f"score; use the meta files of one release"))
    logger.info("%s: %d faces, %d templates, %d media, %d pairs (%d genuine)", dataset, len(names), known.size,
                np.unique(np.stack([templates, medias], 1), axis=0).shape[0], labels.size, int(labels.sum()))
    return meta


def read_template_subjects(path) -> Tuple[np.ndarray, np.ndarray]:
    """``(template ids, subject ids)``, one entry per template, of a 1:N gallery or probe CSV.

    The official files have a header line, then one comma-separated line per face whose first two
    fields are ``TEMPLATE_ID,SUBJECT_ID``; a template's subject is read from its first line (as
    insightface's ``np.unique(..., return_index=True)`` does) and must be the same on all its lines.
    """
    path = Path(path)
    _require(path, "a 1:N gallery or probe list")
    fix = "each line after the header must start with 'TEMPLATE_ID,SUBJECT_ID' (integers), as in the official CSVs"
    subject_of: Dict[int, Tuple[int, int]] = {}
    header = True
    for line_no, line, _ in _data_lines(path):
        if header:
            header = False
            continue
        f = [x.strip() for x in line.split(",")]
        if len(f) < 2:
            raise _bad_line(path, line_no, line, f"expected at least 2 comma-separated fields, got {len(f)}", fix)
        t, sub = _ids(f[:2], path, line_no, line, "template and subject ids", fix)
        if t in subject_of and subject_of[t][0] != sub:
            raise _bad_line(path, line_no, line, f"template {t} was listed with subject {subject_of[t][0]} on line "
                            f"{subject_of[t][1]}", "a template belongs to one subject: use the files of one release")
        subject_of.setdefault(t, (sub, line_no))
    if not subject_of:
        raise InputFileError(f"{path} lists no templates; {fix}")
    tids = np.array(sorted(subject_of), dtype=np.int64)
    return tids, np.array([subject_of[t][0] for t in tids], dtype=np.int64)


# --------------------------------------------------------------------------- pooling and scores


def flip_sum(features: np.ndarray) -> np.ndarray:
    """``[f(crop), f(mirror)]`` concatenated (``eval.features.embed_batch``) -> ``f(crop) + f(mirror)`` (F2)."""
    d = features.shape[1] // 2
    return features[:, :d] + features[:, d:]


def template_features(features: np.ndarray, templates: Sequence[int], medias: Sequence[int],
                      weights: Optional[np.ndarray] = None, normalize_faces: bool = False,
                      chunk: int = FACE_CHUNK) -> Tuple[np.ndarray, np.ndarray]:
    """``(sorted template ids, L2-normalised template features)`` by media then template pooling.

    ``features[i]`` is the face of ``templates[i]`` / ``medias[i]``; ``weights[i]`` (detector
    scores) multiplies it after the optional normalisation, as in insightface. The media mean and
    template sum are one weighted sum per template (weight = score / faces in the media), computed
    with ``np.add.reduceat`` on faces sorted by (template, media), ``chunk`` faces at a time.
    """
    from sphereface_plus.utils import progress

    features = np.asarray(features)
    t = np.asarray(templates, dtype=np.int64)
    m = np.asarray(medias, dtype=np.int64)
    n = t.size
    if features.ndim != 2 or features.shape[0] != n or m.size != n:
        raise ValueError(f"features {features.shape}, {n} template ids and {m.size} media ids do not match")
    order = np.lexsort((m, t))
    ts, ms = t[order], m[order]
    new_media = np.r_[True, (ts[1:] != ts[:-1]) | (ms[1:] != ms[:-1])]
    media_id = np.cumsum(new_media) - 1
    w = 1.0 / np.bincount(media_id)[media_id]
    if weights is not None:
        w = w * np.asarray(weights, dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, ts[1:] != ts[:-1]])
    ends = np.r_[starts[1:], n]
    out = np.zeros((starts.size, features.shape[1]), dtype=np.float64)
    bar = progress(total=n, desc="pool", unit="face")
    ti = 0
    while ti < starts.size:
        a = starts[ti]
        tj = max(ti + 1, int(np.searchsorted(ends, a + chunk, side="right")))  # whole templates only
        b = ends[tj - 1]
        x = features[order[a:b]].astype(np.float64)
        if normalize_faces:
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            x /= np.where(norm == 0, 1.0, norm)
        x *= w[a:b, None]
        out[ti:tj] = np.add.reduceat(x, starts[ti:tj] - a, axis=0)
        bar.update(int(b - a))
        ti = tj
    bar.close()
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return ts[starts], out / np.where(norm == 0, 1.0, norm)


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1, t2, block: int = PAIR_BLOCK) -> np.ndarray:
    """Cosine score of every template pair (``template_ids`` sorted, features L2-normalised)."""
    from sphereface_plus.utils import progress

    i1 = np.searchsorted(template_ids, t1)
    i2 = np.searchsorted(template_ids, t2)
    scores = np.empty(len(i1), dtype=np.float64)
    for s in progress(range(0, len(i1), block), desc="score", unit="block"):
        scores[s:s + block] = np.einsum("nd,nd->n", template_feats[i1[s:s + block]], template_feats[i2[s:s + block]])
    return scores


def ijb_report(scores, labels, fars: Sequence[float] = IJB_FARS) -> Dict[str, object]:
    """TAR@FAR (insightface's nearest ROC point, and the FAR-bounded one), AUC and the ROC points."""
    from eval.verification_metrics import auc, far_key, roc_curve, tar_at_far, tar_at_nearest_far

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    fpr, tpr, thr = roc_curve(scores, labels)
    nearest = {far_key(f): tar_at_nearest_far(fpr, tpr, thr, f) for f in fars}
    return {
        "tar_at_far": {k: v["tar"] for k, v in nearest.items()},
        "roc_point_at_far": {k: {"far": v["far"], "threshold": v["threshold"]} for k, v in nearest.items()},
        "tar_at_far_bounded": {far_key(f): tar_at_far(scores[labels], scores[~labels], f)["tar"] for f in fars},
        "auc": auc(fpr, tpr),
        "num_pairs": int(labels.size),
        "num_positive": int(labels.sum()),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def meta_template_features(meta: IJBMeta, names: Sequence[str], features: np.ndarray, detector_score: bool = False,
                           normalize_faces: bool = False,
                           source: str = "the features") -> Tuple[np.ndarray, np.ndarray]:
    """``(sorted template ids, L2-normalised template features)`` of every template of the meta files,
    from per-face ``features`` named by ``names`` (any order)."""
    from eval.pairs import describe_missing

    index = {n: i for i, n in enumerate(names)}
    if len(index) != len(names):
        logger.warning("%d duplicate image names in %s; the last feature of each is used", len(names) - len(index),
                       source)
    missing = list(dict.fromkeys(n for n in meta.face_names if n not in index))
    if missing:
        raise InputFileError(describe_missing(missing, len(set(meta.face_names)), f"from {source}",
                                              f"'paths' must be the image names of {meta.files['tid_mid'].name} "
                                              f"(e.g. 1.jpg)"))
    rows = np.fromiter((index[n] for n in meta.face_names), dtype=np.int64, count=len(meta.face_names))
    weights = None
    if detector_score:
        lm = meta.landmark_index()
        weights = meta.scores[np.fromiter((lm[n] for n in meta.face_names), dtype=np.int64,
                                          count=len(meta.face_names))]
    return template_features(np.asarray(features)[rows], meta.templates, meta.medias, weights, normalize_faces)


def evaluate_ijb(meta: IJBMeta, names: Sequence[str], features: np.ndarray, detector_score: bool = False,
                 normalize_faces: bool = False, fars: Sequence[float] = IJB_FARS,
                 source: str = "the features") -> Tuple[Dict[str, object], np.ndarray]:
    """The 1:1 report and the pair scores from per-face ``features`` named by ``names`` (any order)."""
    tids, tfeats = meta_template_features(meta, names, features, detector_score, normalize_faces, source)
    scores = pair_scores(tids, tfeats, meta.t1, meta.t2)
    report = ijb_report(scores, meta.labels, fars)
    report.update({"num_templates": int(tids.size), "num_faces": len(meta.face_names),
                   "detector_score": bool(detector_score), "normalize_faces": bool(normalize_faces)})
    return report, scores


def model_face_features(model, info, meta: IJBMeta, batch_size: int = 64, flip: bool = True, device="cpu",
                        num_workers: int = 2) -> Tuple[List[str], np.ndarray]:
    """``(names, features)`` of every face of the meta files: aligned, embedded, flip-summed (F2)."""
    from eval.features import extract_features

    lm = meta.landmark_index()
    names = list(dict.fromkeys(meta.face_names))
    landmarks = {n: meta.landmarks[lm[n]] for n in names}
    feats = extract_features(model, meta.files["images"], names, batch_size=batch_size, flip=flip, device=device,
                             num_workers=num_workers, input_size=info["input_size"], landmarks=landmarks,
                             template=info["template"])
    return names, flip_sum(feats) if flip else feats


def format_ijb_report(report: Dict[str, object]) -> str:
    """The TAR@FAR table as insightface prints it (percent), with the AUC."""
    keys = list(report["tar_at_far"])
    lines = [f"{report.get('dataset', 'IJB')} 1:1: {report['num_pairs']} template pairs ({report['num_positive']} "
             f"genuine), {report.get('num_templates', '?')} templates, {report.get('num_faces', '?')} faces",
             "FAR              " + "".join(f"{k:>9}" for k in keys),
             "TAR (%)          " + "".join(f"{100 * report['tar_at_far'][k]:9.2f}" for k in keys),
             "TAR, FAR<=target " + "".join(f"{100 * report['tar_at_far_bounded'][k]:9.2f}" for k in keys),
             f"AUC {report['auc']:.5f}"]
    return "\n".join(lines)
