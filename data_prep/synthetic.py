"""Synthetic face-like identities with exact landmarks: the embedded default data set.

These are NOT real faces. They are cartoon faces drawn with OpenCV (:mod:`data_prep.synthetic_faces`),
made so that the whole pipeline
(alignment, training, LFW-style verification) can run end to end, deterministically and in seconds,
where no real data is at hand (``make demo``, fast tests).

What makes an identity (fixed per identity, drawn from the seed): skin tone, face shape, hair colour
and hairline, ear size, eye spacing / size / height and iris colour, eyebrow shape, nose length and
width, mouth position, width and lip colour, a few moles, glasses or not.

What changes per image (nuisance the model must learn to ignore): in-plane rotation (+-12 degrees),
scale (0.85-1.15), translation (+-12 px), a small yaw and pitch (inner features shift sideways or up/down),
expression (smile, mouth width, eyebrow raise), background colour and clutter, brightness, a lighting
gradient and colour cast, blur and sensor noise, JPEG compression.

The five landmarks (left eye = pupil centre, right eye, nose tip, left and right mouth corner, "left"
as seen in the image; 0-based pixel coordinates) are known exactly: they are the drawing coordinates
carried through the same similarity warp that places the face in the image.

Layout written by :func:`make_synthetic_dataset` (docs/interfaces.md)::

    root/images/<id>/<id>_NNNN.jpg      NNNN = 1..M (1-based, like LFW)
    root/landmarks.txt                  <id>/<id>_NNNN.jpg then x1 y1 ... x5 y5, tab separated
    root/pairs.txt                      LFW View-2 format: "10 N/2", then per fold N/2 matched
                                        "name n1 n2" and N/2 mismatched "name1 n1 name2 n2" lines;
                                        the 10 folds use disjoint identities (person-disjoint)
    root/synthetic.json                 the parameters (written last: marks a finished data set)

Same arguments -> byte-identical files (numpy's PCG64 streams keyed by (seed, identity, image)).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from data_prep.landmarks import read_landmarks
from data_prep.synthetic_faces import VERSION, identity_name, identity_params, image_name, image_params, render_image, rng
from sphereface_plus.errors import UsageError

logger = logging.getLogger(__name__)

MARKER = "synthetic.json"

# --------------------------------------------------------------------------------------------------
# pairs (LFW View-2 format, person-disjoint folds)
# --------------------------------------------------------------------------------------------------
def make_pairs(
    names: List[str], images_per_identity: int, pairs_per_fold: int, seed: int = 0, num_folds: int = 10
) -> Tuple[List[str], Dict[str, int]]:
    """LFW-format pairs lines and the fold of every identity.

    Identities are shuffled and split into ``num_folds`` disjoint groups; fold k draws its
    ``pairs_per_fold / 2`` matched and ``pairs_per_fold / 2`` mismatched pairs (without repeats) from
    its own group only, so every fold is person-disjoint from the others, like LFW View 2.
    Returns (lines including the header ``"10 N/2"``, identity name -> fold index).
    """
    if pairs_per_fold < 2 or pairs_per_fold % 2:
        raise UsageError(f"pairs_per_fold must be a positive even number (half matched, half mismatched), got "
                         f"{pairs_per_fold}")
    k, m = len(names), images_per_identity
    half = pairs_per_fold // 2
    if k < 2 * num_folds:
        raise UsageError(
            f"{k} synthetic identities cannot make {num_folds} person-disjoint folds with mismatched pairs: "
            f"use at least {2 * num_folds} identities (data.synthetic.num_identities)"
        )
    if m < 2:
        raise UsageError(f"matched pairs need at least 2 images per identity, got {m} "
                         "(data.synthetic.images_per_identity)")
    r = rng(seed, 3)
    order = r.permutation(k)
    groups = np.array_split(order, num_folds)
    for g in groups:
        n = len(g)
        if n * m * (m - 1) // 2 < half or n * (n - 1) // 2 * m * m < half:
            raise UsageError(
                f"a fold of {n} identities x {m} images cannot give {half} distinct matched and "
                f"{half} mismatched pairs: lower pairs_per_fold or add identities/images"
            )
    lines = [f"{num_folds} {half}"]
    fold_of: Dict[str, int] = {}
    for f, g in enumerate(groups):
        for i in g:
            fold_of[names[i]] = f
        matched, seen = [], set()
        while len(matched) < half:
            who = int(g[r.integers(len(g))])
            a, b = sorted(r.choice(m, size=2, replace=False).tolist())
            if (who, a, b) not in seen:
                seen.add((who, a, b))
                matched.append(f"{names[who]}\t{a + 1}\t{b + 1}")
        mismatched, seen = [], set()
        while len(mismatched) < half:
            p, q = sorted(r.choice(len(g), size=2, replace=False).tolist())
            i, j = int(g[p]), int(g[q])
            a, b = int(r.integers(m)), int(r.integers(m))
            if (i, a, j, b) not in seen:
                seen.add((i, a, j, b))
                mismatched.append(f"{names[i]}\t{a + 1}\t{names[j]}\t{b + 1}")
        lines += matched + mismatched
    return lines, fold_of


# --------------------------------------------------------------------------------------------------
# data set
# --------------------------------------------------------------------------------------------------
@dataclass
class SyntheticDataset:
    """What :func:`make_synthetic_dataset` wrote."""

    root: Path
    images: Path  # root/images
    landmarks_file: Path  # root/landmarks.txt
    pairs_file: Path  # root/pairs.txt
    identities: List[str]  # identity names, sorted (label i = identities[i])
    images_per_identity: int
    fold_of: Dict[str, int]  # identity -> pairs fold (0..9)
    landmarks: Dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # rel path -> 5 x 2

    @property
    def num_images(self) -> int:
        return len(self.identities) * self.images_per_identity

    def paths(self) -> List[str]:
        """All relative image paths, identity by identity."""
        return [image_name(n, j) for n in self.identities for j in range(self.images_per_identity)]


def _render_identity(task) -> List[Tuple[str, List[float]]]:
    import cv2

    cv2.setNumThreads(1)
    seed, ident, name, m, size, out_dir = task
    idp = identity_params(seed, ident)
    (Path(out_dir) / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for j in range(m):
        imp = image_params(seed, ident, j)
        img, lm = render_image(idp, imp, size)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, imp["quality"]])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {name} image {j}")
        rel = image_name(name, j)
        with open(Path(out_dir) / rel, "wb") as fh:
            fh.write(buf.tobytes())
        rows.append((rel, lm.reshape(-1).tolist()))
    return rows


def _params_dict(num_identities, images_per_identity, seed, image_size, pairs_per_fold) -> Dict[str, object]:
    return {
        "generator": "data_prep.synthetic",
        "version": VERSION,
        "num_identities": int(num_identities),
        "images_per_identity": int(images_per_identity),
        "seed": int(seed),
        "image_size": int(image_size),
        "pairs_per_fold": int(pairs_per_fold),
        "note": "synthetic cartoon faces, not real people",
    }


def make_synthetic_dataset(
    root,
    num_identities: int,
    images_per_identity: int,
    seed: int = 0,
    image_size: int = 250,
    pairs_per_fold: int = 60,
    workers: int = 0,
) -> SyntheticDataset:
    """Write ``num_identities x images_per_identity`` synthetic face images, landmarks and pairs.

    Args:
        root: output folder (created). An existing synthetic data set there is replaced; any other
            existing ``root/images`` is an error (never deleted).
        num_identities: K (at least 20 for 10 folds with mismatched pairs).
        images_per_identity: M (at least 2).
        seed: everything is a function of the seed: equal arguments give byte-identical files.
        image_size: side of the square images (the original LFW is 250).
        pairs_per_fold: N pairs per fold, half matched, half mismatched (LFW uses 600).
        workers: processes used for drawing; 0 = automatic (up to 4, one process for small sets).
            The files do not depend on it.

    The images are written into a temporary folder that is renamed to ``root/images`` when complete;
    ``landmarks.txt`` and ``pairs.txt`` are written atomically and ``synthetic.json`` last, so an
    interrupted call never leaves something that looks finished.
    """
    from sphereface_plus.utils import atomic_write_json, atomic_write_text, progress

    if num_identities < 1 or images_per_identity < 1:
        raise ValueError(f"need at least one identity and one image, got {num_identities} x {images_per_identity}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = [identity_name(i, num_identities) for i in range(num_identities)]
    pair_lines, fold_of = make_pairs(names, images_per_identity, pairs_per_fold, seed=seed)

    images = root / "images"
    if images.exists() and not (images / ".synthetic").exists():
        raise FileExistsError(
            f"{images} exists and is not a synthetic data set made here; choose another root or remove it"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".images.", suffix=".tmp", dir=str(root)))
    try:
        if workers <= 0:
            workers = 1 if num_identities * images_per_identity < 400 else min(4, os.cpu_count() or 1)
        tasks = [(seed, i, names[i], images_per_identity, image_size, str(tmp)) for i in range(num_identities)]
        rows: List[Tuple[str, List[float]]] = []
        bar = progress(total=num_identities * images_per_identity, desc="synthetic faces", unit="img")
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                for r in ex.map(_render_identity, tasks, chunksize=max(1, num_identities // (4 * workers))):
                    rows += r
                    bar.update(len(r))
        else:
            for t in tasks:
                r = _render_identity(t)
                rows += r
                bar.update(len(r))
        bar.close()
        (tmp / ".synthetic").write_text(json.dumps(_params_dict(num_identities, images_per_identity, seed, image_size, pairs_per_fold)) + "\n")
        marker = root / MARKER
        if marker.exists():
            marker.unlink()
        if images.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-images.", dir=str(root)))
            os.replace(images, old / "images")
            shutil.rmtree(old)
        os.replace(tmp, images)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    lm_lines = [rel + "\t" + "\t".join(f"{v:.3f}" for v in vals) for rel, vals in rows]
    atomic_write_text(root / "landmarks.txt", "\n".join(lm_lines) + "\n")
    atomic_write_text(root / "pairs.txt", "\n".join(pair_lines) + "\n")
    atomic_write_json(root / MARKER, _params_dict(num_identities, images_per_identity, seed, image_size, pairs_per_fold))
    logger.info("wrote %d synthetic images of %d identities to %s", len(rows), num_identities, images)
    return SyntheticDataset(
        root=root,
        images=images,
        landmarks_file=root / "landmarks.txt",
        pairs_file=root / "pairs.txt",
        identities=names,
        images_per_identity=images_per_identity,
        fold_of=fold_of,
        landmarks={rel: np.asarray(v, dtype=np.float64).reshape(5, 2) for rel, v in rows},
    )


def ensure_synthetic_dataset(
    root,
    num_identities: int = 100,
    images_per_identity: int = 20,
    seed: int = 0,
    image_size: int = 250,
    pairs_per_fold: int = 60,
    workers: int = 0,
) -> SyntheticDataset:
    """Return the synthetic data set in ``root``, generating it only if it is missing or different.

    This is the entry point for ``make demo`` and tests: a finished data set with the same parameters
    (``root/synthetic.json``) is reused as is.
    """
    root = Path(root)
    want = _params_dict(num_identities, images_per_identity, seed, image_size, pairs_per_fold)
    marker = root / MARKER
    if marker.exists():
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = None
        if have == want and (root / "landmarks.txt").exists() and (root / "pairs.txt").exists():
            names = [identity_name(i, num_identities) for i in range(num_identities)]
            _, fold_of = make_pairs(names, images_per_identity, pairs_per_fold, seed=seed)
            logger.info("reusing the synthetic data set in %s", root)
            return SyntheticDataset(
                root=root,
                images=root / "images",
                landmarks_file=root / "landmarks.txt",
                pairs_file=root / "pairs.txt",
                identities=names,
                images_per_identity=images_per_identity,
                fold_of=fold_of,
                landmarks=read_landmarks(root / "landmarks.txt"),
            )
    return make_synthetic_dataset(root, num_identities, images_per_identity, seed, image_size, pairs_per_fold, workers)
