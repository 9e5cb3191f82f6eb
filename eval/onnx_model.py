"""Exported embedding models (ONNX) behind the same call interface as the torch backbone.

Everything that embeds images (``eval.features.iter_embeddings``: batching, flip, precision) takes a
``torch.nn.Module`` that maps a preprocessed ``B x 3 x H x W`` batch to ``B x D`` features. An
``.onnx`` file written by ``sphereface-plus export`` is wrapped in :class:`OnnxModel`, a module whose
``forward`` runs onnxruntime, so a checkpoint and its export share one code path and give the same
features (``eval.features.load_embedding_model`` dispatches on the ``.onnx`` suffix).

The exported graph has two outputs (``eval.export``): ``embedding`` (L2-normalised, what a deployment
uses) and ``feature`` (the backbone output before normalisation). The toolkit's own evaluation uses
``feature``: LFW-style verification concatenates the crop and mirror features before normalising,
and IJB pooling weighs faces by their feature norm, so only the raw output reproduces a checkpoint's
results exactly.

The metadata (template, input size, preprocessing, flip policy, compare threshold...) is a flat
``str -> str`` dict: ONNX ``metadata_props``, and the JSON extra file ``sphereface_plus.json`` of a
TorchScript archive. :func:`read_export_metadata` reads either; :func:`info_from_metadata` turns it
into the ``info`` dict that :func:`eval.features.load_embedding_model` returns for a checkpoint.
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from sphereface_plus.errors import CheckpointError, MissingFileError, UsageError
from sphereface_plus.export_format import (EMBEDDING_OUTPUT, FEATURE_OUTPUT, FLIP_KEY, FLIP_POLICY,  # noqa: F401
                                           FORMAT_KEY, FORMAT_VERSION, INPUT_NAME, PREPROCESSING, TORCHSCRIPT_META)

logger = logging.getLogger(__name__)


def format_size(size) -> str:
    """``(112, 96)`` -> ``"112x96"`` (height x width)."""
    return f"{int(size[0])}x{int(size[1])}"


def parse_size(text: str, where: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CheckpointError(f"{where}: input_size {text!r} is not HxW (e.g. 112x96); re-export the model "
                              f"with sphereface-plus export") from None
    return h, w


def read_export_metadata(path) -> Dict[str, str]:
    """The metadata dict of an exported ``.onnx`` or TorchScript file (no weights are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"exported model {path} does not exist")
    if zipfile.is_zipfile(path):  # a TorchScript archive: <name>/extra/sphereface_plus.json
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + TORCHSCRIPT_META)]
            if not names:
                raise CheckpointError(f"{path} is a zip archive without extra/{TORCHSCRIPT_META}: not a TorchScript "
                                      f"file written by sphereface-plus export")
            return {str(k): str(v) for k, v in json.loads(z.read(names[0]).decode()).items()}
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError
        raise CheckpointError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e}); export it again "
                              f"with sphereface-plus export") from None
    return {p.key: p.value for p in model.metadata_props}


def info_from_metadata(meta: Dict[str, str], where: str) -> Dict[str, object]:
    """The ``info`` dict of :func:`eval.features.load_embedding_model` from an export's metadata."""
    if meta.get(FORMAT_KEY) != FORMAT_VERSION:
        raise CheckpointError(f"{where} was not written by sphereface-plus export (metadata {FORMAT_KEY!r} is "
                              f"{meta.get(FORMAT_KEY)!r}, expected {FORMAT_VERSION!r}); export the checkpoint with "
                              f"sphereface-plus export --checkpoint CKPT --format onnx --out MODEL.onnx")
    threshold = meta.get("threshold", "none")
    iteration = meta.get("iteration", "none")
    return {
        "backbone": meta.get("backbone"),
        "input_size": parse_size(meta.get("input_size", ""), where),
        "template": meta.get("template", "112x96"),
        "threshold": None if threshold == "none" else float(threshold),
        "iteration": None if iteration == "none" else int(iteration),
        "embedding_dim": int(meta["embedding_dim"]) if "embedding_dim" in meta else None,
        "flip_policy": meta.get(FLIP_KEY, "concat"),
        "flip_policy_text": meta.get("flip_policy"),
    }


def _providers(device: torch.device):
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        logger.warning("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); running on CPU")
    return ["CPUExecutionProvider"]


class OnnxModel(torch.nn.Module):
    """An exported ONNX embedding network as a module: ``forward(x)`` -> ``B x D`` features.

    ``x`` is a preprocessed batch (any float dtype, any memory format, any device); the result is
    float32 on ``x``'s device. ``output`` picks the graph output: ``feature`` (before
    normalisation, the default: what the checkpoint's backbone returns) or ``embedding``.
    The module has no parameters; ``.to()`` and ``.eval()`` are accepted and change nothing.
    """

    def __init__(self, path, device="cpu", output: str = FEATURE_OUTPUT, num_threads: Optional[int] = None):
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        opts = ort.SessionOptions()
        # follow torch's thread setting so that both backends share the machine the same way
        opts.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts,
                                                providers=_providers(torch.device(device)))
        except Exception as e:  # onnxruntime raises its own exception types
            raise CheckpointError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}; export it again "
                                  f"with sphereface-plus export") from None
        outputs = [o.name for o in self.session.get_outputs()]
        if output not in outputs:
            raise CheckpointError(f"{path} has outputs {outputs}, no {output!r}: export it with sphereface-plus "
                                  f"export (which writes {EMBEDDING_OUTPUT!r} and {FEATURE_OUTPUT!r})")
        self.output = output
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output], {self.input_name: batch})
        return torch.from_numpy(out).to(x.device)


def load_onnx_model(path, device="cpu") -> Tuple[OnnxModel, Dict[str, object]]:
    """``(OnnxModel, info)`` for an ``.onnx`` file written by ``sphereface-plus export``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ONNX model {path} does not exist")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UsageError("reading .onnx models needs onnxruntime: pip install onnxruntime") from None
    info = info_from_metadata(read_export_metadata(path), str(path))
    model = OnnxModel(path, device=device)
    flip = str(info["flip_policy"])
    from sphereface_plus.importers.preprocessing import FLIP_POLICIES

    if flip not in FLIP_POLICIES:
        raise CheckpointError(f"{path}: metadata {FLIP_KEY!r} is {flip!r}, not one of {', '.join(FLIP_POLICIES)}")
    logger.info("loaded %s (ONNX export of %s, input %dx%d)", path, info["backbone"], *info["input_size"])
    return model, info
