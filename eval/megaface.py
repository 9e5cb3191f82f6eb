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

The distractors are processed in chunks: only the running best distractor score per probe and the
``floor(FAR * n) + 1`` largest impostor scores are kept, so memory stays bounded at 1M distractors
(3.5 billion impostor scores).

Commands: ``sphereface-plus megaface export`` (features for an image list, resumable, atomic per
file) and ``sphereface-plus megaface score``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from eval.verification_metrics import allowed_false_accepts, tar_from_top_impostors
from sphereface_plus.errors import InputFileError, MissingFileError, require_dir, require_file
from sphereface_plus.utils import atomic_write_bytes, progress

logger = logging.getLogger(__name__)

HELP = "MegaFace Challenge 1: export features in the devkit format, score rank-1 and TAR@FAR=1e-6"
DESCRIPTION = __doc__ + """
examples:
  sphereface-plus megaface export --checkpoint last.pt --list facescrub_features_list.json \\
      --root facescrub-112x96 --out feats/facescrub
  sphereface-plus megaface export --checkpoint last.pt --list megaface_features_list.json_1000000_1 \\
      --root megaface-112x96 --out feats/megaface
  sphereface-plus megaface score --probe-list facescrub_features_list.json --probe-dir feats/facescrub \\
      --distractor-list megaface_features_list.json_1000000_1 --distractor-dir feats/megaface --json mf.json
"""

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
    return _stack(files, [read_feature(f) for f in progress(files, desc=desc, unit="file")])


def _stack(files: Sequence[Path], vectors: List[np.ndarray], dim: Optional[int] = None) -> np.ndarray:
    """``N x D`` of one feature per file; a file of another length than the first (or than ``dim``) is named."""
    dim = dim if dim is not None else (vectors[0].size if vectors else 0)
    for f, v in zip(files, vectors):
        if v.size != dim:
            raise InputFileError(f"{f}: a {v.size}-d feature among {dim}-d ones; export all features with one model")
    return np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)


def iter_feature_chunks(out_dir, rel_paths: Sequence[str], suffix: str, chunk: int,
                        dim: Optional[int] = None) -> Iterator[np.ndarray]:
    """Features of ``rel_paths`` ``chunk`` files at a time (bounded memory for 1M distractors), each ``dim``-d
    (default: the first file's length)."""
    bar = progress(total=len(rel_paths), desc="distractors", unit="file")
    for start in range(0, len(rel_paths), chunk):
        part = rel_paths[start:start + chunk]
        files = [feature_path(out_dir, p, suffix) for p in part]
        out = _stack(files, [read_feature(f) for f in files], dim)
        dim = out.shape[1]
        bar.update(len(part))
        yield out
    bar.close()


def read_image_list(path) -> Tuple[List[str], Optional[List[str]]]:
    """Read an image list: the devkit JSON (``{"path": [...], "id": [...]}``), a JSON list of paths,
    or a text file of ``relative/path [label]`` lines. Returns ``(paths, labels or None)``.

    Every path must be relative and stay inside its folder (no ``..``, no absolute path, names a file system
    takes): ``megaface export`` writes ``--out/<path><suffix>`` for each, and nothing outside ``--out``."""
    from sphereface_plus.utils import read_text

    path = require_file(path, "image list")
    text = read_text(path, "image list")
    s = text.lstrip()
    labels: Optional[List[str]]
    if s.startswith("{") or s.startswith("["):
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InputFileError(f"{path}: invalid JSON ({str(e)[:200]})") from None
        if isinstance(obj, dict) and not isinstance(obj.get("path"), list):
            raise InputFileError(f"{path}: a JSON image list needs a 'path' list (the devkit layout), found keys "
                                 f"{sorted(map(str, obj))[:5]}")
        paths = obj if isinstance(obj, list) else obj["path"]
        ids = obj.get("id") if isinstance(obj, dict) else None
        if not all(isinstance(p, str) for p in paths):
            raise InputFileError(f"{path}: every image path must be a string")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(v, (str, int)) for v in ids)):
            raise InputFileError(f"{path}: 'id' must be a list of identity names or numbers")
        labels = [str(v) for v in ids] if ids is not None else None
        if labels is not None and len(labels) != len(paths):
            raise InputFileError(f"{path}: {len(paths)} paths but {len(labels)} ids")
    else:
        paths, found = [], []
        for line_no, line in enumerate(text.splitlines(), 1):
            f = line.split()
            if not f:
                continue
            if len(f) > 2:
                raise InputFileError(f"{path}:{line_no}: expected 'relative/path [label]', got {len(f)} fields")
            paths.append(f[0])
            found.append(f[1] if len(f) == 2 else None)
        labels = None if any(lab is None for lab in found) else found
    if not paths:
        raise InputFileError(f"{path} lists no images")
    for p in paths:
        parts = p.replace("\\", "/").split("/")
        if not p or p.startswith("/") or ".." in parts or "\0" in p or any(len(x.encode()) > 255 for x in parts):
            raise InputFileError(f"{path}: {p[:80]!r} is not a relative image path inside the image folder")
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
        S = P[g] @ P[g].T
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
            S = P @ chunk[pos:end].T  # probes x distractors, one bounded block
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


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    ex = sub.add_parser("export", help="write devkit feature files for an image list (resumable)",
                        description="Embed every image of a list (aligned crops, or raw images with "
                                    "--landmarks) and write <out>/<path><suffix> in the devkit format, "
                                    "L2-normalised. Complete files that exist are kept (each one's header "
                                    "and size are checked; damaged ones are redone), so an interrupted "
                                    "export resumes where it stopped; --overwrite recomputes everything.")
    ex.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    ex.add_argument("--list", required=True, help="image list: devkit JSON, JSON list, or 'path [label]' lines")
    ex.add_argument("--root", required=True, help="folder holding the images at the list's relative paths")
    ex.add_argument("--out", required=True, help="output folder for the feature files")
    ex.add_argument("--suffix", default=DEFAULT_SUFFIX, help=f"file name suffix (default {DEFAULT_SUFFIX})")
    ex.add_argument("--landmarks", help="landmark file to align raw images on the fly")
    ex.add_argument("--no-flip", action="store_true", help="embed the crop only (default: crop + mirror)")
    ex.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    ex.add_argument("--batch-size", type=int, default=64)
    ex.add_argument("--workers", type=int, default=2)
    ex.add_argument("--device", default="cpu")
    from eval.features import add_precision_argument

    add_precision_argument(ex)
    sc = sub.add_parser("score", help="rank-1 identification and TAR@FAR from feature files",
                        description="Score MegaFace Challenge 1 from devkit feature files: rank-1 with "
                                    "distractor set sizes 10 .. 1M, and TAR at FAR (default 1e-6).")
    sc.add_argument("--probe-list", required=True, help="FaceScrub list (devkit JSON with 'id', or 'path label' "
                                                        "lines; without labels the parent folder is the identity)")
    sc.add_argument("--probe-dir", required=True, help="folder with the probe feature files")
    sc.add_argument("--distractor-list", required=True, help="MegaFace distractor list")
    sc.add_argument("--distractor-dir", required=True, help="folder with the distractor feature files")
    sc.add_argument("--suffix", default=DEFAULT_SUFFIX, help=f"file name suffix (default {DEFAULT_SUFFIX})")
    sc.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                    help="distractor set sizes for rank-1, comma separated (default 10,...,1000000)")
    sc.add_argument("--far", type=float, default=1e-6, help="false accept rate for TAR (default 1e-6)")
    sc.add_argument("--chunk", type=int, default=20000, help="distractor files read at a time (default 20000)")
    sc.add_argument("--json", help="write the results here")


def _resume_todo(paths: Sequence[str], out: Path, suffix: str, dim: Optional[int]) -> Tuple[List[str], List[str]]:
    """``(to do, damaged)``: images without a complete feature file; damaged files are named in the log."""
    todo, damaged = [], []
    for p in progress(paths, desc="check existing", unit="file"):
        f = feature_path(out, p, suffix)
        if not f.is_file():
            todo.append(p)
            continue
        problem = feature_file_problem(f, dim)
        if problem:
            todo.append(p)
            damaged.append(p)
            logger.warning("redoing %s: %s", f, problem)
    return todo, damaged


def export(args) -> int:
    from eval import features as F

    require_file(args.checkpoint, "--checkpoint")
    require_dir(args.root, "--root")
    paths, _ = read_image_list(args.list)
    out = Path(args.out)
    model, info = F.load_embedding_model(args.checkpoint, device=args.device)  # before anything is written
    landmarks = F.read_landmarks(args.landmarks) if args.landmarks else None
    dim = _feature_dim(model, info, not args.no_flip)
    damaged: List[str] = []
    if args.overwrite:
        todo = list(paths)
    else:
        todo, damaged = _resume_todo(paths, out, args.suffix, dim)
    logger.info("%d images in %s, %d already exported, %d to do (%d damaged files redone)", len(paths), args.list,
                len(paths) - len(todo), len(todo), len(damaged))
    if not todo:
        print(f"all {len(paths)} features already in {out} (each file's header and size checked); "
              f"--overwrite recomputes them")
        return 0
    from eval.pairs import describe_missing, missing_images

    missing = missing_images(args.root, todo)
    if missing:
        raise MissingFileError(describe_missing(missing, len(todo), f"under {args.root}", "check --root"))
    dataset = F.ImageFiles(args.root, todo, input_size=info["input_size"], landmarks=landmarks,
                           template=info["template"])
    F.check_first_image(dataset)  # raw photos: one clear error here, not a worker traceback
    for start, feats in F.iter_embeddings(model, dataset, args.batch_size, not args.no_flip, args.device,
                                          args.workers, desc="export", precision=args.precision):
        for rel, v in zip(todo[start:start + feats.shape[0]], feats):
            write_feature(feature_path(out, rel, args.suffix), v, normalize=True)
    redone = f", {len(damaged)} of them replacing damaged files" if damaged else ""
    print(f"wrote {len(todo)} feature files to {out} ({len(paths)} in the list{redone}); "
          f"--overwrite recomputes all")
    return 0


def _feature_dim(model, info, flip: bool) -> Optional[int]:
    """The length of this model's feature vectors (doubled by the mirror), from one dummy forward."""
    import torch

    h, w = info["input_size"]
    try:
        with torch.inference_mode():
            d = int(model(torch.zeros(1, 3, h, w, device=next(model.parameters()).device)).shape[1])
    except StopIteration:
        return None
    return 2 * d if flip else d


def score(args) -> int:
    from sphereface_plus.utils import atomic_write_json

    probe_paths, labels = read_image_list(args.probe_list)
    if labels is None:
        labels = labels_from_folders(probe_paths)
    dist_paths, _ = read_image_list(args.distractor_list)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        from sphereface_plus.errors import UsageError

        raise UsageError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    probes = read_features(args.probe_dir, probe_paths, args.suffix, desc="probes")
    missing = [p for p in dist_paths if not feature_path(args.distractor_dir, p, args.suffix).is_file()]
    if missing:
        from eval.pairs import describe_missing

        raise MissingFileError(describe_missing(missing, len(dist_paths), f"in {args.distractor_dir}",
                                                 "run 'sphereface-plus megaface export' for this list first"))
    res = evaluate(probes, labels, iter_feature_chunks(args.distractor_dir, dist_paths, args.suffix, args.chunk,
                                                       probes.shape[1]),
                   far=args.far, sizes=sizes, num_distractors=len(dist_paths))
    print(f"probes {res['num_probes']} ({res['num_identities']} identities, {res['num_trials']} trials), "
          f"distractors {res['num_distractors']}")
    print("distractors  rank-1")
    for n, r in res["rank1_by_size"].items():
        print(f"{int(n):>11}  {100 * r:6.2f}%")
    print(f"TAR@FAR={args.far:g}: {100 * res['tar']:.2f}% (threshold {res['threshold']:.4f}, FAR reached "
          f"{res['far']:.2e})")
    if args.json:
        atomic_write_json(args.json, res)
        print(f"results: {args.json}")
    return 0


def run(args) -> int:
    # input mistakes raise ToolkitErrors: the command line prints them as one 'error:' line, exit 2
    return export(args) if args.action == "export" else score(args)
