"""Speed of detection + alignment: MTCNN and RetinaFace on LFW images, one process.

Each run does the whole job per image: read and decode the JPEG (cv2.imread), detect, keep the face
nearest the image centre, warp it to the 112x96 template (``data_prep.align_face``). The baseline,
run in the same process on the same images, is alignment from the landmark file (read + warp, no
detector), so the ratio column says what detection costs on top of it. MTCNN runs with the original's
pyramid factor 0.85 and, for comparison, with facenet-pytorch's default 0.709.

Torch and onnxruntime are limited to one intra-op thread (``--threads``): the detectors' tensors are
small, and on a machine shared with other jobs more threads were measured to be much slower. CPU time
per image is reported beside wall-clock speed because wall-clock figures depend on the load (shown).
With ``--device cuda`` (when torch sees a GPU) MTCNN also runs on the GPU.

    .venv/bin/python bench/detect_speed.py [--lfw ../shared/data/lfw] [--limit 300] [--device cuda]

Writes bench/results/detect.md and the table into docs/prepare.md (between the bench:detect_speed markers).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK_BEGIN, MARK_END = "<!-- bench:detect_speed -->", "<!-- /bench:detect_speed -->"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _run(items, images: Path, job):
    """Time ``job(image, landmarks)`` over all items (decode included); returns (wall, cpu, faces)."""
    import cv2

    found = 0
    t, c = time.perf_counter(), _cpu()
    for rel, lm in items:
        img = cv2.imread(str(images / rel))
        found += job(img, lm)
    return time.perf_counter() - t, _cpu() - c, found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", default=str(ROOT.parent / "shared" / "data" / "lfw"))
    ap.add_argument("--limit", type=int, default=300, help="images, spread evenly over LFW")
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime intra-op threads")
    ap.add_argument("--device", default="cpu", help="also run MTCNN on this torch device (e.g. cuda)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detect.md"))
    ap.add_argument("--readme", default=str(ROOT / "docs" / "prepare.md"))
    args = ap.parse_args()

    import cv2
    import numpy as np
    import torch

    from data_prep import align_face
    from data_prep.detectors import create_detector, select_face
    from sphereface_plus.utils import atomic_write_text

    lfw = Path(args.lfw)
    if not (lfw / "lfw_landmark.txt").exists():
        print(f"LFW not found at {lfw} (needs images/ and lfw_landmark.txt)", file=sys.stderr)
        return 2
    lines = (lfw / "lfw_landmark.txt").read_text().splitlines()
    step = max(1, len(lines) // args.limit)
    items = []
    for line in lines[::step][: args.limit]:
        f = line.split("\t")
        items.append((f[0], np.array(f[1:], dtype=np.float64).reshape(5, 2) - 1.0))
    images = lfw / "images"
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)

    def from_file(img, lm):
        align_face(img, lm)
        return 1

    def with_detector(det):
        def job(img, _lm):
            boxes, points = det.detect(img)
            if len(boxes) == 0:
                return 0
            align_face(img, select_face(boxes, points, img.shape)[2])
            return 1

        return job

    runs = [("landmark file (baseline: read + align)", "-", from_file)]
    runs.append(("MTCNN, factor 0.85 (the original's)", "cpu", with_detector(create_detector("mtcnn"))))
    runs.append(("MTCNN, factor 0.709 (facenet-pytorch default)", "cpu",
                 with_detector(create_detector("mtcnn", factor=0.709))))
    runs.append(("RetinaFace-MobileNet0.25 (onnxruntime)", "cpu",
                 with_detector(create_detector("retinaface", num_threads=args.threads))))
    if args.device != "cpu":
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            runs.append(("MTCNN, factor 0.85 (the original's)", args.device, with_detector(create_detector("mtcnn", device=args.device))))
        else:
            print(f"device {args.device!r} not available here; GPU rows skipped", file=sys.stderr)

    rows = []
    for name, dev, job in runs:
        _run(items[:5], images, job)  # warm-up: first-call allocations, CUDA context
        load = os.getloadavg()[0]
        wall, cpu, found = _run(items, images, job)
        rows.append((name, dev, wall, cpu, found, load))
        print(f"{name} [{dev}]: {len(items) / wall:.1f} images/s, {1e3 * cpu / len(items):.1f} CPU ms/image, "
              f"{found}/{len(items)} faces, load {load:.1f}", flush=True)

    n = len(items)
    base = rows[0][2]
    table = [
        "| run | device | images | faces found | images/s | ms / image | CPU ms / image | time vs baseline | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, dev, wall, cpu, found, load in rows:
        table.append(f"| {name} | {dev} | {n} | {found} | {n / wall:,.1f} | {1e3 * wall / n:.1f} | "
                     f"{1e3 * cpu / n:.1f} | {wall / base:.1f}x | {load:.1f} |")
    table_text = "\n".join(table)
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    info = (f"{n} LFW images (250x250), {os.cpu_count()} cores{gpu}, {args.threads} torch/onnxruntime thread(s), "
            f"Python {platform.python_version()}, torch {torch.__version__}, OpenCV {cv2.__version__}; "
            f"`.venv/bin/python bench/detect_speed.py --limit {args.limit}"
            f"{' --device ' + args.device if args.device != 'cpu' else ''}`")
    report = (
        "# Detection + alignment speed\n\n"
        "Per image: JPEG read and decode, detection, the face nearest the centre, warp to 112x96. "
        "The baseline aligns from the landmark file instead of detecting (same process, same images). "
        "The machine was shared with other jobs: the load average column shows how busy it was; CPU ms / "
        "image is the load-independent figure.\n\n"
        f"{table_text}\n\n{info}.\n"
    )
    atomic_write_text(args.out, report)
    readme = Path(args.readme)
    if readme.exists():
        text = readme.read_text()
        if MARK_BEGIN in text and MARK_END in text:
            head, rest = text.split(MARK_BEGIN, 1)
            tail = rest.split(MARK_END, 1)[1]
            atomic_write_text(readme, f"{head}{MARK_BEGIN}\n{table_text}\n\n{info}.\n{MARK_END}{tail}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
