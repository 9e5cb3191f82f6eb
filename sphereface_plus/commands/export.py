"""``sphereface-plus export``: a checkpoint's embedding network as ONNX or TorchScript, checked first.

The work is :func:`eval.export.export_model` (the module's docstring says what the file holds and how
the check works); the file is written only when the check passes.
"""
from __future__ import annotations

import argparse

from eval import export as E

HELP = "export a checkpoint's embedding network to ONNX or TorchScript, checked against PyTorch"
DESCRIPTION = E.__doc__ + """
examples:
  sphereface-plus export --checkpoint runs/x/checkpoints/last.pt --format onnx --out sphere20.onnx
  sphereface-plus export --checkpoint last.pt --format onnx --out m.onnx --check-images lfw-112x96/Aaron_Peirsol
  sphereface-plus export --checkpoint last.pt --format torchscript --out sphere20.ts.pt
  sphereface-plus verify lfw --checkpoint sphere20.onnx --root lfw-112x96 --pairs pairs.txt
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) to export")
    parser.add_argument("--format", default="onnx", choices=E.FORMATS, help="onnx (default) or torchscript")
    parser.add_argument("--out", required=True, help="file to write (only after the check passes; atomic)")
    parser.add_argument("--check-images", metavar="DIR",
                        help="folder of aligned crops of the model's size to check the export on (the first "
                             "--check-count in sorted order); default: synthetic faces from data_prep.synthetic, "
                             "aligned with their exact landmarks. The output says which were used")
    parser.add_argument("--check-count", type=int, default=E.DEFAULT_CHECK_COUNT,
                        help=f"crops in the check batch (default {E.DEFAULT_CHECK_COUNT}; a batch of one is checked too)")
    parser.add_argument("--tolerance", type=float, default=E.DEFAULT_TOLERANCE,
                        help=f"largest accepted difference from PyTorch (default {E.DEFAULT_TOLERANCE:g})")


def run(args: argparse.Namespace) -> int:
    # a failed check is an ExportCheckError (exit status 3), bad input another ToolkitError (2): one line each
    result = E.export_model(args.checkpoint, args.out, args.format, args.check_images, args.check_count,
                            args.tolerance)
    print(f"wrote {result['out']} ({result['format']}, {result['bytes'] / 1e6:.1f} MB)")
    print(f"check on {result['check_images']}, batch sizes {result['batch_sizes']}: max |diff| from PyTorch "
          f"{result['max_abs_diff_embedding']:.2e} (embedding), {result['max_rel_diff_feature']:.2e} (feature, "
          f"relative); tolerance {args.tolerance:g}")
    return 0
