"""Test-time jitter as dlib does it: the descriptor of a chip is the mean over N randomly jittered copies
(docs/theory.md#dlib-jitter; ``dlib::jitter_image``, used by ``compute_face_descriptor(..., num_jitters)``).

One jitter of an S x S chip (dlib's parameters):

- the object box is the chip shrunk by 3 px on every side (side ``S - 6``, centre ``(S/2, S/2)``);
- it is shifted by ``round(u * (S - 6))`` px along each axis, ``u`` uniform in [-0.02, 0.02);
- its side becomes ``trunc((S - 6) / h)``, ``h`` uniform in [0.97, 0.99999) (a zoom-out of 0 to 3 %);
- it is rotated by an angle uniform in [-3, 3) degrees about its centre;
- that box is resampled to S x S (bilinear, black outside the chip; its corner pixels land on the box's
  corners, so the scale is ``(side - 1) / (S - 1)``), and mirrored left-right with probability 1/2.

As in dlib, ``num_jitters`` of 0 or 1 means no jitter. The draws come from a numpy generator seeded with
``(seed, image index)``, so a run is repeatable and does not depend on batching or worker processes;
dlib's own random stream cannot be reproduced, only its distribution (tests/test_dlib.py compares the
two). The resampling runs on the preprocessed crop (a linear map of the pixels, so it commutes with the
interpolation); dlib rounds the resampled pixels to 8 bits, which this does not.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MAX_ROTATION_DEGREES", "OBJECT_HEIGHT", "TRANSLATE_AMOUNT", "BORDER", "jitter_parameters",
           "jitter_matrix", "jitter_crops", "JitteredImages"]

MAX_ROTATION_DEGREES = 3.0
OBJECT_HEIGHT = (0.97, 0.99999)
TRANSLATE_AMOUNT = 0.02
BORDER = 3  # px shrunk off every side of the chip to make the object box


def jitter_parameters(rng: np.random.Generator, size: int) -> Tuple[int, int, int, float, bool]:
    """One draw of ``(shift_x, shift_y, box side, angle in radians, mirror)`` for an ``size`` x ``size`` chip."""
    inner = size - 2 * BORDER
    shift = np.floor(rng.uniform(-TRANSLATE_AMOUNT, TRANSLATE_AMOUNT, 2) * inner + 0.5).astype(int)
    side = int(inner / rng.uniform(*OBJECT_HEIGHT))
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    return int(shift[0]), int(shift[1]), side, angle, bool(rng.random() > 0.5)


def jitter_matrix(size: int, shift_x: int, shift_y: int, side: int, angle: float) -> np.ndarray:
    """The 2 x 3 map from output pixels to chip pixels of one jitter (before the mirror).

    The box (integer corners as dlib's ``centered_rect``: left ``cx - side // 2``, right ``left + side - 1``)
    is rotated by ``angle`` about its centre; output pixel ``q`` takes the chip point
    ``c + R(angle) (side - 1) / (size - 1) (q - (size - 1) / 2)``.
    """
    cx, cy = size // 2 + shift_x, size // 2 + shift_y  # dlib's center() of the shrunk box, + the shift
    left, top = cx - side // 2, cy - side // 2
    centre = np.array([left + (side - 1) / 2.0, top + (side - 1) / 2.0])
    k = (side - 1) / (size - 1)
    rot = k * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    h = (size - 1) / 2.0
    return np.hstack([rot, (centre - rot @ np.array([h, h]))[:, None]])


def jitter_crops(crop: np.ndarray, num_jitters: int, rng: np.random.Generator, fill: float = 0.0) -> np.ndarray:
    """``num_jitters`` jittered copies (``N x H x W x C`` float32) of a square ``H x W x C`` crop; ``fill``
    is the value of black in the crop's units (outside the chip)."""
    import cv2

    size = crop.shape[0]
    if crop.shape[1] != size:
        raise ValueError(f"jitter needs a square crop (dlib's face chip), got {crop.shape[0]}x{crop.shape[1]}")
    src = np.ascontiguousarray(crop, dtype=np.float32)
    out = np.empty((num_jitters,) + src.shape, np.float32)
    for i in range(num_jitters):
        sx, sy, side, angle, mirror = jitter_parameters(rng, size)
        m = jitter_matrix(size, sx, sy, side, angle)
        warped = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(fill,) * 4)
        warped = warped.reshape(src.shape)
        out[i] = warped[:, ::-1] if mirror else warped
    return out


class JitteredImages(Dataset):
    """``dataset`` (preprocessed ``3 x S x S`` tensors) as ``N x 3 x S x S`` stacks of jittered copies."""

    def __init__(self, dataset: Dataset, num_jitters: int, seed: int = 0, fill: float = -127.5 / 128):
        if num_jitters < 2:
            raise ValueError(f"num_jitters must be at least 2 (0 and 1 mean no jitter), got {num_jitters}")
        self.dataset = dataset
        self.num_jitters = int(num_jitters)
        self.seed = int(seed)
        self.fill = float(fill)  # black in the toolkit's input, (0 - 127.5) / 128

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.dataset[i]
        rng = np.random.default_rng((self.seed, i))
        crops = jitter_crops(x.permute(1, 2, 0).numpy(), self.num_jitters, rng, self.fill)
        return torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))
