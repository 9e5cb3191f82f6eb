"""Batched feature extraction for verification: aligned crops (or raw images + landmarks) -> features.

The feature of an image is the embedding of the crop concatenated with the embedding of its
horizontal mirror (docs/theory.md#lfw-protocol: 1024-d for a 512-d model), as in the SphereFace evaluation.
Images are read by DataLoader workers, preprocessed like training (BGR, ``(x - 127.5) / 128``), and
embedded under ``torch.inference_mode`` with the crop and its mirror in one forward pass. The
backbone runs in float32 or, with ``precision="bf16"`` (the ``auto`` choice on hardware with native
bf16), under bfloat16 autocast with NHWC tensors; features are always returned float32.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_prep.datasets import to_network_tensor as preprocess  # the one model transform
from data_prep.geometry import cut_wide_crop, to_bgr
from data_prep.landmarks import read_landmarks  # noqa: F401 (the verify and megaface commands use F.read_landmarks)
from sphereface_plus.errors import CheckpointError, InputFileError, MissingFileError
from sphereface_plus.importers.preprocessing import PREPROCESSING_KEY, Preprocessing, wrap_backbone
from sphereface_plus.utils import progress

logger = logging.getLogger(__name__)

#: how to fix a crop of the wrong size, for commands that can align on the fly (verify, megaface export)
ALIGN_HINT = "align the images first (sphereface-plus align) or pass --landmarks to align them on the fly"


def fit_crop(image: np.ndarray, input_size: Optional[Tuple[int, int]], name: str,
             hint: str = ALIGN_HINT) -> np.ndarray:
    """Check an aligned crop against the model's ``(H, W)``; a 112x112 crop feeds a 112x96 model.

    ``hint``: the fix named in the error (it depends on the command's options)."""
    image = to_bgr(image)
    if input_size is None or tuple(image.shape[:2]) == tuple(input_size):
        return image
    fitted = cut_wide_crop(image, input_size)
    if fitted is not None:
        return fitted
    h, w = image.shape[:2]
    raise InputFileError(
        f"{name} is {h}x{w} (HxW) but the model expects {input_size[0]}x{input_size[1]} aligned crops: {hint}"
    )


class ImageFiles(Dataset):
    """Images ``root/rel_path`` as model tensors; aligned from ``landmarks[rel_path]`` when given."""

    def __init__(
        self,
        root,
        rel_paths: Sequence[str],
        input_size: Optional[Tuple[int, int]] = None,
        landmarks: Optional[Mapping[str, np.ndarray]] = None,
        template: str = "112x96",
    ):
        self.root = Path(root)
        self.rel_paths = list(rel_paths)
        self.input_size = tuple(input_size) if input_size is not None else None
        self.landmarks = landmarks
        self.template = template
        if landmarks is not None:
            missing = [p for p in self.rel_paths if p not in landmarks]
            if missing:
                raise InputFileError(f"{len(missing)} of {len(self.rel_paths)} images have no landmarks: "
                                 + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))

    def __len__(self) -> int:
        return len(self.rel_paths)

    def crop(self, i: int) -> np.ndarray:
        """Image ``i`` as the network sees it before normalisation: the aligned BGR uint8 crop."""
        import cv2

        rel = self.rel_paths[i]
        image = cv2.imread(str(self.root / rel), cv2.IMREAD_COLOR)
        if image is None:
            raise InputFileError(f"cannot read image {self.root / rel} (missing or not an image)")
        if self.landmarks is not None:
            from data_prep import align_face

            image = align_face(image, self.landmarks[rel], template=self.template)
        return fit_crop(image, self.input_size, str(self.root / rel))

    def __getitem__(self, i: int) -> torch.Tensor:
        return preprocess(self.crop(i))


class EncodedImages(Dataset):
    """Encoded images (JPEG/PNG bytes, e.g. from an insightface pack), already aligned."""

    def __init__(self, images: Sequence[bytes], input_size: Optional[Tuple[int, int]] = None):
        self.images = images
        self.input_size = tuple(input_size) if input_size is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, i: int) -> np.ndarray:
        """Image ``i`` decoded and fitted to the model's size (BGR uint8)."""
        import cv2

        image = cv2.imdecode(np.frombuffer(self.images[i], dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise InputFileError(f"pack image {i} cannot be decoded")
        return fit_crop(image, self.input_size, f"pack image {i}")

    def __getitem__(self, i: int) -> torch.Tensor:
        return preprocess(self.crop(i))


class ArrayImages(Dataset):
    """In-memory BGR crops (``names`` and ``hint`` go into the wrong-size error)."""

    def __init__(self, images: Sequence[np.ndarray], input_size: Optional[Tuple[int, int]] = None,
                 names: Optional[Sequence[str]] = None, hint: str = ALIGN_HINT):
        self.images = images
        self.input_size = tuple(input_size) if input_size is not None else None
        self.names = list(names) if names is not None else None
        self.hint = hint

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        name = self.names[i] if self.names is not None else f"image {i}"
        return preprocess(fit_crop(self.images[i], self.input_size, name, self.hint))


def inference_setup(model, precision: str = "auto", device="cpu",
                    channels_last: Optional[bool] = None) -> Tuple[str, bool]:
    """Resolve ``precision`` (``auto|fp32|bf16``) and ``channels_last`` for embedding with ``model`` on ``device``.

    ``auto`` is bf16 where the device has native bf16 (:func:`sphereface_plus.engine.precision.
    resolve_precision`); ``channels_last=None`` turns NHWC on with bf16 on a CPU, where it measured
    faster (``bench/results/embed_throughput.md``). A model that is not an ``nn.Module`` or sets
    ``supports_autocast = False`` (an ONNX Runtime session wrapper: it runs its own float32 graph)
    embeds as it is: fp32, no memory-format change. Returns ``(precision, channels_last)``.
    """
    from sphereface_plus.engine.precision import EMBED_SETTINGS, resolve_precision
    from sphereface_plus.errors import UsageError

    if precision not in EMBED_SETTINGS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(EMBED_SETTINGS)}")
    if not isinstance(model, torch.nn.Module) or not getattr(model, "supports_autocast", True):
        return "fp32", False
    device = torch.device(device)
    resolved = resolve_precision(precision, device, what="--precision")
    if channels_last is None:
        channels_last = resolved == "bf16" and device.type == "cpu"
    return resolved, bool(channels_last)


def embed_batch(model: torch.nn.Module, x: torch.Tensor, flip: bool = True, precision: str = "fp32",
                channels_last: bool = False) -> torch.Tensor:
    """float32 embeddings of a preprocessed batch; with ``flip`` ``[f(x), f(mirror(x))]`` concatenated.

    The crop and its mirror go through ONE forward of a doubled batch (in bf16 + channels_last it ties
    with two forwards, in float32 two forwards measured 1.10x faster once: ``bench/results/
    embed_throughput.md``; kept as one forward, the bf16 path being the default where it is fast). ``precision`` is a resolved one (``fp32`` or
    ``bf16``, see :func:`inference_setup`): only the backbone runs under autocast, the features come
    back float32. ``channels_last`` feeds the batch in NHWC (the model should be converted too).
    """
    from sphereface_plus.engine.precision import autocast

    n = x.shape[0]
    if flip:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, precision):
        out = model(x)
    out = out.float()
    if not flip:
        return out
    a, b = out.split(n)
    return torch.cat([a, b], dim=1)


def iter_embeddings(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    flip: bool = True,
    device="cpu",
    num_workers: int = 0,
    desc: str = "features",
    precision: str = "fp32",
    channels_last: Optional[bool] = None,
) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(index of the first image, float32 features)`` batch by batch, in dataset order.

    Lets long exports write each batch as soon as it is ready (resumable, bounded memory).
    ``precision`` (``auto|fp32|bf16``) and ``channels_last`` are resolved by :func:`inference_setup`.
    The library default stays ``fp32`` so that callers such as the trainer's periodic evaluation keep
    their numbers; the commands (verify, compare, megaface export) and ``FaceEmbedder`` default to
    ``auto``. With channels_last the model is converted to NHWC in place (same weights, same results).
    """
    device = torch.device(device)
    precision, channels_last = inference_setup(model, precision, device, channels_last)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the runtime's one notice line is eval.runtime.load_inference_model's
    logger.debug("embedding on %s in %s%s", device, precision, ", channels_last" if channels_last else "")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    start = 0
    with torch.inference_mode():
        for x in progress(loader, desc=desc, unit="batch"):
            x = x.to(device, non_blocking=True)
            feats = embed_batch(model, x, flip, precision, channels_last).cpu().numpy()
            yield start, feats
            start += feats.shape[0]


def extract_from_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    flip: bool = True,
    device="cpu",
    num_workers: int = 0,
    desc: str = "features",
    precision: str = "fp32",
    channels_last: Optional[bool] = None,
) -> np.ndarray:
    """Run ``model`` over a dataset of preprocessed tensors; ``N x D`` float32 numpy, in order."""
    chunks = [f for _, f in iter_embeddings(model, dataset, batch_size, flip, device, num_workers, desc,
                                            precision, channels_last)]
    if not chunks:
        raise InputFileError("no images to embed")
    return np.concatenate(chunks)


def extract_features(
    model: torch.nn.Module,
    root,
    rel_paths: Sequence[str],
    batch_size: int = 64,
    flip: bool = True,
    device="cpu",
    num_workers: int = 0,
    input_size: Optional[Tuple[int, int]] = None,
    landmarks: Optional[Mapping[str, np.ndarray]] = None,
    template: str = "112x96",
    precision: str = "fp32",
    channels_last: Optional[bool] = None,
) -> np.ndarray:
    """Features of the images ``root/rel_path`` (``N x D`` float32; ``D`` doubles with ``flip``).

    Images are aligned crops, or raw images aligned on the fly when ``landmarks`` (relative path ->
    ``5 x 2``) is given. Missing files are reported all at once before anything runs.
    """
    from eval.pairs import describe_missing, missing_images

    missing = missing_images(root, rel_paths)
    if missing:
        raise MissingFileError(describe_missing(missing, len(rel_paths), f"under {root}",
                                                "Check --root (it must hold the images at these relative paths)"))
    dataset = ImageFiles(root, rel_paths, input_size=input_size, landmarks=landmarks, template=template)
    check_first_image(dataset)
    return extract_from_dataset(model, dataset, batch_size, flip, device, num_workers, precision=precision,
                                channels_last=channels_last)


def check_first_image(dataset: Dataset) -> None:
    """Read the first image in this process, before any DataLoader worker starts.

    Raw photos where aligned crops are expected (a wrong size) are then one clear error with the size
    found and the size expected, instead of a traceback from inside a worker process.
    """
    if len(dataset):
        dataset[0]


# --------------------------------------------------------------------------- checkpoints and files


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix left by DistributedDataParallel, so either form loads."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_embedding_model(path, device="cpu"):
    """Build the backbone described by a training checkpoint (docs/interfaces.md) and load its weights.

    Returns ``(model in eval mode, info)`` with ``info`` holding ``backbone``, ``input_size``,
    ``template`` and ``threshold`` (``None`` when the checkpoint stores none). An ``.onnx`` file
    written by ``sphereface-plus export`` loads as an :class:`eval.onnx_model.OnnxModel` with the same
    ``info`` (from its metadata), so every caller accepts either.
    """
    if Path(path).suffix.lower() == ".onnx":
        from eval.onnx_model import load_onnx_model

        return load_onnx_model(path, device=device)
    from sphereface_plus.errors import UsageError
    from sphereface_plus.models import backbone_from_config
    from sphereface_plus.utils import safe_torch_load

    path = Path(path)
    ckpt = safe_torch_load(path, map_location="cpu")  # MissingFileError / CheckpointError
    try:
        cfg = ckpt["config"]
        name = cfg["model"]["backbone"]
        input_size = tuple(int(v) for v in cfg["model"]["input_size"])
        template = cfg.get("data", {}).get("template", "112x96")
        state = ckpt["model"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid checkpoint (not written by this toolkit): missing {e} "
                              f"(expected keys model, config[model][backbone], config[model][input_size])") from None
    try:  # any registered backbone, with the input size, embedding_dim and model.kwargs it was trained with
        model = backbone_from_config(cfg["model"])
    except UsageError as e:  # e.g. a backbone this version of the toolkit does not have
        raise CheckpointError(f"{path}: its config names a network this toolkit cannot build: {e}") from None
    try:
        model.load_state_dict(strip_module_prefix(state))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the stored weights do not fit the {name} backbone its config names "
                              f"({first})") from None
    pre = None
    if PREPROCESSING_KEY in ckpt:  # an imported model: its own input convention (docs/import.md)
        pre = Preprocessing.from_dict(ckpt[PREPROCESSING_KEY], str(path))
        if tuple(pre.input_size) != input_size:
            raise CheckpointError(f"{path}: preprocessing template {pre.template} does not match the model's input "
                                  f"size {input_size[0]}x{input_size[1]}; import the model again")
        model = wrap_backbone(model, pre)
    model.to(torch.device(device)).eval()
    threshold = ckpt.get("threshold")
    info = {
        "backbone": name,
        "input_size": input_size,
        "template": template,
        "threshold": None if threshold is None else float(threshold),
        "iteration": ckpt.get("iteration"),
        "preprocessing": None if pre is None else pre.to_dict(),
        "flip_policy": "concat" if pre is None else pre.flip,
    }
    logger.info("loaded %s (%s, input %dx%d, iteration %s)", path, name, *input_size, info["iteration"])
    return model, info


#: the ``layout`` an .npz records for rows ``[f(crop), f(mirror)]`` side by side (what ``embed_batch`` returns)
CROP_MIRROR_LAYOUT = "crop+mirror"


def save_features_npz(path, paths: Sequence[str], features: np.ndarray, layout: Optional[str] = None) -> None:
    """Save ``paths`` (unicode array) and ``features`` to an ``.npz`` atomically.

    ``layout`` (optional, e.g. :data:`CROP_MIRROR_LAYOUT`) is stored as a string so that a later
    ``verify --features`` knows the rows are crop and mirror halves (:func:`features_layout`)."""
    import io

    from sphereface_plus.utils import atomic_write_bytes

    buf = io.BytesIO()
    extra = {"layout": np.asarray(layout, dtype=str)} if layout else {}
    np.savez(buf, paths=np.asarray(list(paths), dtype=str), features=np.asarray(features, dtype=np.float32), **extra)
    atomic_write_bytes(path, buf.getvalue())


def features_layout(path) -> Optional[str]:
    """The ``layout`` recorded by :func:`save_features_npz`, or None (features used as they are)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["layout"]) if "layout" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def load_features_npz(path) -> Tuple[list, np.ndarray]:
    """Read ``paths`` and ``features`` from an ``.npz`` (no pickled objects are allowed)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"features file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"paths", "features"} - set(z.files)
            if missing:
                raise InputFileError(f"{path} lacks {sorted(missing)}; it needs 'paths' (N relative image paths) "
                                 f"and 'features' (N x D)")
            paths = [str(p) for p in z["paths"]]
            feats = np.asarray(z["features"])
    except InputFileError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise InputFileError(f"{path}: 'paths' is stored as Python objects; save it as a string array "
                                 f"(np.asarray(paths, dtype=str))") from None
        raise InputFileError(f"{path} is not a readable .npz of features ({type(e).__name__})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputFileError(f"{path} is not a readable .npz of features ({type(e).__name__})") from None
    if feats.ndim != 2 or feats.shape[0] != len(paths):
        raise InputFileError(f"{path}: features must be N x D with N = {len(paths)} paths, got {feats.shape}")
    return paths, feats
