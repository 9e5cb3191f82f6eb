"""MTCNN face detector with 5 landmarks, written here after the original (Zhang et al., 2016).

See docs/theory.md#face-detection. The SphereFace preprocessing detected faces and landmarks with the original MATLAB/Caffe
MTCNN (``MTCNNv1/detect_face.m``) with minimum face 20 px, pyramid factor 0.85 and stage thresholds
0.6 / 0.7 / 0.9. This module re-implements that cascade step by step:

1. P-Net, fully convolutional, on an image pyramid (scales ``12 / min_face * factor**k`` while the
   short side stays >= 12 px); every 12x12 window with face probability >= t1 gives a candidate box;
   NMS 0.5 within each scale, then NMS 0.7 over all scales, box regression, squaring, truncation.
2. R-Net on 24x24 crops of the candidates (zero-padded where a box leaves the image), probability
   > t2, NMS 0.7, box regression, squaring.
3. O-Net on 48x48 crops: probability > t3, the 5 landmarks, box regression, NMS 0.7 with the
   intersection over the *smaller* box ("Min").

The arithmetic keeps the original's 1-based box convention (``fix`` = truncation, widths ``x2 - x1 + 1``,
the ``-1`` of the landmark formula) so that the numbers match the MATLAB code; :meth:`MTCNN.detect`
converts to this toolkit's 0-based convention at the very end (see ``_to_zero_based``).

Weights: the P-, R- and O-Net state dicts of ``facenet-pytorch==2.6.0`` (converted from the original
Caffe models via TensorFlow), fetched by ``sphereface-plus fetch-weights``. The module and parameter
names here match that state dict so it loads with ``load_state_dict(strict=True)``. The original
networks were trained on images transposed by MATLAB's column-major layout; the conversion transposed
the convolution kernels, so the nets take ordinary row-major RGB images, and the dense layers read the
last feature map in transposed order (the ``permute(0, 3, 2, 1)`` before flattening).

Resampling: the original used Piotr Dollar's ``imResample(..., 'bilinear')``, which averages over the
covered input area when shrinking and interpolates bilinearly when enlarging. ``cv2.resize`` with
``INTER_AREA`` does the same, so image resampling runs with OpenCV on the CPU and only the networks run
on ``device``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from data_prep.geometry import to_bgr

logger = logging.getLogger(__name__)

_MEAN = 127.5
_SCALE = 0.0078125  # 1 / 128, as in the original


class PNet(nn.Module):
    """Proposal network: 12x12 window -> face probability and box regression (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)  # Caffe pooling rounds the output size up
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement network: 24x24 crop -> face probability and box regression."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # the Caffe model's transposed layout
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network: 48x48 crop -> face probability, box regression and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


# ----------------------------------------------------------------------------------------------------
# pure helpers (boxes are float tensors N x >=4: x1, y1, x2, y2 in the original 1-based convention)


def pyramid_scales(height: int, width: int, min_face: float, factor: float) -> List[float]:
    """The P-Net scales: ``m * factor**k`` with ``m = 12 / min_face`` while ``min(h, w) * scale >= 12``.

    Computed as the original does (running products), so the level sizes match it exactly.
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"pyramid factor must lie in (0, 1), got {factor}")
    if min_face <= 0:
        raise ValueError(f"min_face_size must be positive, got {min_face}")
    m = 12.0 / min_face
    minl = min(height, width) * m
    scales, k = [], 0
    while minl >= 12:
        scales.append(m * factor**k)
        minl *= factor
        k += 1
    return scales


def nms_union_plus1(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, thresh: float) -> torch.Tensor:
    """NMS with intersection-over-union, widths counted as ``x2 - x1 + 1`` (the original ``nms.m``).

    Implemented by torchvision's ``batched_nms`` on boxes whose far corner is moved by +1, which gives
    exactly the original's areas and intersections; ``groups`` keeps scales / images apart.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    b = boxes[:, :4].clone()
    b[:, 2:] += 1
    return batched_nms(b, scores, groups, thresh)


def nms_min_plus1(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """Greedy NMS with intersection over the smaller area ('Min' in ``nms.m``), highest score first."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    x1, y1, x2, y2 = (boxes[:, i].double() for i in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    iw = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None]) + 1).clamp(min=0)
    ih = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None]) + 1).clamp(min=0)
    overlap = (iw * ih / torch.minimum(area[:, None], area[None])).cpu().numpy()
    order = torch.argsort(scores, descending=True, stable=True).cpu().numpy()
    alive = np.ones(n, dtype=bool)
    keep = []
    for i in order:  # n is the handful of O-Net survivors
        if not alive[i]:
            continue
        keep.append(i)
        alive &= overlap[i] <= thresh
    return torch.as_tensor(keep, dtype=torch.long, device=boxes.device)


def rerec(boxes: torch.Tensor) -> torch.Tensor:
    """Make boxes square around their centre with side ``max(w, h)`` (``w = x2 - x1``, as the original)."""
    out = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def bbreg(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Box calibration: shift each side by the regressed fraction of ``x2 - x1 + 1`` / ``y2 - y1 + 1``."""
    out = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] = boxes[:, 0] + reg[:, 0] * w
    out[:, 1] = boxes[:, 1] + reg[:, 1] * h
    out[:, 2] = boxes[:, 2] + reg[:, 2] * w
    out[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return out


def crop_patches(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """``size x size`` resamplings of the integer 1-based inclusive boxes, zero outside the image.

    ``image``: H x W x 3 float32. Returns N x 3 x size x size float32 normalised as the nets expect.
    Matches ``pad.m`` + ``imResample``: the part of the box inside the image is copied into a zero
    canvas of the box's size, which is then resampled (area average down, bilinear up).
    """
    h, w = image.shape[:2]
    out = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        canvas = np.zeros((bh, bw, 3), dtype=np.float32)
        sx1, sy1 = max(x1, 1), max(y1, 1)
        sx2, sy2 = min(x2, w), min(y2, h)
        if sx2 >= sx1 and sy2 >= sy1:
            canvas[sy1 - y1 : sy2 - y1 + 1, sx1 - x1 : sx2 - x1 + 1] = image[sy1 - 1 : sy2, sx1 - 1 : sx2]
        out[k] = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return ((out - _MEAN) * _SCALE).transpose(0, 3, 1, 2)


def _valid_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes that still have a positive integer size (the original skips empty crops)."""
    return (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (BGR uint8 as cv2.imread returns), got {type(image).__name__}")
    image = to_bgr(image)  # gray / BGRA -> BGR; non-uint8 and other layouts are errors
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty, shape {image.shape}")
    return image


def _to_zero_based(boxes: np.ndarray, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Original MTCNN numbers -> this toolkit's 0-based pixel coordinates.

    The cascade works in MATLAB's 1-based pixel indices (pixel ``i`` of a 1-based box is pixel
    ``i - 1`` of the numpy array), so boxes move by -1. Landmarks: the original formula
    ``w * p + x1 - 1`` already subtracts one, and its result is what ``lfw_landmark.txt`` holds and
    what the SphereFace MATLAB code paired with the 1-based template; toolkit landmarks are 0-based
    (``data_prep.geometry`` pairs them with ``template - 1``), so the points move by -1 as well.
    """
    boxes = boxes.copy()
    boxes[:, :4] -= 1.0
    return boxes, points - 1.0


class MTCNN:
    """The three-stage MTCNN cascade; ``detect(image)`` -> ``(boxes N x 5, points N x 5 x 2)``.

    Args:
        device: where the three networks run ('cpu', 'cuda', 'cuda:1', ...).
        min_face_size: smallest face searched for, in pixels (the original: 20, docs/theory.md#face-detection).
        factor: image-pyramid scale step (the original SphereFace: 0.85, docs/theory.md#face-detection; facenet-pytorch
            uses 0.709, which is faster and coarser).
        thresholds: face-probability thresholds of P-, R- and O-Net (the original: 0.6, 0.7, 0.9,
            docs/theory.md#face-detection).
        weights_dir: folder with ``pnet.pt``, ``rnet.pt``, ``onet.pt`` (default: the fetch-weights cache).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: float = 20.0,
        factor: float = 0.85,
        thresholds: Sequence[float] = (0.6, 0.7, 0.9),
        weights_dir: Optional[os.PathLike] = None,
    ) -> None:
        from .weights import detector_weight_paths

        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities (P-, R-, O-Net), got {tuple(thresholds)}")
        pyramid_scales(100, 100, min_face_size, factor)  # validates both
        self.device = torch.device(device)
        self.min_face_size = float(min_face_size)
        self.factor = float(factor)
        self.thresholds = tuple(float(t) for t in thresholds)
        paths = detector_weight_paths("mtcnn", weights_dir)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for net, fname in ((self.pnet, "pnet.pt"), (self.rnet, "rnet.pt"), (self.onet, "onet.pt")):
            state = torch.load(paths[fname], map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
            # channels-last: on CPU max-pooling is several times faster in this layout (measured)
            net.to(self.device, memory_format=torch.channels_last).eval()

    def __repr__(self) -> str:
        return (f"MTCNN(device={str(self.device)!r}, min_face_size={self.min_face_size:g}, "
                f"factor={self.factor:g}, thresholds={self.thresholds})")

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """N x 3 x H x W float32 numpy -> channels-last tensor on ``self.device``."""
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return t.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Faces in a BGR uint8 image.

        Returns ``boxes`` (N x 5 float64: x1, y1, x2, y2, O-Net probability) and ``points``
        (N x 5 x 2 float64: left eye, right eye, nose, left and right mouth corner, as seen in the
        image), 0-based pixel coordinates, sorted by decreasing probability; ``(0 x 5, 0 x 5 x 2)``
        when there is no face.
        """
        bgr = _as_bgr(image)
        rgb = bgr[:, :, ::-1].astype(np.float32)  # the nets were trained on RGB (MATLAB imread)
        h, w = rgb.shape[:2]
        empty = (np.zeros((0, 5), np.float64), np.zeros((0, 5, 2), np.float64))
        t1, t2, t3 = self.thresholds

        # ---- stage 1: P-Net over the pyramid
        cand, level = [], []
        for k, scale in enumerate(pyramid_scales(h, w, self.min_face_size, self.factor)):
            hs, ws = int(math.ceil(h * scale)), int(math.ceil(w * scale))
            level_img = cv2.resize(rgb, (ws, hs), interpolation=cv2.INTER_AREA)
            x = self._tensor(((level_img - _MEAN) * _SCALE).transpose(2, 0, 1)[None])
            reg, prob = self.pnet(x)
            iy, ix = torch.nonzero(prob[0, 1] >= t1, as_tuple=True)
            if iy.numel() == 0:
                continue
            score = prob[0, 1, iy, ix]
            r = reg[0][:, iy, ix].T
            # window of output cell (ix, iy) in 1-based original pixels (generateBoundingBox.m)
            gx, gy = ix.to(torch.float32), iy.to(torch.float32)
            boxes = torch.stack([
                torch.floor((2 * gx + 1) / scale), torch.floor((2 * gy + 1) / scale),
                torch.floor((2 * gx + 12) / scale), torch.floor((2 * gy + 12) / scale),
            ], dim=1)
            cand.append(torch.cat([boxes, score[:, None], r], dim=1))
            level.append(torch.full((len(score),), k, dtype=torch.long, device=self.device))
        if not cand:
            return empty
        boxes, level = torch.cat(cand), torch.cat(level)
        keep = nms_union_plus1(boxes, boxes[:, 4], level, 0.5)  # within each scale, all scales at once
        boxes = boxes[keep]
        keep = nms_union_plus1(boxes, boxes[:, 4], torch.zeros_like(keep), 0.7)  # across scales
        boxes = boxes[keep]
        # stage-1 regression uses x2 - x1 (no +1), as the original
        rw = boxes[:, 2] - boxes[:, 0]
        rh = boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([
            boxes[:, 0] + boxes[:, 5] * rw, boxes[:, 1] + boxes[:, 6] * rh,
            boxes[:, 2] + boxes[:, 7] * rw, boxes[:, 3] + boxes[:, 8] * rh, boxes[:, 4],
        ], dim=1)
        boxes = rerec(boxes)
        boxes[:, :4] = torch.trunc(boxes[:, :4])

        # ---- stage 2: R-Net on 24x24 crops
        boxes = boxes[_valid_boxes(boxes)]
        if boxes.shape[0] == 0:
            return empty
        patches = crop_patches(rgb, boxes[:, :4].cpu().numpy(), 24)
        reg, prob = self.rnet(self._tensor(patches))
        score = prob[:, 1]
        ok = score > t2
        boxes = torch.cat([boxes[ok, :4], score[ok, None]], dim=1)
        reg = reg[ok]
        if boxes.shape[0] == 0:
            return empty
        keep = nms_union_plus1(boxes, boxes[:, 4], torch.zeros(len(boxes), dtype=torch.long, device=self.device), 0.7)
        boxes = rerec(bbreg(boxes[keep], reg[keep]))

        # ---- stage 3: O-Net on 48x48 crops, landmarks
        boxes[:, :4] = torch.trunc(boxes[:, :4])
        boxes = boxes[_valid_boxes(boxes)]
        if boxes.shape[0] == 0:
            return empty
        patches = crop_patches(rgb, boxes[:, :4].cpu().numpy(), 48)
        reg, pts, prob = self.onet(self._tensor(patches))
        score = prob[:, 1]
        ok = score > t3
        boxes = torch.cat([boxes[ok, :4], score[ok, None]], dim=1)
        reg, pts = reg[ok], pts[ok]
        if boxes.shape[0] == 0:
            return empty
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * pts[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * pts[:, 5:] + boxes[:, 1:2] - 1
        points = torch.stack([px, py], dim=2)
        boxes = bbreg(boxes, reg)
        keep = nms_min_plus1(boxes, boxes[:, 4], 0.7)
        boxes, points = boxes[keep], points[keep]
        return _to_zero_based(boxes.double().cpu().numpy(), points.double().cpu().numpy())
