"""Batched feature extraction for verification: aligned crops (or raw images + landmarks) -> features.

The feature of an image is the embedding of the crop concatenated with the embedding of its
horizontal mirror (docs/theory.md#lfw-protocol: 1024-d for a 512-d model), as in the SphereFace evaluation.
Images are read by DataLoader workers, preprocessed like training (BGR, ``(x - 127.5) / 128``), and
embedded under ``torch.inference_mode`` with the crop and its mirror in one forward pass. The
backbone runs in float32 or, with ``precision="bf16"`` (the ``auto`` choice on hardware with native
bf16), under bfloat16 autocast with NHWC tensors; features are always returned float32.
"""
from __future__ import annotations

import contextlib
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
        from data_prep.image_files import read_image_file

        rel = self.rel_paths[i]
        image = read_image_file(self.root / rel)  # BGR; the pixel limit checked from the header
        if image is None:
            raise InputFileError(f"cannot read image {self.root / rel} (missing or not an image)")
        if self.landmarks is not None:
            from data_prep import align_face

            image = align_face(image, self.landmarks[rel], template=self.template)
        return fit_crop(image, self.input_size, str(self.root / rel))

    def __getitem__(self, i: int) -> torch.Tensor:
        return preprocess(self.crop(i))


class EncodedImages(Dataset):
    """Encoded images (JPEG/PNG bytes, e.g. from an insightface pack ``source``), already aligned."""

    def __init__(self, images: Sequence[bytes], input_size: Optional[Tuple[int, int]] = None, source: str = "pack"):
        self.images = images
        self.input_size = tuple(input_size) if input_size is not None else None
        self.source = str(source)

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, i: int) -> np.ndarray:
        """Image ``i`` decoded and fitted to the model's size (BGR uint8)."""
        from data_prep.image_files import decode_image

        name = f"{self.source}: image {i}"
        image = decode_image(self.images[i], name=name)  # BGR; the pixel limit checked from the header
        if image is None:
            raise InputFileError(f"{name} cannot be decoded")
        return fit_crop(image, self.input_size, name)

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
    back float32. ``channels_last`` feeds the batch in NHWC (the model should be converted too). A
    ``B x N x 3 x H x W`` batch holds N jittered copies of each image (:mod:`eval.jitter`): the feature of
    an image is the mean of its copies' features (dlib's ``num_jitters``).
    """
    from sphereface_plus.engine.precision import autocast

    if x.dim() == 5:  # B x N jittered copies (eval.jitter): the mean of their features
        b, copies = x.shape[:2]
        return embed_batch(model, x.flatten(0, 1), flip, precision, channels_last).view(b, copies, -1).mean(1)
    n = x.shape[0]
    if flip and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        # in numpy: a torch operation here wakes torch's thread pool, whose threads keep spinning on the cores
        # an onnxruntime session (--runtime auto) then needs; measured 1.6x slower at compare's batch of 2
        # (bench/results/cpu_inference.md, docs/performance.md#cpu-inference). The values are the same.
        xn = x.numpy()
        x = torch.from_numpy(np.concatenate([xn, xn[..., ::-1]]))
    elif flip:
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
    jitter: int = 0,
    jitter_seed: int = 0,
) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(index of the first image, float32 features)`` batch by batch, in dataset order.

    Lets long exports write each batch as soon as it is ready (resumable, bounded memory).
    ``precision`` (``auto|fp32|bf16``) and ``channels_last`` are resolved by :func:`inference_setup`.
    The library default stays ``fp32`` so that callers such as the trainer's periodic evaluation keep
    their numbers; the commands (verify, compare, megaface export) and ``FaceEmbedder`` default to
    ``auto``. With channels_last the model is converted to NHWC in place (same weights, same results).
    ``jitter`` >= 2: each feature is the mean over that many random jitters of the crop (dlib's
    ``num_jitters``, :mod:`eval.jitter`; seeded by ``jitter_seed`` and the image index); a forward pass
    then takes ``batch_size // jitter`` images (at least one), so about ``batch_size`` crops.
    """
    device = torch.device(device)
    precision, channels_last = inference_setup(model, precision, device, channels_last)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the runtime's one notice line is eval.runtime.load_inference_model's
    logger.debug("embedding on %s in %s%s%s", device, precision, ", channels_last" if channels_last else "",
                 f", mean of {jitter} jitters" if jitter >= 2 else "")
    if jitter >= 2:
        from eval.jitter import JitteredImages

        dataset = JitteredImages(dataset, jitter, seed=jitter_seed)
        batch_size = max(1, batch_size // jitter)
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
    jitter: int = 0,
    jitter_seed: int = 0,
) -> np.ndarray:
    """Run ``model`` over a dataset of preprocessed tensors; ``N x D`` float32 numpy, in order (``jitter``:
    :func:`iter_embeddings`)."""
    chunks = [f for _, f in iter_embeddings(model, dataset, batch_size, flip, device, num_workers, desc,
                                            precision, channels_last, jitter, jitter_seed)]
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
    jitter: int = 0,
    jitter_seed: int = 0,
) -> np.ndarray:
    """Features of the images ``root/rel_path`` (``N x D`` float32; ``D`` doubles with ``flip``).

    Images are aligned crops, or raw images aligned on the fly when ``landmarks`` (relative path ->
    ``5 x 2``) is given. Missing files are reported all at once before anything runs. ``jitter``: the
    mean over that many random jitters of each crop (:func:`iter_embeddings`).
    """
    from eval.pairs import describe_missing, missing_images

    missing = missing_images(root, rel_paths)
    if missing:
        raise MissingFileError(describe_missing(missing, len(rel_paths), f"under {root}",
                                                "Check --root (it must hold the images at these relative paths)"))
    dataset = ImageFiles(root, rel_paths, input_size=input_size, landmarks=landmarks, template=template)
    check_first_image(dataset)
    return extract_from_dataset(model, dataset, batch_size, flip, device, num_workers, precision=precision,
                                channels_last=channels_last, jitter=jitter, jitter_seed=jitter_seed)


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


#: parts (submodules) a network may have per tensor its checkpoint stores: each part with weights holds one
#: tensor at least, and activations, pools and containers come a few per such part
PARTS_PER_TENSOR = 8


@contextlib.contextmanager
def _parts_bound(tensors: int, path):
    """Stop building a network once it has more submodules than ``tensors`` stored tensors can justify (a config
    whose block count was changed to 10**30 would otherwise be built, part by part, on the meta device for hours)."""
    from torch.nn.modules.module import register_module_module_registration_hook

    limit, count = PARTS_PER_TENSOR * tensors + 64, [0]

    def hook(module, name, submodule):
        count[0] += 1
        if count[0] > limit:
            raise CheckpointError(f"{path}: its config describes a network of more than {limit} parts, which the "
                                  f"{tensors} tensors the file stores cannot fill; the checkpoint is damaged")

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
    from sphereface_plus.engine.checkpoint import read_checkpoint
    from sphereface_plus.errors import UsageError
    from sphereface_plus.models import backbone_from_config

    path = Path(path)
    ckpt = read_checkpoint(path, map_location="cpu")  # MissingFileError / CheckpointError, checksum verified
    try:
        cfg = ckpt["config"]
        name = cfg["model"]["backbone"]
        input_size = tuple(int(v) for v in cfg["model"]["input_size"])
        template = cfg.get("data", {}).get("template", "112x96")
        state = ckpt["model"]
        state = strip_module_prefix(state)
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid checkpoint (not written by this toolkit): missing or wrong {e} "
                              f"(expected keys model, config[model][backbone], config[model][input_size])") from None
    try:  # any registered backbone, with the input size, embedding_dim and model.kwargs it was trained with
        with torch.device("meta"), _parts_bound(len(state), path):  # first on the meta device (nothing allocated)
            size = sum(t.numel() for t in backbone_from_config(cfg["model"]).state_dict().values())
    except CheckpointError:
        raise
    except (UsageError, TypeError, ValueError) as e:  # e.g. a backbone this version of the toolkit does not have
        raise CheckpointError(f"{path}: its config names a network this toolkit cannot build: {e}") from None
    if size > path.stat().st_size:  # each weight takes a byte of the file at least: the config was changed
        raise CheckpointError(f"{path}: its config asks for a {name} of {size} weights, more than the file's "
                              f"{path.stat().st_size} bytes hold; the checkpoint is damaged")
    model = backbone_from_config(cfg["model"])
    try:
        model.load_state_dict(state)
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
            names, feats = z["paths"], np.asarray(z["features"])
            if names.ndim != 1:
                raise InputFileError(f"{path}: 'paths' must be a list of N relative image paths, got an array of "
                                     f"shape {names.shape}")
            paths = [str(p) for p in names]
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
    if feats.dtype.kind not in "fiu":
        raise InputFileError(f"{path}: features must be numbers, got dtype {feats.dtype}")
    bad = ~np.isfinite(feats).all(axis=1) if feats.dtype.kind == "f" else np.zeros(len(feats), bool)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputFileError(f"{path}: {int(bad.sum())} feature rows hold NaN or infinite values (first: row {first}, "
                             f"{paths[first]!r}); extract the features again")
    return paths, feats
