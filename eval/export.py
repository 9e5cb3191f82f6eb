"""A checkpoint's embedding network as ONNX or TorchScript, checked before it is written.

The exported network takes the toolkit's preprocessed crops, ``B x 3 x H x W`` float32 (H x W =
112 x 96 or 112 x 112, BGR, ``(x - 127.5) / 128``), with a dynamic batch size, and returns the
L2-normalised embedding. The file's metadata (ONNX ``metadata_props``; the TorchScript extra file
``sphereface_plus.json``) holds the template, input size, preprocessing, flip policy, the compare
threshold stored in the checkpoint, the backbone, the source checkpoint's sha256 and the result of
the export check.

ONNX: two graph outputs, ``embedding`` (L2-normalised) and ``feature`` (before normalisation; the
toolkit's ``verify``, ``compare`` and ``FaceEmbedder`` use it when given an ``.onnx`` file, so their
results match the checkpoint's). TorchScript: ``forward(x)`` returns the embedding and
``features(x)`` the feature before normalisation.

The check: the exported model runs on a batch of aligned crops and on a batch of one, and the
file is written (atomically) only if every output is within ``--tolerance`` (1e-4) of PyTorch's:
the embedding by max absolute difference, the feature by max absolute difference relative to each
row's norm. The crops come from ``--check-images DIR`` (aligned crops of the model's size; the
first ``--check-count`` in sorted order) or, without it, from faces rendered by
``data_prep.synthetic`` (seed 0) and aligned with their exact landmarks: deterministic, no data
needed. The command prints which were used.

Exit status: 0 the file was written and checked; 2 bad input (an ``error:`` line says what and how
to fix it); 3 the check failed and nothing was written.

ONNX export uses ``torch.onnx.export(..., dynamo=True)`` (needs the ``onnx`` and ``onnxscript``
packages); the legacy TorchScript-based ONNX exporter is deprecated upstream. TorchScript export
uses ``torch.jit.trace_module``; ``torch.jit`` is deprecated upstream too, so prefer ONNX.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.image_files import IMAGE_EXTENSIONS
from eval.onnx_model import format_size
from sphereface_plus.export_format import (EMBEDDING_OUTPUT, FEATURE_OUTPUT, FLIP_KEY, FLIP_POLICY, FORMAT_KEY,
                                           FORMAT_VERSION, INPUT_NAME, PREPROCESSING, TORCHSCRIPT_META)
from sphereface_plus.importers.preprocessing import Preprocessing
from sphereface_plus.errors import InputFileError, MissingFileError, ToolkitError, UsageError
from sphereface_plus.utils import sha256_file

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_COUNT = 32
SYNTHETIC_SEED = 0



class ExportCheckError(ToolkitError, RuntimeError):
    """The exported model does not reproduce PyTorch's outputs; nothing was written (exit status 3)."""

    exit_status = 3


class EmbeddingNet(torch.nn.Module):
    """What is exported: ``forward`` = L2-normalised embedding, ``features`` = backbone output."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class _BothOutputs(torch.nn.Module):
    """The ONNX graph: ``(embedding, feature)``, the normalisation computed from the same feature."""

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(x)
        return F.normalize(f, dim=1), f


# --------------------------------------------------------------------------- the check crops


def synthetic_crops(template: str, count: int, seed: int = SYNTHETIC_SEED) -> List[np.ndarray]:
    """``count`` aligned crops of distinct synthetic identities (``data_prep.synthetic``), deterministic."""
    from data_prep import align_face
    from data_prep.synthetic_faces import identity_params, image_params, render_image

    crops = []
    for i in range(count):
        image, landmarks = render_image(identity_params(seed, i), image_params(seed, i, 0), 250)
        crops.append(align_face(image, landmarks, template=template))
    return crops


def folder_crops(folder, input_size: Tuple[int, int], count: int) -> List[np.ndarray]:
    """The first ``count`` images (sorted relative paths) under ``folder``, checked against the model size."""
    import cv2

    from eval.features import fit_crop

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"--check-images {folder} is not a folder; give a folder of aligned crops "
                               f"({format_size(input_size)}) or leave it out to check on synthetic crops")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())[:count]
    if not files:
        raise InputFileError(f"--check-images {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} images; give a folder "
                             f"of aligned crops (sphereface-plus align writes them)")
    crops = []
    for p in files:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise InputFileError(f"--check-images: cannot read {p} (not an image); remove it or choose another folder")
        try:
            crops.append(fit_crop(image, input_size, str(p)))
        except ValueError as e:
            raise InputFileError(str(e)) from None
    return crops


def check_batch(info: Dict[str, object], check_images=None, count: int = DEFAULT_CHECK_COUNT) -> Tuple[torch.Tensor, str]:
    """The preprocessed check batch and a description of where its crops came from."""
    from eval.features import preprocess

    input_size = tuple(info["input_size"])
    if check_images is not None:
        crops = folder_crops(check_images, input_size, count)
        where = f"{len(crops)} crops from {check_images}"
    else:
        crops = synthetic_crops(str(info["template"]), count)
        where = f"{len(crops)} synthetic crops (data_prep.synthetic, seed {SYNTHETIC_SEED}, template {info['template']})"
    return torch.stack([preprocess(c) for c in crops]), where


# --------------------------------------------------------------------------- exporters


def _example(batch: torch.Tensor) -> torch.Tensor:
    # a batch of 2: torch.export specialises sizes 0 and 1, so tracing with 1 would fix the batch size
    return batch[:2] if batch.shape[0] >= 2 else batch.repeat(2, 1, 1, 1)


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the exporter's loggers to WARNING for the duration (they log every graph pass at INFO)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(net: EmbeddingNet, batch: torch.Tensor, metadata: Dict[str, str]) -> bytes:
    """The ONNX file (bytes): input ``input`` (dynamic batch), outputs ``embedding`` and ``feature``."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        raise UsageError(f"ONNX export needs the onnx and onnxscript packages ({e}): "
                         f"pip install onnx onnxscript") from None
    batch_dim = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        warnings.simplefilter("ignore", category=FutureWarning)
        program = torch.onnx.export(_BothOutputs(net).eval(), (_example(batch),), dynamo=True,
                                    input_names=[INPUT_NAME], output_names=[EMBEDDING_OUTPUT, FEATURE_OUTPUT],
                                    dynamic_shapes=({0: batch_dim},), verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def _set_onnx_metadata(data: bytes, metadata: Dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def export_torchscript(net: EmbeddingNet, batch: torch.Tensor, metadata: Dict[str, str]) -> bytes:
    """The TorchScript archive (bytes): ``forward`` -> embedding, ``features`` -> feature."""
    with torch.no_grad(), warnings.catch_warnings():
        # the backbone's input-shape check becomes a constant in the trace: right, H and W are fixed
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit is deprecated upstream
        traced = torch.jit.trace_module(net.eval(), {"forward": _example(batch), "features": _example(batch)})
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={TORCHSCRIPT_META: json.dumps(metadata, sort_keys=True)})
    return buf.getvalue()


def run_exported(fmt: str, data: bytes, x: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """``(embedding, feature)`` of the exported model (bytes of format ``fmt``) on batch ``x``."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        emb, feat = session.run([EMBEDDING_OUTPUT, FEATURE_OUTPUT], {INPUT_NAME: x.numpy()})
        return emb, feat
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return module(x).numpy(), module.features(x).numpy()


def output_differences(fmt: str, data: bytes, batch: torch.Tensor, reference: torch.nn.Module) -> Dict[str, float]:
    """Largest differences of the exported model from ``reference`` on ``batch`` and on its first crop alone.

    ``embedding``: max absolute difference of the L2-normalised outputs; ``feature``: max absolute
    difference of the raw outputs divided by each reference row's norm (a scale-free 1e-4).
    """
    emb_diff = feat_diff = 0.0
    reference = reference.eval()
    for x in ([batch, batch[:1]] if batch.shape[0] > 1 else [batch]):
        with torch.inference_mode():
            ref_feat = reference(x).double()
        ref_emb = F.normalize(ref_feat, dim=1).numpy()
        emb, feat = run_exported(fmt, data, x)
        ref_feat = ref_feat.numpy()
        emb_diff = max(emb_diff, float(np.abs(emb - ref_emb).max()))
        row_norm = np.linalg.norm(ref_feat, axis=1, keepdims=True)
        feat_diff = max(feat_diff, float((np.abs(feat - ref_feat) / np.maximum(row_norm, 1e-12)).max()))
    return {"embedding": emb_diff, "feature": feat_diff, "batch_sizes": sorted({int(batch.shape[0]), 1})}


def check_export(fmt: str, data: bytes, batch: torch.Tensor, reference: torch.nn.Module,
                 tolerance: float = DEFAULT_TOLERANCE, where: str = "the check crops") -> Dict[str, float]:
    """:func:`output_differences`, raising :class:`ExportCheckError` when one exceeds ``tolerance``."""
    diffs = output_differences(fmt, data, batch, reference)
    if not (diffs["embedding"] <= tolerance and diffs["feature"] <= tolerance):  # NaN fails too
        raise ExportCheckError(
            f"export check failed: the {fmt} model differs from PyTorch by {diffs['embedding']:.3g} (embedding, max "
            f"abs) and {diffs['feature']:.3g} (feature, relative) on {where}, more than --tolerance {tolerance:g}; "
            f"nothing was written. Try the other --format, or report it with your torch/onnx/onnxruntime versions")
    return diffs


# --------------------------------------------------------------------------- the command


def build_metadata(info: Dict[str, object], checkpoint: Path, embedding_dim: int, fmt: str) -> Dict[str, str]:
    """The file's metadata (``str -> str``); ``check_*`` entries are added after the check."""
    import sphereface_plus

    threshold = info.get("threshold")
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "format": fmt,
        "backbone": str(info["backbone"]),
        "embedding_dim": str(int(embedding_dim)),
        "template": str(info["template"]),
        "input_size": format_size(info["input_size"]),
        "input": f"{INPUT_NAME}: B x 3 x {info['input_size'][0]} x {info['input_size'][1]} float32, dynamic B",
        "preprocessing": PREPROCESSING if not info.get("preprocessing") else
        f"{PREPROCESSING} (the graph converts it to the imported model's own input: "
        f"{Preprocessing.from_dict(info['preprocessing']).describe()})",
        "outputs": (f"{EMBEDDING_OUTPUT}: L2-normalised B x {embedding_dim}; {FEATURE_OUTPUT}: the same before "
                    f"normalisation" if fmt == "onnx" else
                    f"forward(x): L2-normalised B x {embedding_dim}; features(x): the same before normalisation"),
        "flip_policy": FLIP_POLICY if info.get("flip_policy", "concat") == "concat" else
        f"{info['flip_policy']} (the imported model's own, sphereface_plus.importers.preprocessing)",
        FLIP_KEY: str(info.get("flip_policy") or "concat"),
        "threshold": "none" if threshold is None else repr(float(threshold)),
        "threshold_note": "cosine threshold for compare, chosen on the flip-concatenated feature",
        "iteration": "none" if info.get("iteration") is None else str(int(info["iteration"])),
        "source_checkpoint": checkpoint.name,
        "source_sha256": sha256_file(checkpoint),
        "toolkit_version": str(getattr(sphereface_plus, "__version__", "unknown")),
        "torch_version": torch.__version__,
    }


def export_model(checkpoint, out, fmt: str = "onnx", check_images=None, check_count: int = DEFAULT_CHECK_COUNT,
                 tolerance: float = DEFAULT_TOLERANCE, reference: Optional[torch.nn.Module] = None) -> Dict[str, object]:
    """Export ``checkpoint``'s backbone to ``out`` (format ``fmt``) after checking it; returns the check summary.

    ``reference`` is the PyTorch model the export must reproduce: the checkpoint's backbone unless
    given (another one is for testing that the check refuses a wrong export). Raises
    :class:`ExportCheckError` (and writes nothing) when the check fails.
    """
    from eval.features import load_embedding_model
    from sphereface_plus.utils import atomic_write_bytes

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if checkpoint.suffix.lower() == ".onnx":
        raise UsageError(f"--checkpoint {checkpoint} is already an ONNX export; give the training checkpoint (.pt)")
    if not checkpoint.is_file():
        raise MissingFileError(f"checkpoint {checkpoint} does not exist; give a training checkpoint such as "
                               f"runs/x/checkpoints/last.pt")
    if out.resolve() == checkpoint.resolve():
        raise UsageError(f"--out {out} is the checkpoint itself; choose another file name")
    if not tolerance > 0:
        raise UsageError(f"--tolerance must be positive, got {tolerance}")
    if check_count < 1:
        raise UsageError(f"--check-count must be at least 1, got {check_count}")
    try:
        backbone, info = load_embedding_model(checkpoint)
    except (KeyError, ValueError, RuntimeError) as e:  # not a checkpoint of this toolkit
        if isinstance(e, ToolkitError):
            raise
        raise InputFileError(f"{checkpoint} cannot be loaded as a training checkpoint: {str(e).splitlines()[0]}") from None
    data, summary = export_checked(backbone, info, checkpoint, fmt, check_images, check_count, tolerance, reference)
    atomic_write_bytes(out, data)
    logger.info("wrote %s (%s, %.1f MB)", out, fmt, len(data) / 1e6)
    return {"out": str(out), **summary}


def export_checked(backbone: torch.nn.Module, info: Dict[str, object], checkpoint: Path, fmt: str = "onnx",
                   check_images=None, check_count: int = DEFAULT_CHECK_COUNT, tolerance: float = DEFAULT_TOLERANCE,
                   reference: Optional[torch.nn.Module] = None) -> Tuple[bytes, Dict[str, object]]:
    """``(file bytes, check summary)`` of ``backbone`` (loaded from ``checkpoint``, with its ``info``) exported to
    ``fmt`` and checked against ``reference`` (default: the backbone itself); :class:`ExportCheckError` when the
    check fails. Nothing is written: :func:`export_model` and the runtime's cache (``eval.runtime``) write it."""
    batch, where = check_batch(info, check_images, check_count)
    with torch.inference_mode():
        embedding_dim = int(backbone(batch[:1]).shape[1])
    metadata = build_metadata(info, Path(checkpoint), embedding_dim, fmt)
    net = EmbeddingNet(backbone).eval()
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    data = exporter(net, batch, metadata)
    diffs = check_export(fmt, data, batch, reference if reference is not None else backbone, tolerance, where)
    metadata.update({"check_max_abs_diff_embedding": f"{diffs['embedding']:.3g}",
                     "check_max_rel_diff_feature": f"{diffs['feature']:.3g}",
                     "check_images": where, "check_tolerance": f"{tolerance:g}"})
    # only metadata changes from the checked bytes: ONNX metadata_props / the TorchScript extra file
    data = _set_onnx_metadata(data, metadata) if fmt == "onnx" else exporter(net, batch, metadata)
    return data, {"format": fmt, "bytes": len(data), "check_images": where,
                  "max_abs_diff_embedding": diffs["embedding"], "max_rel_diff_feature": diffs["feature"],
                  "batch_sizes": diffs["batch_sizes"], "metadata": metadata}
