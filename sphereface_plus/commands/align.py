"""``sphereface-plus align``: align an identity-folder tree of face images to a template.

The work is :func:`data_prep.prepare.align_tree` (landmark file or detector, workers, manifest, resume);
this module parses the command line and prints the summary.
"""
from __future__ import annotations

import argparse
import sys

from data_prep.detectors import SELECT_POLICIES, list_detectors
from sphereface_plus.templates import TEMPLATES
from data_prep.prepare import DEFAULT_LIST, LFW_OVERLAP_CASIA, align_tree

HELP = "align an identity-folder tree of face images to the SphereFace template (landmark file or detector)"

DESCRIPTION = """\
Align every image of an identity-folder tree (<input>/<identity>/<image>, CASIA-WebFace or LFW
layout) to a template: 5 landmarks from --landmarks (path then x1 y1 ... x5 y5, 0-based
pixels) or from the --detector, a least-squares similarity (MATLAB cp2tform semantics), a bilinear
warp. The output mirrors the input tree and holds:

  manifest.jsonl  one {"path", "status", "reason"} per input; status aligned | skipped | failed
  list.txt        'crop/path label' for the aligned crops, labels in sorted folder order (--list)
  packed.npy/.json  with --pack: all crops in one memory-mappable array + index

Exit status: 0 all aligned, 3 finished with some skipped/failed (see the manifest), 2 usage error.
Interrupted? Run the same command again: finished crops are kept, the rest is done.

examples:
  sphereface-plus align --input lfw/images --output lfw-112x96 --landmarks lfw/lfw_landmark.txt
  sphereface-plus align --input CASIA-WebFace --output casia-112x96 --exclude-lfw-overlap --pack
  sphereface-plus align --input photos --output crops --detector retinaface --template 112x112
"""

EXIT_OK, EXIT_INCOMPLETE = 0, 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="DIR", help="identity-folder tree: DIR/<identity>/<image>")
    p.add_argument("--output", required=True, metavar="DIR", help="where the aligned tree, manifest and list go")
    p.add_argument("--landmarks", metavar="FILE",
                   help="landmark file: 'relative/path x1 y1 ... x5 y5' per line (0-based pixels, tab or space "
                        "separated; LFW's lfw_landmark.txt); without it the --detector is run")
    p.add_argument("--landmark-base", type=int, default=0, choices=(0, 1),
                   help="pixel convention of the landmark file: 0 = OpenCV/numpy (first pixel at 0, default), "
                        "1 = MATLAB (first pixel at 1, e.g. points written by the original MATLAB MTCNN)")
    p.add_argument("--template", default="112x96", choices=sorted(TEMPLATES), help="crop template (default 112x96)")
    p.add_argument("--detector", default="mtcnn", choices=list_detectors(),
                   help="face detector used when no --landmarks is given (default mtcnn; weights: sphereface-plus fetch-weights)")
    p.add_argument("--device", default="cpu", help="device for the detector, e.g. cpu or cuda:0 (default cpu)")
    p.add_argument("--face-policy", default="center", choices=SELECT_POLICIES,
                   help="which face to keep when the detector finds several (default: nearest the image centre, as the original)")
    p.add_argument("--fallback", action="store_true",
                   help="align images without a face / landmark entry with a fixed mean landmark set (marked in the manifest) "
                        "instead of skipping them")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (default: all CPU cores)")
    p.add_argument("--format", default="jpg", choices=("jpg", "png"), help="output image format (default jpg)")
    p.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality 1-100 (default 95)")
    p.add_argument("--list", metavar="OUT.txt",
                   help=f"training list to write ('path label', paths relative to --output; default <output>/{DEFAULT_LIST})")
    p.add_argument("--exclude-lfw-overlap", action="store_true",
                   help="CASIA-WebFace: leave out the identities that are also in LFW (" + ", ".join(LFW_OVERLAP_CASIA) + ")")
    p.add_argument("--pack", action="store_true",
                   help="also write all crops into <output>/packed.npy + packed.json for fast training I/O")


def run(args: argparse.Namespace) -> int:
    # a UsageError is reported by the command line (one 'error:' line, exit 2)
    try:
        summary = align_tree(
            input_dir=args.input,
            output_dir=args.output,
            landmarks=args.landmarks,
            landmark_base=args.landmark_base,
            template=args.template,
            detector=args.detector,
            device=args.device,
            face_policy=args.face_policy,
            fallback=args.fallback,
            workers=args.workers,
            image_format=args.format,
            quality=args.quality,
            list_path=args.list,
            exclude_lfw_overlap=args.exclude_lfw_overlap,
            pack=args.pack,
        )
    except KeyboardInterrupt:
        print("sphereface-plus align: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    c = summary.counts
    print(
        f"aligned {c['aligned']} (of which {summary.resumed} from an earlier run), skipped {c['skipped']}, "
        f"failed {c['failed']} of {summary.total} inputs in {summary.seconds:.1f} s "
        f"({summary.rate:.0f} images/s for the new ones)"
    )
    if summary.unused_landmarks:
        print(f"landmarks: {summary.unused_landmarks} entries of {summary.landmarks_name} name no image under "
              f"--input (unused; normal when aligning a subset)")
    if summary.ignored:
        shown = ", ".join(summary.ignored[:5]) + (", ..." if len(summary.ignored) > 5 else "")
        print(f"ignored:  {len(summary.ignored)} non-image files at the top of --input: {shown}")
    print(f"manifest: {summary.manifest}")
    print(f"list:     {summary.list_path} ({summary.num_listed} crops, {summary.num_classes} classes)")
    if summary.pack_index:
        print(f"pack:     {summary.pack_index}")
    if c["skipped"] or c["failed"]:
        print("some inputs were not aligned: see the manifest (status 'skipped' / 'failed')")
        return EXIT_INCOMPLETE
    return EXIT_OK
