"""Speed of dataset alignment from a landmark file: `sphereface-plus align` with N worker processes
against a plain single-process loop written here, on the same images (all 13,233 of LFW by default).

Both do the whole job per image: read the JPEG, decode, fit the similarity, warp to 112x96, encode
as JPEG (quality 95) and write the file. The plain loop is the obvious script (cv2.imread ->
align_face -> cv2.imwrite, OpenCV limited to one thread); the command adds the manifest, the
journal, atomic renames and the list file, and spreads the images over worker processes.
The crops of both must be byte-identical (checked on a sample).

CPU time per image is reported beside wall-clock speed: on a machine shared with other jobs the
wall-clock figures depend on the load (shown in the table), CPU ms/image much less.

    .venv/bin/python bench/align_speed.py [--lfw ../shared/data/lfw] [--workers 2] [--limit 0] [--detect 100]

With --detect N it also times `align` with each detector (MTCNN, RetinaFace; no landmark file) on the
first N images, in one process (the detector's own threads do the work), including weight loading.

Writes bench/results/align.md and the table into docs/prepare.md (between the bench:align_speed markers).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from data_prep.geometry import align_face  # noqa: E402
from data_prep.prepare import align_tree  # noqa: E402

DEFAULT_LFW = ROOT.parent / "shared" / "data" / "lfw"
MARK_BEGIN, MARK_END = "<!-- bench:align_speed -->", "<!-- /bench:align_speed -->"


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def plain_loop(items, images: Path, out: Path) -> None:
    """The baseline: one process, one image after another."""
    cv2.setNumThreads(1)
    made = set()
    for rel, pts in items:
        img = cv2.imread(str(images / rel), cv2.IMREAD_COLOR)
        crop = align_face(img, pts)
        dst = out / rel
        if dst.parent not in made:
            dst.parent.mkdir(parents=True, exist_ok=True)
            made.add(dst.parent)
        cv2.imwrite(str(dst), crop, [cv2.IMWRITE_JPEG_QUALITY, 95])


def detect_rows(items, images: Path, out: Path):
    """`align` without a landmark file: detector + alignment per image, in this process."""
    from data_prep.detectors import create_detector

    src = out / "detect_input"
    for rel, _ in items:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (src / rel).exists():
            os.symlink(images / rel, src / rel)
    rows = []
    for name in ("mtcnn", "retinaface"):
        try:
            create_detector(name)  # load the weights once before timing (and skip when missing)
        except Exception as exc:  # noqa: BLE001 - any missing piece means: not measured
            rows.append(f"| {name} | - | - | - | - | - | not available: {type(exc).__name__} |")
            continue
        load = os.getloadavg()[0]
        t, c = time.perf_counter(), _cpu_self()
        s = align_tree(src, out / f"detect_{name}", detector=name, workers=1, quality=95)
        wall, cpu = time.perf_counter() - t, _cpu_self() - c
        n = len(items)
        rows.append(f"| {name} (CPU) | {n:,} | {wall:.1f} | {n / wall:,.1f} | {1e3 * cpu / n:.1f} | "
                    f"{s.counts['aligned']} | {load:.1f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help="folder with images/ and lfw_landmark.txt")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    ap.add_argument("--detect", type=int, default=100, metavar="N",
                    help="also time detection + alignment (MTCNN, RetinaFace, one process) on the first N images (0 = skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "align", help="scratch folder (deleted first)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "align.md")
    ap.add_argument("--readme", type=Path, default=ROOT / "docs" / "prepare.md")
    args = ap.parse_args()

    images, lm_file = args.lfw / "images", args.lfw / "lfw_landmark.txt"
    if not lm_file.is_file():
        print(f"LFW with lfw_landmark.txt not found at {args.lfw}: pass --lfw", file=sys.stderr)
        return 2
    lines = lm_file.read_text().splitlines()
    if args.limit:
        lines = lines[: args.limit]
    items = [(p[0], np.array(p[1:11], dtype=np.float64).reshape(5, 2)) for p in (ln.split() for ln in lines)]
    n = len(items)
    # the command reads the same subset: a landmark file with just these lines, and an input tree
    # of symlinked identity folders when --limit is used
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    sub_lm = args.out / "landmarks.txt"
    sub_lm.write_text("\n".join(lines) + "\n")
    src = images
    if args.limit:
        src = args.out / "input"
        src.mkdir()
        for rel, _ in items:
            (src / rel).parent.mkdir(exist_ok=True)
            os.symlink(images / rel, src / rel)

    rows = []
    load0 = os.getloadavg()[0]
    t, c = time.perf_counter(), _cpu_self()
    plain_loop(items, images, args.out / "plain")
    wall, cpu = time.perf_counter() - t, _cpu_self() - c
    rows.append(("plain loop, 1 process (cv2.imread / align_face / cv2.imwrite)", wall, cpu, load0))

    load1 = os.getloadavg()[0]
    t, c, cc = time.perf_counter(), _cpu_self(), _cpu_children()
    summary = align_tree(images if not args.limit else src, args.out / "command", landmarks=sub_lm,
                         workers=args.workers, quality=95)
    wall2 = time.perf_counter() - t
    cpu2 = (_cpu_self() - c) + (_cpu_children() - cc)
    assert summary.counts["aligned"] == n, summary.counts
    rows.append((f"`sphereface-plus align`, {args.workers} worker processes", wall2, cpu2, load1))

    # same crops, byte for byte
    rng = np.random.default_rng(0)
    for i in rng.choice(n, size=min(200, n), replace=False):
        rel = items[i][0]
        a = (args.out / "plain" / rel).read_bytes()
        b = (args.out / "command" / rel).read_bytes()
        assert a == b, f"crops differ for {rel}"

    det_rows = []
    if args.detect:
        det_rows = detect_rows(items[: args.detect], images, args.out)

    base = rows[0][1]
    table = [
        "| run | images | wall s | images/s | CPU ms / image | speed-up | load avg at start |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, wall_s, cpu_s, load in rows:
        table.append(
            f"| {name} | {n:,} | {wall_s:.1f} | {n / wall_s:,.0f} | {1e3 * cpu_s / n:.2f} | "
            f"{base / wall_s:.2f}x | {load:.1f} |"
        )
    if det_rows:
        table += ["", "| detection + alignment, 1 process | images | wall s | images/s | CPU ms / image | aligned | load avg at start |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        table += det_rows
    table_text = "\n".join(table)
    info = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, OpenCV {cv2.__version__}, "
        f"numpy {np.__version__}; LFW 250x250 JPEGs -> 112x96 JPEG q95"
    )
    print(table_text)
    print(info)

    args.results.parent.mkdir(parents=True, exist_ok=True)
    from sphereface_plus.utils import atomic_write_text

    atomic_write_text(
        args.results,
        "# Alignment speed (landmark file, LFW)\n\n"
        f"`.venv/bin/python bench/align_speed.py --workers {args.workers}"
        f"{f' --limit {args.limit}' if args.limit else ''}`\n\n"
        f"{table_text}\n\n{info}.\n\n"
        "Crops of the two runs are byte-identical (checked on 200 images). CPU ms / image counts all "
        "processes of a run (workers, start-up, manifest, list). When the cores are busy with other jobs "
        "(load average above the core count) the wall-clock columns measure the scheduler more than the "
        "code: Linux gives each session one share of CPU (autogroup), so extra worker processes of this "
        "run get no extra CPU time, and the speed-up of the workers only appears on idle cores.\n",
    )
    if args.readme.is_file():
        text = args.readme.read_text()
        if MARK_BEGIN in text and MARK_END in text:
            head, rest = text.split(MARK_BEGIN, 1)
            _, tail = rest.split(MARK_END, 1)
            atomic_write_text(args.readme, f"{head}{MARK_BEGIN}\n{table_text}\n\n{info}.\n{MARK_END}{tail}")
    shutil.rmtree(args.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
