"""LFW open-set identification (1:N) through ``sphereface-plus gallery``, with a real model.

Protocol (docs/gallery.md#lfw-identification):

- gallery: the first image (``<Name>_0001.jpg``) of each of the 1,680 people with two or more images;
- mated probes: their other 7,484 images; non-mated probes: the one image of each of the 4,069 others;
- rank-1: the fraction of mated probes whose best identity is theirs;
- DIR at FPIR = 1%: the threshold ``t`` is the ``(floor(0.01 n) + 1)``-th largest best score of the ``n``
  non-mated probes (at most 1% of them score above it), and DIR is the fraction of mated probes that
  are ranked 1 with a score above ``t`` (docs/theory.md#gallery-open-set);
- also the gallery's own threshold (calibrated at FPIR 1% on held-out enrolments, stored with it): the
  FPIR it reaches on the 4,069 unknown people, and the DIR at it.

The features of all 13,233 images are computed once (with ``--checkpoint``: the toolkit's pipeline, aligned
with the 5 points of ``lfw_landmark.txt`` or detected with ``--detect``; with ``--dlib``: dlib's released
ResNet through dlib-bin, with dlib's own detector, 5-point shape predictor and 150x150 face chip), saved
(``features.npz``), written as gallery and probe embeddings with their model record, and then the gallery
is built and searched with the command line::

    sphereface-plus gallery build --gallery OUT/gallery --embeddings OUT/gallery.npy --ids OUT/gallery_ids.txt
    sphereface-plus gallery search --gallery OUT/gallery --embeddings OUT/probes.npy --top-k 5 --json OUT/search.json

The figures are computed from ``search.json`` and cross-checked against an independent brute force
(``eval.ijb_1n.identification_report`` on the same features: the same rank-1). Results:
``bench/results/lfw_identification.md``.

    python bench/lfw_identification.py --checkpoint MODEL.pt [--lfw ../shared/data/lfw] [--out runs/lfw-ident]
    python bench/lfw_identification.py --dlib
    python bench/lfw_identification.py --features feats.npz     # 'paths' relative to images/, 'features'
    python bench/lfw_identification.py --features runs/lfw-identification/features.npz \
        --model-record runs/lfw-identification/gallery.model.json  # the scoring again, without embedding
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.gallery import threshold_at_fpir  # noqa: E402
from eval.gallery_inputs import save_embeddings  # noqa: E402

DEFAULT_LFW = ROOT.parent / "shared" / "data" / "lfw"
FPIR = 0.01


def lfw_split(images: Path) -> Tuple[List[str], List[str], List[str]]:
    """``(gallery, mated probes, non-mated probes)`` relative paths, as the module docstring says."""
    people: Dict[str, List[str]] = {}
    for d in sorted(p for p in images.iterdir() if p.is_dir()):
        files = sorted(f.name for f in d.iterdir() if f.suffix.lower() == ".jpg")
        if files:
            people[d.name] = [f"{d.name}/{f}" for f in files]
    gallery = [v[0] for v in people.values() if len(v) >= 2]
    mated = [f for v in people.values() if len(v) >= 2 for f in v[1:]]
    nonmated = [v[0] for v in people.values() if len(v) == 1]
    return gallery, mated, nonmated


def identity(rel: str) -> str:
    return rel.split("/")[0]


def toolkit_features(args, paths: List[str]) -> Tuple[np.ndarray, dict]:
    """The toolkit's pipeline: the gallery's own image embedder (align, embed crop + mirror, normalise)."""
    from eval.features import read_landmarks
    from eval.gallery_inputs import ImageEmbedder

    images = args.lfw / "images"
    landmarks = None if args.detect else read_landmarks(args.lfw / "lfw_landmark.txt")
    emb = ImageEmbedder(args.checkpoint, device=args.device, precision=args.precision, landmarks=landmarks,
                        batch_size=64)
    feats, ok, failed = emb.embed([(p, images / p, identity(p)) for p in paths])
    if failed:
        raise SystemExit(f"{len(failed)} images could not be embedded, e.g. {failed[0]}")
    return feats, emb.model(feats.shape[1])


def dlib_features(args, paths: List[str]) -> Tuple[np.ndarray, dict]:
    """dlib's released face model through dlib-bin: its detector (largest face nearest the centre; a box
    around the file's 5 points when it finds none), 5-point shape predictor, 150x150 chip, 128-d descriptor."""
    import importlib.util

    import dlib

    from eval.features import read_landmarks
    from sphereface_plus.utils import progress, sha256_file

    # the files of PyPI face-recognition-models (its own helpers need pkg_resources, which may be absent)
    models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    detector = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    model_path = models / "dlib_face_recognition_resnet_model_v1.dat"
    net = dlib.face_recognition_model_v1(str(model_path))
    marks = read_landmarks(args.lfw / "lfw_landmark.txt")
    out = np.empty((len(paths), 128), np.float32)
    fallback = 0
    for i, rel in enumerate(progress(paths, desc="dlib", unit="image")):
        img = dlib.load_rgb_image(str(args.lfw / "images" / rel))
        h, w = img.shape[:2]
        boxes = list(detector(img, 0)) or list(detector(img, 1))
        if boxes:
            box = min(boxes, key=lambda b: (b.center().x - w / 2) ** 2 + (b.center().y - h / 2) ** 2)
        else:
            fallback += 1
            p = marks[rel]
            cx, cy = p[:, 0].mean(), p[:, 1].mean()
            s = 1.9 * max(np.ptp(p[:, 0]), np.ptp(p[:, 1]))
            box = dlib.rectangle(int(cx - s / 2), int(cy - s / 2), int(cx + s / 2), int(cy + s / 2))
        out[i] = np.asarray(net.compute_face_descriptor(img, shape(img, box)), dtype=np.float32)
    print(f"dlib: no face detected in {fallback} of {len(paths)} images (a box around the file's 5 points was used)")
    model = {"file": Path(model_path).name, "path": str(model_path), "sha256": sha256_file(model_path),
             "backbone": f"dlib's face ResNet (29 conv layers, 128-d; dlib-bin {dlib.__version__})",
             "preprocessing": {"template": "dlib 150x150 chip", "color": "rgb"}, "flip": "none", "dim": 128}
    return out / np.linalg.norm(out, axis=1, keepdims=True), model


def cli(out: Path, *argv: str) -> None:
    """Run ``sphereface-plus ARGV`` as a user would; its output goes to ``out``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(out, "w") as fh:
        subprocess.run([sys.executable, "-m", "sphereface_plus", *argv], check=True, env=env, stdout=fh,
                       stderr=subprocess.STDOUT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a toolkit checkpoint (.pt) or exported model (.onnx)")
    src.add_argument("--dlib", action="store_true", help="dlib's released model through dlib-bin")
    src.add_argument("--features", help=".npz with 'paths' (relative to images/) and 'features' (e.g. OUT/features.npz "
                                        "of an earlier run)")
    ap.add_argument("--model-record", type=Path, help="with --features: the model that made them (the .model.json an "
                                                      "earlier run wrote beside OUT/gallery.npy)")
    ap.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help="LFW folder with images/ and lfw_landmark.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "lfw-identification")
    ap.add_argument("--detect", action="store_true", help="detect faces (MTCNN) instead of the landmark file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "lfw_identification.md")
    args = ap.parse_args()
    from eval.features import load_features_npz, save_features_npz
    from eval.ijb_1n import identification_report

    gallery, mated, nonmated = lfw_split(args.lfw / "images")
    paths = gallery + mated + nonmated
    print(f"gallery {len(gallery)} people, {len(mated)} mated probes, {len(nonmated)} non-mated probes")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.features:
        have, feats_all = load_features_npz(args.features)
        index = {p: i for i, p in enumerate(have)}
        feats = feats_all[[index[p] for p in paths]].astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        model = json.loads(args.model_record.read_text())["model"] if args.model_record else None
        source = (f"{model['file']} (sha256 {model['sha256'][:12]}..., {model['backbone']}), " if model else "") + \
            f"features read from {args.features}"
    elif args.dlib:
        feats, model = dlib_features(args, paths)
        source = "dlib's dlib_face_recognition_resnet_model_v1 through dlib-bin (dlib's own alignment)"
    else:
        feats, model = toolkit_features(args, paths)
        source = f"{args.checkpoint} ({'MTCNN' if args.detect else 'lfw_landmark.txt'} alignment, the toolkit's)"
    embed_s = time.time() - t0
    save_features_npz(args.out / "features.npz", paths, feats)
    ng, nm = len(gallery), len(mated)
    save_embeddings(args.out / "gallery.npy", feats[:ng], model, gallery)
    (args.out / "gallery_ids.txt").write_text("".join(identity(p) + "\n" for p in gallery))
    save_embeddings(args.out / "probes.npy", feats[ng:], model, mated + nonmated)
    gdir = args.out / "gallery"
    if gdir.exists():
        import shutil

        shutil.rmtree(gdir)
    build = ["gallery", "build", "--gallery", str(gdir), "--embeddings", str(args.out / "gallery.npy"), "--ids",
             str(args.out / "gallery_ids.txt"), "--index", "exact", "--fpir", str(FPIR)]
    search = ["gallery", "search", "--gallery", str(gdir), "--embeddings", str(args.out / "probes.npy"), "--top-k",
              "5", "--json", str(args.out / "search.json")]
    cli(args.out / "build.txt", *build)
    t1 = time.time()
    cli(args.out / "search.txt", *search)
    search_s = time.time() - t1
    res = json.loads((args.out / "search.json").read_text())
    results = res["results"]
    top = np.array([r["matches"][0]["identity"] for r in results])
    best = np.array([r["matches"][0]["score"] for r in results], dtype=np.float64)
    truth = np.array([identity(p) for p in mated])
    hit = top[:nm] == truth
    rank1 = float(hit.mean())
    at = threshold_at_fpir(best[nm:], FPIR)
    dir_at = float(np.mean(hit & (best[:nm] > at["threshold"])))
    t_gal = res["threshold"]
    fpir_gal = float(np.mean(best[nm:] > t_gal))
    dir_gal = float(np.mean(hit & (best[:nm] > t_gal)))
    decided = np.array([r["decision"] for r in results])
    assert np.array_equal(decided[:nm] == truth, hit & (best[:nm] > t_gal))
    # independent check: brute force 1:N (eval.ijb) on the same features
    names = sorted(set(identity(p) for p in gallery))
    code = {n: i for i, n in enumerate(names)}
    subjects = np.array([code[identity(p)] for p in mated] + [-1 - i for i in range(len(nonmated))])
    ref = identification_report(feats[ng:], subjects, feats[:ng], np.array([code[identity(p)] for p in gallery]),
                                fpirs=(FPIR,), ranks=(1, 5))
    assert abs(ref["rank"]["1"] - rank1) < 1e-12, (ref["rank"]["1"], rank1)
    rank5 = ref["rank"]["5"]
    # and DIR from a float64 brute force of its own (every probe against every gallery image)
    f64 = feats.astype(np.float64)
    sims = f64[ng:] @ f64[:ng].T
    best64, top64 = sims.max(1), np.array([identity(gallery[j]) for j in sims.argmax(1)])
    t64 = threshold_at_fpir(best64[nm:], FPIR)["threshold"]
    dir64 = float(np.mean((top64[:nm] == truth) & (best64[:nm] > t64)))
    lines = [
        "# LFW open-set identification with the gallery",
        "",
        f"Model: {source}. Gallery: {ng} people (their first image); probes: {nm} mated, {len(nonmated)} non-mated "
        f"(the people with one image). Exact index, {feats.shape[1]}-d features.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"{'features read from the file' if args.features else f'embedding {embed_s:.0f} s'}, search of "
        f"{len(results)} probes {search_s:.1f} s (the command, with its start-up).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| rank-1 (mated probes) | {100 * rank1:.2f}% |",
        f"| rank-5 | {100 * rank5:.2f}% |",
        f"| DIR at FPIR = 1% (threshold {at['threshold']:.4f} on the {len(nonmated)} non-mated probes, FPIR "
        f"{100 * at['fpir_reached']:.2f}%) | {100 * dir_at:.2f}% |",
        f"| the gallery's own threshold {t_gal:.4f} (calibrated at FPIR 1% on held-out enrolments): FPIR on the "
        f"unknown people | {100 * fpir_gal:.2f}% |",
        f"| ... DIR at it | {100 * dir_gal:.2f}% |",
        "",
        f"Cross-checks on the same features: rank-1 of the brute-force 1:N of eval.ijb_1n.identification_report "
        f"{100 * ref['rank']['1']:.2f}%; DIR at FPIR = 1% from a float64 brute force {100 * dir64:.2f}% "
        f"(threshold {t64:.4f}).",
        "",
        "Commands (after the features were written):",
        "",
        "    sphereface-plus " + " ".join(build).replace(str(ROOT) + "/", ""),
        "    sphereface-plus " + " ".join(search).replace(str(ROOT) + "/", ""),
    ]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    from sphereface_plus.utils import atomic_write_text

    atomic_write_text(args.report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
