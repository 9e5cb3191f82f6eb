"""MegaFace Challenge 1 without the devkit: feature files in its format, and a pure-Python scorer.

Feature files (the MegaFace devkit's format): one file per image, ``<relative image path><suffix>`` (e.g.
``xxx.jpg_sphereface.bin``), holding four little-endian int32 ``rows, cols, row_stride_bytes,
cv_type`` = ``(D, 1, 4, 5)`` (an OpenCV ``D x 1`` ``CV_32F`` matrix, as the devkit's ``matio``
writes it) followed by ``D`` float32 values, L2-normalised.

Metrics (:func:`evaluate`), as the devkit defines them for the FaceScrub probe set:

- identification: every ordered pair ``(i, j)`` of distinct probe images of one identity is a
  trial, with probe ``i`` and gallery = distractors + ``{j}``; rank-1 counts the trials where
  ``s(i, j)`` exceeds every ``s(i, d)``. Reported for distractor set sizes 10 .. 1,000,000 (the
  first ``n`` distractors of the list: use the devkit's subset lists to reproduce its exact sets).
- verification: genuine scores are the same-identity probe pairs, impostor scores all
  probe-versus-distractor pairs; TAR at FAR = 1e-6 with the decision ``score > t``.

Scores are exact (brute force) through :func:`eval.vector_index.inner_products`, the kernel of the exact
index that galleries use too (docs/gallery.md#indexes).

The distractors are processed in chunks: only the running best distractor score per probe and the
``floor(FAR * n) + 1`` largest impostor scores are kept, so memory stays bounded at 1M distractors
(3.5 billion impostor scores).

The commands ``sphereface-plus megaface export`` (features for an image list, resumable, atomic per
file) and ``sphereface-plus megaface score`` are :mod:`sphereface_plus.commands.megaface`.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from eval.vector_index import inner_products
from eval.verification_metrics import allowed_false_accepts, tar_from_top_impostors
from sphereface_plus.errors import InputFileError, MissingFileError, require_file
from sphereface_plus.utils import atomic_write_bytes, progress

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<4i")
CV_TYPES = {5: np.dtype("<f4"), 6: np.dtype("<f8")}  # CV_32F, CV_64F
DEFAULT_SUFFIX = "_sphereface.bin"
DEFAULT_SIZES = (10, 100, 1000, 10000, 100000, 1000000)


# --------------------------------------------------------------------------- feature files


def feature_bytes(vector, normalize: bool = False) -> bytes:
    """The devkit bytes of one vector: header ``(D, 1, 4, 5)`` then ``D`` little-endian float32."""
    v = np.asarray(vector, dtype=np.float64).ravel()
    if normalize:
        n = np.linalg.norm(v)
        if n == 0:
            raise ValueError("cannot L2-normalise a zero feature vector")
        v = v / n
    return HEADER.pack(v.size, 1, 4, 5) + v.astype("<f4").tobytes()


def write_feature(path, vector, normalize: bool = False) -> None:
    """Write one feature file in the devkit format, atomically (``normalize`` L2-normalises first)."""
    atomic_write_bytes(path, feature_bytes(vector, normalize))


def read_feature(path) -> np.ndarray:
    """Read one devkit feature file (an OpenCV row or column vector) as a float32 1-D array."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise InputFileError(f"{path}: {len(data)} bytes, shorter than the 16-byte header")
    rows, cols, stride, cv_type = HEADER.unpack_from(data)
    dtype = CV_TYPES.get(cv_type)
    if dtype is None:
        raise InputFileError(f"{path}: OpenCV type {cv_type} is not a float matrix (expected 5 = CV_32F)")
    if rows < 1 or cols < 1 or stride != cols * dtype.itemsize:
        raise InputFileError(f"{path}: header rows={rows} cols={cols} stride={stride} is not a dense matrix")
    if min(rows, cols) != 1:
        raise InputFileError(f"{path}: a {rows} x {cols} matrix is not a feature vector")
    expected = HEADER.size + rows * stride
    if len(data) != expected:
        raise InputFileError(f"{path}: {len(data)} bytes, but the header (rows={rows}, cols={cols}) needs {expected}; "
                         f"the file is truncated or not a devkit feature")
    return np.frombuffer(data, dtype=dtype, offset=HEADER.size).astype(np.float32)


def feature_file_problem(path, dim: Optional[int] = None) -> Optional[str]:
    """Why an existing feature file cannot be kept on resume, or None when it is complete.

    Reads only the 16-byte header and the file size: a file cut short, one with a header that is not a
    float vector, or one of another dimension than ``dim`` (another model) is redone.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(HEADER.size)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if len(head) < HEADER.size:
        return f"{size} bytes, shorter than the 16-byte header"
    rows, cols, stride, cv_type = HEADER.unpack(head)
    dtype = CV_TYPES.get(cv_type)
    if dtype is None or rows < 1 or cols < 1 or min(rows, cols) != 1 or stride != cols * dtype.itemsize:
        return f"header rows={rows} cols={cols} stride={stride} type={cv_type} is not a float feature vector"
    if size != HEADER.size + rows * stride:
        return f"{size} bytes, the header needs {HEADER.size + rows * stride} (truncated)"
    if dim is not None and rows * cols != dim:
        return f"{rows * cols}-d, this model makes {dim}-d features"
    return None


def feature_path(out_dir, rel_path: str, suffix: str = DEFAULT_SUFFIX) -> Path:
    """``out_dir/<rel_path><suffix>``: where the devkit looks for an image's feature."""
    return Path(out_dir) / f"{rel_path}{suffix}"


def read_features(out_dir, rel_paths: Sequence[str], suffix: str = DEFAULT_SUFFIX, desc: str = "read") -> np.ndarray:
    """Read the features of ``rel_paths`` (``N x D`` float32); all missing files are named at once."""
    files = [feature_path(out_dir, p, suffix) for p in rel_paths]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        from eval.pairs import describe_missing

        raise MissingFileError(describe_missing(missing, len(files), f"in {out_dir}",
                                                 "run 'sphereface-plus megaface export' for this list first"))
    return np.stack([read_feature(f) for f in progress(files, desc=desc, unit="file")])


def iter_feature_chunks(out_dir, rel_paths: Sequence[str], suffix: str, chunk: int) -> Iterator[np.ndarray]:
    """Features of ``rel_paths`` ``chunk`` files at a time (bounded memory for 1M distractors)."""
    bar = progress(total=len(rel_paths), desc="distractors", unit="file")
    for start in range(0, len(rel_paths), chunk):
        part = rel_paths[start:start + chunk]
        out = np.stack([read_feature(feature_path(out_dir, p, suffix)) for p in part])
        bar.update(len(part))
        yield out
    bar.close()


def read_image_list(path) -> Tuple[List[str], Optional[List[str]]]:
    """Read an image list: the devkit JSON (``{"path": [...], "id": [...]}``), a JSON list of paths,
    or a text file of ``relative/path [label]`` lines. Returns ``(paths, labels or None)``."""
    path = require_file(path, "image list")
    text = path.read_text()
    s = text.lstrip()
    if s.startswith("{") or s.startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}: invalid JSON ({e})") from None
        if isinstance(obj, list):
            return [str(p) for p in obj], None
        if "path" not in obj:
            raise InputFileError(f"{path}: a JSON image list needs a 'path' list (the devkit layout), found keys "
                             f"{sorted(obj)[:5]}")
        paths = [str(p) for p in obj["path"]]
        labels = [str(v) for v in obj["id"]] if "id" in obj else None
        if labels is not None and len(labels) != len(paths):
            raise InputFileError(f"{path}: {len(paths)} paths but {len(labels)} ids")
        return paths, labels
    paths, labels = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) > 2:
            raise InputFileError(f"{path}:{line_no}: expected 'relative/path [label]', got {len(f)} fields")
        paths.append(f[0])
        labels.append(f[1] if len(f) == 2 else None)
    if any(lab is None for lab in labels):
        labels = None
    return paths, labels


def labels_from_folders(paths: Sequence[str]) -> List[str]:
    """Identity = the parent folder of each relative path (FaceScrub ``Name/Name_123.png``)."""
    out = []
    for p in paths:
        parent = str(Path(p).parent)
        if parent in ("", "."):
            raise InputFileError(f"cannot tell the identity of {p!r}: give the list with an 'id' per image")
        out.append(parent)
    return out


# --------------------------------------------------------------------------- scoring


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if (n == 0).any():
        raise InputFileError(f"{int((n == 0).sum())} zero feature vector(s)")
    return x / n


def _chunks(distractors, block: int) -> Iterator[np.ndarray]:
    if isinstance(distractors, np.ndarray):
        for s in range(0, distractors.shape[0], block):
            yield distractors[s:s + block]
    else:
        for c in distractors:
            c = np.asarray(c)
            for s in range(0, c.shape[0], block):
                yield c[s:s + block]


def evaluate(
    probe_features,
    probe_labels: Sequence,
    distractor_features: Union[np.ndarray, Iterable[np.ndarray]],
    far: float = 1e-6,
    sizes: Optional[Sequence[int]] = None,
    num_distractors: Optional[int] = None,
    block_elements: int = 1 << 24,
    dtype=np.float32,
) -> Dict[str, object]:
    """MegaFace Challenge 1 metrics (see the module docstring for the exact definitions).

    ``distractor_features`` is an ``M x D`` array (a memmap works) or an iterable of chunks; with an
    iterable give ``num_distractors``. Features are L2-normalised here. ``sizes``: distractor set
    sizes for rank-1 (the first ``n`` distractors; default 10, 100, ... up to ``M``, plus ``M``).
    Scores are computed in ``dtype`` on blocks of ``block_elements`` probe-distractor scores.

    Returns ``rank1`` (all distractors), ``rank1_by_size`` (``{"10": ..., ...}``), ``tar``,
    ``far`` (reached), ``threshold``, ``num_trials``, ``num_genuine``, ``num_impostors``.
    """
    P = _normalise(np.asarray(probe_features, dtype=np.float64)).astype(dtype)
    labels = np.asarray(probe_labels)
    if labels.shape[0] != P.shape[0]:
        raise InputFileError(f"{P.shape[0]} probe features but {labels.shape[0]} labels")
    if isinstance(distractor_features, np.ndarray):
        M = distractor_features.shape[0]
    elif num_distractors is None:
        raise ValueError("give num_distractors when distractor_features is an iterable of chunks")
    else:
        M = int(num_distractors)
    if M < 1:
        raise InputFileError("no distractors")
    sizes = sorted({int(s) for s in (sizes if sizes is not None else DEFAULT_SIZES) if 0 < int(s) <= M} | {M})

    # trials (ordered pairs of distinct images of one identity) and genuine scores, identity by
    # identity: memory grows with the number of trials, not with probes squared
    _, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    trial_probe, trial_score, genuine = [], [], []
    for g in np.split(order, bounds):
        if g.size < 2:
            continue
        S = inner_products(P[g], P[g])
        off = ~np.eye(g.size, dtype=bool)
        trial_probe.append(np.broadcast_to(g[:, None], S.shape)[off])
        trial_score.append(S[off])
        genuine.append(S[np.triu_indices(g.size, 1)])
    if not trial_probe:
        raise InputFileError("no identity has two probe images: no identification trials")
    trial_probe = np.concatenate(trial_probe)
    trial_score = np.concatenate(trial_score)
    genuine = np.concatenate(genuine).astype(np.float64)
    num_trials = int(trial_probe.size)

    n_imp = P.shape[0] * M
    keep = allowed_false_accepts(far, n_imp) + 1  # top impostor scores needed for TAR@FAR
    top = np.empty(0, dtype=dtype)
    best = np.full(P.shape[0], -np.inf, dtype=dtype)  # running max distractor score per probe
    rank1_by_size: Dict[str, float] = {}
    block = max(1, block_elements // max(1, P.shape[0]))
    seen = 0
    next_size = iter(sizes)
    boundary = next(next_size)
    for chunk in _chunks(distractor_features, block):
        chunk = _normalise(np.asarray(chunk, dtype=np.float64)).astype(dtype)
        pos = 0
        while pos < chunk.shape[0]:
            if seen >= M:
                raise ValueError(f"more distractor features than num_distractors={M}")
            end = min(chunk.shape[0], pos + boundary - seen)
            S = inner_products(P, chunk[pos:end])  # probes x distractors, one bounded block
            np.maximum(best, S.max(axis=1), out=best)
            flat = np.concatenate([top, S.ravel()])
            top = flat if flat.size <= keep else np.partition(flat, flat.size - keep)[flat.size - keep:]
            seen += end - pos
            pos = end
            if seen == boundary:
                hits = int((trial_score > best[trial_probe]).sum())
                rank1_by_size[str(boundary)] = hits / num_trials
                boundary = next(next_size, M + 1)
    if seen != M:
        raise ValueError(f"got {seen} distractor features, expected {M}")
    ver = tar_from_top_impostors(genuine, top, n_imp, far)
    return {
        "rank1": rank1_by_size[str(M)],
        "rank1_by_size": rank1_by_size,
        "tar": ver["tar"],
        "far": ver["far"],
        "far_target": far,
        "threshold": ver["threshold"],
        "num_probes": int(P.shape[0]),
        "num_identities": int(np.unique(labels).size),
        "num_distractors": int(M),
        "num_trials": num_trials,
        "num_genuine": int(genuine.size),
        "num_impostors": int(n_imp),
    }
