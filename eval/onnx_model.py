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
import threading
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
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


#: slices of a batch per thread (OnnxModel): a thread held back by the OS then delays the batch by one slice
SLICES_PER_THREAD = 4


class OnnxLoadError(CheckpointError):
    """onnxruntime refuses the file (a damaged graph, or an opset newer than the installed onnxruntime)."""


class OnnxModel(torch.nn.Module):
    """An exported ONNX embedding network as a module: ``forward(x)`` -> ``B x D`` features.

    ``x`` is a preprocessed batch (any float dtype, any memory format, any device); the result is
    float32 on ``x``'s device. ``output`` picks the graph output: ``feature`` (before
    normalisation, the default: what the checkpoint's backbone returns) or ``embedding``.
    The module has no parameters; ``.to()`` and ``.eval()`` are accepted and change nothing, and it
    runs its own float32 graph whatever the precision asked (``supports_autocast = False``).

    On a CPU the batch is cut into slices of whole images that one single-threaded session runs side
    by side on ``num_threads`` threads (default: torch's thread count, one per core), each thread taking
    the next slice when it is done with one (``session.run`` is thread-safe and releases the GIL); up to
    :data:`SLICES_PER_THREAD` slices per thread, so that a thread the OS holds back delays the batch by
    one small slice, not by its share. Each core runs whole convolutions on its own images, with no
    hand-over between the cores inside each operator: measured faster than one session with
    ``num_threads`` intra-op threads on the same batch (``docs/performance.md#cpu-inference``). A batch of
    one image cannot be cut: it runs in a second session with ``num_threads`` intra-op threads, made the
    first time one comes. Slices are whole images, so the features are those of one run.
    """

    supports_autocast = False

    def __init__(self, path, device="cpu", output: str = FEATURE_OUTPUT, num_threads: Optional[int] = None):
        super().__init__()
        self.path = str(path)
        # follow torch's thread setting so that both backends share the machine the same way
        self.num_threads = max(1, int(num_threads or torch.get_num_threads()))
        self.providers = _providers(torch.device(device))
        self.lanes = self.num_threads if self.providers == ["CPUExecutionProvider"] else 1
        self.session = self._session(1 if self.lanes > 1 else self.num_threads)
        self._wide = None  # the num_threads-thread session for a batch of one (made on first use)
        self._pool = None  # the lanes' threads (made on first use)
        self._lock = threading.Lock()
        outputs = [o.name for o in self.session.get_outputs()]
        if output not in outputs:
            raise CheckpointError(f"{path} has outputs {outputs}, no {output!r}: export it with sphereface-plus "
                                  f"export (which writes {EMBEDDING_OUTPUT!r} and {FEATURE_OUTPUT!r})")
        self.output = output
        self.input_name = self.session.get_inputs()[0].name

    def _session(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(self.path, sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise OnnxLoadError(f"onnxruntime cannot load {self.path}: {str(e).splitlines()[0]}; export it again "
                                f"with sphereface-plus export") from None

    def _run(self, session, batch: np.ndarray) -> np.ndarray:
        (out,) = session.run([self.output], {self.input_name: batch})
        return out

    def run_numpy(self, batch: np.ndarray) -> np.ndarray:
        """Features of a preprocessed float32 ``B x 3 x H x W`` array (C-contiguous), as a numpy array."""
        n = batch.shape[0]
        if self.lanes == 1:
            return self._run(self.session, batch)
        if n == 1:
            with self._lock:  # made once, also when several threads embed with this model
                if self._wide is None:
                    self._wide = self._session(self.num_threads)
            return self._run(self._wide, batch)
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="onnxruntime-lane")
        # about SLICES_PER_THREAD slices per thread, of at least 2 images (a network's FC layer reads its weights
        # once per slice), and at least one slice per thread
        size = min(max(2, -(-n // (self.lanes * SLICES_PER_THREAD))), -(-n // self.lanes))
        futures = [self._pool.submit(self._run, self.session, batch[i:i + size]) for i in range(0, n, size)]
        return np.concatenate([f.result() for f in futures])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.run_numpy(batch)).to(x.device)


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
