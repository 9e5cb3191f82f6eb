"""``sphereface-plus import``: released weights to a checkpoint of this toolkit.

  --from caffe        SphereFace / SphereFace+ release: NET.prototxt WEIGHTS.caffemodel (sphere20/36/64)
  --from insightface  arcface_torch backbone.pth (iResNet-18..200)
  --from opensphere   OpenSphere backbone_<iter>.pth [head_<iter>.pth] or model_<step>.pth (SFNet, iResNet)
  --from pytorch      any PyTorch state dict of a network the toolkit has, whatever its key names:
                      --backbone NAME [--backbone-option k=v ...] (sphere*, sfnet*, iresnet*, mobilefacenet)
  --from onnx         any face-embedding ONNX file (insightface model zoo...) -> a toolkit .onnx
  --from mhe-gan      MHE-GAN TensorFlow 1 checkpoint (PREFIX, e.g. model.ckpt-200000) -> G and D

The face checkpoint (``--out MODEL.pt``) is used like any other: ``verify``, ``compare``, ``export``,
``verify ijb|packs``, ``FaceEmbedder``, ``train.init_from`` (when it has a head). It records the input
convention the weights were trained with (template, colour order, pixel normalisation, flip policy,
embedding layer); the embedding code applies it, so the model is scored as its authors scored it.
``--template/--color/--mean/--std/--flip`` override the source's defaults (a model trained otherwise);
for ``--from pytorch`` they state the port's convention (default: the toolkit's own, BGR,
(x - 127.5) / 128, crop and mirror concatenated; docs/import.md lists the flags of known ports).
The MHE-GAN checkpoint is read by ``sphereface-plus gan --eval-only --init-from MODEL.pt``.

Nothing is written before the input is read and checked; the output is written atomically.
exit status: 0 written; 2 usage or input error (one 'error:' line says what, where and how to fix it).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sphereface_plus.errors import UsageError
from sphereface_plus.importers import SOURCES
from sphereface_plus.importers.torch_state import HEAD_LAYOUTS
from sphereface_plus.utils import sha256_file

logger = logging.getLogger(__name__)

HELP = "import released weights (SphereFace Caffe, insightface, OpenSphere, ONNX, MHE-GAN TF1) as a toolkit model"
DESCRIPTION = __doc__ + """
examples:
  sphereface-plus import --from caffe sphereface_deploy.prototxt sphereface_model.caffemodel --out sphere20.pt
  sphereface-plus import --from insightface ms1mv3_arcface_r50/backbone.pth --out r50.pt
  sphereface-plus import --from opensphere models/backbone_70000.pth models/head_70000.pth --arch sfnet20 --out sf20.pt
  sphereface-plus import --from pytorch sphere20a_20171020.pth --backbone sphere20 \
      --backbone-option residual_bias=true --flip none --out sphere20a.pt
  sphereface-plus import --from pytorch 068.ckpt --backbone mobilefacenet --backbone-option scale=1 \
      --backbone-option embedding_dim=128 --template 112x96 --color rgb --out mobilefacenet.pt
  sphereface-plus import --from onnx w600k_r50.onnx --out w600k_r50_sp.onnx
  sphereface-plus import --from mhe-gan sn_mhe/model.ckpt-200000 --out mhe_gan.pt
  sphereface-plus verify lfw --checkpoint sphere20.pt --root lfw-112x96 --pairs pairs.txt
"""

#: how many SRC files each source takes (min, max)
SRC_COUNT = {"caffe": (2, 2), "insightface": (1, 1), "opensphere": (1, 2), "pytorch": (1, 1), "onnx": (1, 1),
             "mhe-gan": (1, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the format of SRC")
    parser.add_argument("src", nargs="+", metavar="SRC", help="the released file(s), see above")
    parser.add_argument("--out", required=True, help="the checkpoint to write (.pt; .onnx for --from onnx)")
    parser.add_argument("--backbone", "--arch", dest="arch", default=None, metavar="NAME",
                        help="the toolkit backbone: needed by --from pytorch (sphere20, mobilefacenet, iresnet50, "
                             "sfnet20_bn...: sphereface_plus.models.list_backbones()); for the other sources, when "
                             "the file does not say it (default: found from the weights)")
    parser.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                        help="--from pytorch: an argument of the backbone's builder, repeatable (e.g. scale=1, "
                             "embedding_dim=128, residual_bias=true); values are read as YAML")
    parser.add_argument("--head", default="a_softmax",
                        help="--from opensphere: the toolkit head that receives the classifier weights (default "
                             "a_softmax; sphereface_plus.heads.list_heads())")
    parser.add_argument("--head-layout", choices=HEAD_LAYOUTS, default=None,
                        help="--from opensphere: how the head's 'w' is stored: classes-by-dim (OpenSphere main) or "
                             "dim-by-classes (OpenSphere_v0, SphereFace2_ICLR21); default: read from its shape, and "
                             "for a square w from the checkpoint's layout (docs/import.md#opensphere-head)")
    g = parser.add_argument_group("input convention (default: the source's own, see docs/import.md)")
    g.add_argument("--template", choices=("112x96", "112x112"), default=None, help="crop template the model was trained on")
    g.add_argument("--color", choices=("bgr", "rgb"), default=None, help="channel order the model takes")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="pixel mean (one value, or three in the model's channel order)")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="S", help="pixel divisor (one value or three)")
    g.add_argument("--flip", choices=("concat", "sum", "none"), default=None,
                   help="test-time mirror: concat [f(x), f(flip x)], sum f(x) + f(flip x), or none")


def _override_args(args) -> dict:
    return {"template": args.template, "color": args.color, "mean": args.mean, "std": args.std, "flip": args.flip}


def run(args) -> int:
    from sphereface_plus.utils import atomic_torch_save

    lo, hi = SRC_COUNT[args.source]
    if not lo <= len(args.src) <= hi:
        want = str(lo) if lo == hi else f"{lo} or {hi}"
        raise UsageError(f"--from {args.source} takes {want} SRC file(s), got {len(args.src)}: "
                         f"{' '.join(args.src)} (see sphereface-plus import --help)")
    out = Path(args.out)
    if any(out.resolve() == Path(s).resolve() for s in args.src):
        raise UsageError(f"--out {out} is one of the inputs; choose another file name")
    overrides = _override_args(args)
    if args.backbone_option and args.source != "pytorch":
        raise UsageError(f"--backbone-option is for --from pytorch; --from {args.source} reads the architecture from "
                         f"the file")
    if args.head_layout and args.source != "opensphere":
        raise UsageError("--head-layout is for --from opensphere")
    if args.source == "onnx":
        if out.suffix.lower() != ".onnx":
            raise UsageError(f"--from onnx writes an .onnx model (verify, compare and IJB read it as they read "
                             f"'sphereface-plus export' files): give --out NAME.onnx, not {out}")
        return import_onnx_file(args.src[0], out, overrides)
    if out.suffix.lower() == ".onnx":
        raise UsageError(f"--out {out}: --from {args.source} writes a .pt checkpoint (export it to ONNX afterwards "
                         f"with sphereface-plus export)")
    if args.source == "mhe-gan":
        if any(v is not None for v in overrides.values()):
            raise UsageError("--template/--color/--mean/--std/--flip are for face models, not --from mhe-gan")
        from sphereface_plus.importers.mhe_gan import import_mhe_gan

        ckpt = import_mhe_gan(args.src[0])
        atomic_torch_save(ckpt, out)
        print(f"wrote {out}: MHE-GAN generator and {'SN ' if ckpt['config']['sn'] else ''}discriminator from "
              f"{args.src[0]}; score it with: sphereface-plus gan --eval-only --init-from {out} --data <cifar-10>")
        return 0
    if args.source == "caffe":
        from sphereface_plus.importers.caffe import import_caffe

        ckpt = import_caffe(args.src[0], args.src[1], arch=args.arch)
    elif args.source == "pytorch":
        from sphereface_plus.importers.by_structure import import_pytorch

        if not args.arch:
            raise UsageError("--from pytorch needs --backbone NAME: the toolkit network the state dict is of "
                             "(sphereface_plus.models.list_backbones(); docs/import.md#from-pytorch)")
        ckpt = import_pytorch(args.src[0], args.arch, parse_backbone_options(args.backbone_option),
                              template=args.template)
    elif args.source == "insightface":
        from sphereface_plus.importers.torch_state import import_insightface

        ckpt = import_insightface(args.src[0], arch=args.arch)
    else:
        from sphereface_plus.importers.torch_state import import_opensphere

        ckpt = import_opensphere(args.src[0], args.src[1] if len(args.src) > 1 else None, arch=args.arch,
                                 head_name=args.head, head_layout=args.head_layout)
    from sphereface_plus.importers.preprocessing import PREPROCESSING_KEY, Preprocessing, parse_override

    pre = parse_override(Preprocessing.from_dict(ckpt[PREPROCESSING_KEY]), **overrides)
    if tuple(pre.input_size) != tuple(ckpt["config"]["model"]["input_size"]):
        h, w = ckpt["config"]["model"]["input_size"]
        raise UsageError(f"--template {pre.template} does not fit the imported network, which takes {h}x{w} crops")
    ckpt[PREPROCESSING_KEY] = pre.to_dict()
    atomic_torch_save(ckpt, out)
    model = ckpt["config"]["model"]
    head = f", head {ckpt['config']['head'].get('name')} ({ckpt['head']['weight'].shape[0]} classes)" if "head" in ckpt else ", no head"
    opts = "".join(f" {k}={v}" for k, v in model.get("kwargs", {}).items())
    ignored = ckpt["imported_from"].get("ignored")
    extra = f"; ignored {len(ignored)} trailing tensors: {', '.join(ignored[:3])}" if ignored else ""
    print(f"wrote {out}: {model['backbone']}{opts} {model['input_size'][0]}x{model['input_size'][1]} "
          f"{model['embedding_dim']}-d ({args.source}){head}; input: {pre.describe()}{extra}")
    return 0


def parse_backbone_options(items) -> dict:
    """``['scale=1', 'blocks=[1, 4, 6, 2]']`` -> ``{'scale': 1, 'blocks': [1, 4, 6, 2]}`` (values as YAML)."""
    from sphereface_plus.config import yaml_load

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--backbone-option {item!r}: write KEY=VALUE, e.g. scale=1")
        try:
            out[key.strip()] = yaml_load(value) if value.strip() else ""
        except Exception as e:  # yaml's errors
            raise UsageError(f"--backbone-option {item!r}: the value is not valid YAML ({type(e).__name__})") from None
    return out


def import_onnx_file(src, out: Path, overrides: dict, tolerance: float = 1e-4) -> int:
    """``--from onnx``: rewrite, check against the original under onnxruntime, then write (atomically).

    The check: 8 crops rendered by ``data_prep.synthetic`` (aligned with their exact landmarks), given to
    the original model with the source convention computed in numpy and to the rewritten one with the
    toolkit's input; the ``feature`` outputs must agree within ``tolerance`` relative to their norm.
    """
    import numpy as np
    import onnxruntime as ort

    import sphereface_plus
    from eval.export import synthetic_crops
    from eval.onnx_model import FLIP_KEY, FLIP_POLICY, FORMAT_KEY, FORMAT_VERSION, PREPROCESSING, format_size
    from sphereface_plus.importers.foreign_onnx import FEATURE_OUTPUT, INPUT_NAME, convert_onnx, guess_preprocessing, read_onnx
    from sphereface_plus.importers.preprocessing import parse_override
    from sphereface_plus.utils import atomic_write_bytes

    model = read_onnx(src)
    pre = guess_preprocessing(model, overrides.get("template"))
    pre = parse_override(pre, **overrides)
    meta = {
        FORMAT_KEY: FORMAT_VERSION, "format": "onnx", "backbone": f"onnx:{Path(src).name}",
        "template": pre.template, "input_size": format_size(pre.input_size),
        "input": f"{INPUT_NAME}: B x 3 x {pre.input_size[0]} x {pre.input_size[1]} float32, dynamic B",
        "preprocessing": f"{PREPROCESSING} (the graph converts it to the imported model's own input: {pre.describe()})",
        "flip_policy": FLIP_POLICY if pre.flip == "concat" else f"{pre.flip} (the imported model's own)",
        FLIP_KEY: pre.flip, "threshold": "none", "iteration": "none", "source_checkpoint": Path(src).name,
        "source_sha256": sha256_file(src),
        "toolkit_version": str(getattr(sphereface_plus, "__version__", "unknown")),
    }
    data = convert_onnx(model, pre, meta)
    crops = synthetic_crops(pre.template, 8)
    toolkit = np.stack([(c.transpose(2, 0, 1).astype(np.float32) - 127.5) / 128 for c in crops])
    pixels = np.stack([(c[:, :, ::-1] if pre.color == "rgb" else c).transpose(2, 0, 1) for c in crops]).astype(np.float32)
    source = (pixels - np.array(pre.mean, np.float32).reshape(1, 3, 1, 1)) / np.array(pre.std, np.float32).reshape(1, 3, 1, 1)
    try:
        orig = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        want = np.concatenate([orig.run(None, {orig.get_inputs()[0].name: source[i:i + 1]})[0] for i in range(len(crops))])
        new = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = new.run([FEATURE_OUTPUT], {INPUT_NAME: toolkit})[0]
    except Exception as e:  # onnxruntime's own exception types
        raise UsageError(f"onnxruntime cannot run {src} or its rewrite ({str(e).splitlines()[0]})") from None
    diff = float((np.abs(got - want) / np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)).max())
    if not diff <= tolerance:
        raise UsageError(f"the rewritten model differs from {src} by {diff:.3g} (relative), more than {tolerance:g}; "
                         f"nothing was written")
    atomic_write_bytes(out, data)
    print(f"wrote {out}: {Path(src).name} behind the toolkit's input; input: {pre.describe()}; checked on 8 synthetic "
          f"crops (batch of 8 vs one by one): max relative difference {diff:.2e}")
    return 0
