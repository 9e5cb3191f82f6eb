"""Batched feature extraction for verification: aligned crops (or raw images + landmarks) -> features.

The feature of an image is the embedding of the crop concatenated with the embedding of its
horizontal mirror (SPEC section 8: 1024-d for a 512-d model), as in the SphereFace evaluation.
Images are read by DataLoader workers, preprocessed like training (BGR, ``(x - 127.5) / 128``), and
embedded under ``torch.inference_mode`` with the crop and its mirror in one forward pass.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sphereface_plus.errors import CheckpointError, InputFileError, MissingFileError
from sphereface_plus.utils import progress

logger = logging.getLogger(__name__)

# the 112x112 (insightface/ArcFace) template is the 112x96 SphereFace template shifted by 8 px in x,
# so a 112x112 crop holds a 112x96 one in its middle columns
_WIDE_TO_NARROW = ((112, 112), (112, 96), 8)
#: how to fix a crop of the wrong size, for commands that can align on the fly (verify, megaface export)
ALIGN_HINT = "align the images first (sphereface-plus align) or pass --landmarks to align them on the fly"


def preprocess(image_bgr: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` BGR uint8 -> ``3 x H x W`` float32 ``(x - 127.5) / 128`` (the training transform)."""
    x = torch.from_numpy(np.ascontiguousarray(image_bgr)).permute(2, 0, 1).float()
    return (x - 127.5) / 128.0


def fit_crop(image: np.ndarray, input_size: Optional[Tuple[int, int]], name: str,
             hint: str = ALIGN_HINT) -> np.ndarray:
    """Check an aligned crop against the model's ``(H, W)``; a 112x112 crop feeds a 112x96 model.

    ``hint``: the fix named in the error (it depends on the command's options)."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if input_size is None or tuple(image.shape[:2]) == tuple(input_size):
        return image
    wide, narrow, dx = _WIDE_TO_NARROW
    if tuple(image.shape[:2]) == wide and tuple(input_size) == narrow:
        return image[:, dx:dx + narrow[1]]
    h, w = image.shape[:2]
    raise InputFileError(
        f"{name} is {h}x{w} (HxW) but the model expects {input_size[0]}x{input_size[1]} aligned crops: {hint}"
    )


def read_landmarks(path) -> Dict[str, np.ndarray]:
    """Read a landmark file: ``relative/path`` then 10 numbers (x1 y1 ... x5 y5) per line."""
    out: Dict[str, np.ndarray] = {}
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"landmark file {path} does not exist (--landmarks)")
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) != 11:
            raise InputFileError(f"{path}:{line_no}: expected a path and 10 numbers, got {len(f)} fields")
        try:
            out[f[0]] = np.array([float(v) for v in f[1:]], dtype=np.float64).reshape(5, 2)
        except ValueError:
            raise InputFileError(f"{path}:{line_no}: landmark values must be numbers: {line.strip()!r}") from None
    return out


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

    def __getitem__(self, i: int) -> torch.Tensor:
        import cv2

        rel = self.rel_paths[i]
        image = cv2.imread(str(self.root / rel), cv2.IMREAD_COLOR)
        if image is None:
            raise InputFileError(f"cannot read image {self.root / rel} (missing or not an image)")
        if self.landmarks is not None:
            from data_prep import align_face

            image = align_face(image, self.landmarks[rel], template=self.template)
        return preprocess(fit_crop(image, self.input_size, str(self.root / rel)))


class EncodedImages(Dataset):
    """Encoded images (JPEG/PNG bytes, e.g. from an insightface pack), already aligned."""

    def __init__(self, images: Sequence[bytes], input_size: Optional[Tuple[int, int]] = None):
        self.images = images
        self.input_size = tuple(input_size) if input_size is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        import cv2

        image = cv2.imdecode(np.frombuffer(self.images[i], dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise InputFileError(f"pack image {i} cannot be decoded")
        return preprocess(fit_crop(image, self.input_size, f"pack image {i}"))


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


def embed_batch(model: torch.nn.Module, x: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Embeddings of a preprocessed batch; with ``flip`` ``[f(x), f(mirror(x))]`` concatenated."""
    if not flip:
        return model(x)
    out = model(torch.cat([x, torch.flip(x, dims=[3])]))
    a, b = out.split(x.shape[0])
    return torch.cat([a, b], dim=1)


def iter_embeddings(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    flip: bool = True,
    device="cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(index of the first image, float32 features)`` batch by batch, in dataset order.

    Lets long exports write each batch as soon as it is ready (resumable, bounded memory).
    """
    device = torch.device(device)
    model = model.to(device).eval()
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
            feats = embed_batch(model, x, flip).float().cpu().numpy()
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
) -> np.ndarray:
    """Run ``model`` over a dataset of preprocessed tensors; ``N x D`` float32 numpy, in order."""
    chunks = [f for _, f in iter_embeddings(model, dataset, batch_size, flip, device, num_workers, desc)]
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
    return extract_from_dataset(model, dataset, batch_size, flip, device, num_workers)


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


def load_checkpoint(path, device="cpu"):
    """Build the backbone described by a training checkpoint (docs/interfaces.md) and load its weights.

    Returns ``(model in eval mode, info)`` with ``info`` holding ``backbone``, ``input_size``,
    ``template`` and ``threshold`` (``None`` when the checkpoint stores none).
    """
    from sphereface_plus import create_backbone
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
    kwargs = {"input_size": input_size}
    if "embedding_dim" in cfg["model"]:  # sphereface_plus.config.ModelConfig: fc5 width
        kwargs["embedding_dim"] = int(cfg["model"]["embedding_dim"])
    model = create_backbone(name, **kwargs)
    try:
        model.load_state_dict(strip_module_prefix(state))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the stored weights do not fit the {name} backbone its config names "
                              f"({first})") from None
    model.to(torch.device(device)).eval()
    threshold = ckpt.get("threshold")
    info = {
        "backbone": name,
        "input_size": input_size,
        "template": template,
        "threshold": None if threshold is None else float(threshold),
        "iteration": ckpt.get("iteration"),
    }
    logger.info("loaded %s (%s, input %dx%d, iteration %s)", path, name, *input_size, info["iteration"])
    return model, info


def save_features_npz(path, paths: Sequence[str], features: np.ndarray) -> None:
    """Save ``paths`` (unicode array) and ``features`` to an ``.npz`` atomically."""
    import io

    from sphereface_plus.utils import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, paths=np.asarray(list(paths), dtype=str), features=np.asarray(features, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue())


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
