"""Everyday use: ``FaceEmbedder(checkpoint).embed(images)`` (and ``sphereface-plus compare IMG1 IMG2``).

An image goes through the same chain as the evaluation: detect the face and its 5 landmarks
(MTCNN or RetinaFace from :mod:`data_prep.detectors`), align it to the checkpoint's template
(:func:`data_prep.align_face`), embed the crop and its mirror, concatenate and L2-normalise. Two
faces are compared by cosine similarity against the threshold stored in the checkpoint (the one
chosen by LFW-style verification during training) or one given by the user.

A single pair has no dataset mean to subtract, so ``compare`` scores plain cosine; the matching
threshold is the one the 10-fold protocol chooses with ``mean_sub=False`` (what ``sphereface-plus
demo`` stores). A threshold chosen with mean subtraction is close to it but not the same.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from eval.features import ArrayImages, extract_from_dataset, inference_setup
from eval.runtime import load_inference_model
from sphereface_plus.errors import InputFileError, MissingFileError

logger = logging.getLogger(__name__)

#: the fix for a wrong-size image given with --aligned (compare has no --landmarks)
ALIGNED_HINT = "it is not an aligned crop: drop --aligned so that compare detects and aligns the face"


class NoFaceError(InputFileError):
    """The detector found no face in an image."""


class FaceEmbedder:
    """Detect, align and embed faces with a trained checkpoint or its ``.onnx`` export.

    ``embed(images)`` takes BGR ``uint8`` arrays (as ``cv2.imread`` returns them) and returns
    ``N x D`` float32 L2-normalised features: with ``flip``, the crop and mirror embeddings combined as
    the model's flip policy says (``info["flip_policy"]``: concatenated for the toolkit's own and
    SphereFace models, summed for insightface's, crop only for ``none``; docs/import.md).
    With ``aligned=True`` the images are already aligned crops and no detector is loaded.
    ``precision`` (``auto|fp32|bf16``) is the backbone's (:func:`eval.features.inference_setup`);
    ``runtime`` (``auto|torch|onnxruntime``, default ``$SPHEREFACE_PLUS_RUNTIME`` or ``auto``) what runs it
    (:mod:`eval.runtime`: ``auto`` is onnxruntime for float32 on a CPU where it is installed).
    ``jitter`` >= 2: each embedding is the mean over that many random jitters of the crop (dlib's
    ``num_jitters``, :mod:`eval.jitter`), which replace the mirror.
    """

    def __init__(self, checkpoint, device="cpu", detector: str = "mtcnn", flip: bool = True,
                 face_policy: str = "center", batch_size: int = 32, precision: str = "auto",
                 runtime: Optional[str] = None, jitter: int = 0, jitter_seed: int = 0):
        self.device = torch.device(device)
        self.model, self.info = load_inference_model(checkpoint, self.device, precision, runtime)
        self.precision, self.channels_last = inference_setup(self.model, precision, self.device)
        self.threshold: Optional[float] = self.info["threshold"]
        self.template: str = self.info["template"]
        self.flip = flip
        self.face_policy = face_policy
        self.batch_size = batch_size
        self.jitter, self.jitter_seed = (int(jitter) if jitter > 1 else 0), int(jitter_seed)
        self._detector_name = detector
        self._detector = None

    @property
    def detector(self):
        """The face detector, created on first use (so aligned-only use needs no detector weights)."""
        if self._detector is None:
            from data_prep.detectors import create_detector

            self._detector = create_detector(self._detector_name, device=str(self.device))
        return self._detector

    def align(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """Detect the face (the one chosen by ``face_policy`` when several) and align it."""
        from data_prep import align_face
        from data_prep.detectors import select_face

        image = _as_bgr(image, name)
        boxes, points = self.detector.detect(image)
        if len(boxes) == 0:
            raise NoFaceError(f"no face found in {name}; pass an aligned crop with --aligned if it is one")
        idx, _, face_points = select_face(boxes, points, image.shape, policy=self.face_policy)
        if len(boxes) > 1:
            logger.info("%s: %d faces, using face %d (policy %s)", name, len(boxes), idx, self.face_policy)
        return align_face(image, face_points, template=self.template)

    def embed(self, images: Sequence[np.ndarray], aligned: bool = False,
              names: Optional[Sequence[str]] = None) -> np.ndarray:
        """L2-normalised features of BGR images (``N x D`` float32)."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        crops = [_as_bgr(im, n) for im, n in zip(images, names)] if aligned else \
            [self.align(im, n) for im, n in zip(images, names)]
        data = ArrayImages(crops, self.info["input_size"], names=names, hint=ALIGNED_HINT)
        policy = self.info.get("flip_policy") or "concat"
        flip = self.flip and policy != "none" and not self.jitter
        feats = extract_from_dataset(self.model, data, self.batch_size, flip, self.device, num_workers=0,
                                     desc="embed", precision=self.precision, channels_last=self.channels_last,
                                     jitter=self.jitter, jitter_seed=self.jitter_seed)
        if flip and policy == "sum":  # [f(crop), f(mirror)] -> f(crop) + f(mirror)
            half = feats.shape[1] // 2
            feats = feats[:, :half] + feats[:, half:]
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)

    def similarity(self, image1: np.ndarray, image2: np.ndarray, aligned: bool = False) -> float:
        """Cosine similarity of the faces in two images."""
        f = self.embed([image1, image2], aligned=aligned)
        return float(f[0] @ f[1])


def _as_bgr(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputFileError(f"{name}: expected a uint8 BGR image, got dtype {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputFileError(f"{name}: expected an H x W x 3 BGR image, got shape {image.shape}")
    return image[:, :, :3]


def read_image(path) -> np.ndarray:
    """The image at ``path`` (BGR uint8) with ``align``'s checks; errors name the file and the reason."""
    from pathlib import Path

    from data_prep.image_files import read_image as decode

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"image {path} does not exist")
    try:
        return decode(p.read_bytes())[0]
    except ValueError as exc:
        raise InputFileError(f"cannot use image {path}: {exc}") from None
