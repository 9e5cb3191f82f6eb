"""``sphereface-plus compare IMG1 IMG2``: cosine similarity and same/different for two photos.

The work is :class:`eval.embedder.FaceEmbedder` (detect, align to the model's template, embed crop +
mirror); this module parses the command line and prints the verdict.
"""
from __future__ import annotations

import argparse

from data_prep.detectors import list_detectors
from eval import embedder as E
from sphereface_plus.commands.options import add_inference_arguments

HELP = "compare two face images: cosine similarity and same/different at the model's threshold"
DESCRIPTION = E.__doc__ + """
examples:
  sphereface-plus compare a.jpg b.jpg --checkpoint runs/x/checkpoints/last.pt
  sphereface-plus compare a.jpg b.jpg --checkpoint last.pt --threshold 0.35 --detector retinaface
  sphereface-plus compare crop_a.png crop_b.png --checkpoint last.pt --aligned

The threshold: --threshold, else the one stored in the checkpoint. A checkpoint from 'train' stores
one when the run verified (eval.pairs); for any other, store one with
'sphereface-plus verify lfw --checkpoint last.pt --root lfw-112x96 --pairs pairs.txt --save-model model.pt'.

exit status: 0 done (also without a threshold: the similarity is printed); 2 usage or input error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image1", help="first image (any size; a face is detected and aligned)")
    parser.add_argument("image2", help="second image")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or exported model (.onnx)")
    parser.add_argument("--threshold", type=float, help="cosine threshold (default: the one stored in the checkpoint)")
    parser.add_argument("--detector", default="mtcnn", choices=list_detectors(), help="face detector (default mtcnn)")
    parser.add_argument("--aligned", action="store_true", help="the images are already aligned crops: no detection")
    parser.add_argument("--no-flip", action="store_true", help="embed the crop only (default: crop + mirror)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_inference_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # input mistakes raise ToolkitErrors: the command line prints them as one 'error:' line, exit 2
    images = [E.read_image(args.image1), E.read_image(args.image2)]
    emb = E.FaceEmbedder(args.checkpoint, device=args.device, detector=args.detector, flip=not args.no_flip,
                         precision=args.precision, runtime=args.runtime)
    f = emb.embed(images, aligned=args.aligned, names=[args.image1, args.image2])
    sim = float(f[0] @ f[1])
    print(f"cosine similarity: {sim:.4f}")
    threshold = args.threshold if args.threshold is not None else emb.threshold
    if threshold is None:
        print(f"no threshold: {args.checkpoint} stores none (its training run did not verify). Pass --threshold T, "
              f"or store one: sphereface-plus verify lfw --checkpoint {args.checkpoint} --root <aligned LFW> "
              f"--pairs pairs.txt --save-model model.pt, then compare with --checkpoint model.pt")
        return 0
    source = "given" if args.threshold is not None else "from the checkpoint"
    verdict = "same person" if sim > threshold else "different people"
    print(f"{verdict} (threshold {threshold:.4f} {source})")
    return 0
