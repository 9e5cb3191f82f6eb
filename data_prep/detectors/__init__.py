"""Face detectors with 5 landmarks that run offline, by name: ``create_detector('mtcnn')``.

- ``mtcnn`` (default): the MTCNN cascade written in this project (:mod:`.mtcnn`), the original's
  settings (docs/theory.md#face-detection: minimum face 20 px, pyramid factor 0.85, thresholds
  0.6 / 0.7 / 0.9), torch on CPU or CUDA.
- ``retinaface``: RetinaFace-MobileNet0.25 through onnxruntime (:mod:`.retinaface`), faster.

Every detector's ``detect(image)`` takes a BGR uint8 image and returns ``(boxes, points)``:
``N x 5`` (x1, y1, x2, y2, score) and ``N x 5 x 2`` landmarks (left eye, right eye, nose, left and
right mouth corner, 0-based pixels). Weights come from ``sphereface-plus fetch-weights``
(:mod:`.weights`). :func:`select_face` picks the one face to align when there are several.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np

from sphereface_plus.registry import Registry

DETECTORS = Registry("detector")

SELECT_POLICIES = ("center", "largest", "score")


@DETECTORS.register("mtcnn")
def _mtcnn(**kw: Any):
    from .mtcnn import MTCNN

    return MTCNN(**kw)


@DETECTORS.register("retinaface")
def _retinaface(**kw: Any):
    from .retinaface import RetinaFace

    return RetinaFace(**kw)


def create_detector(name: str = "mtcnn", device: str = "cpu", **kw: Any):
    """The detector registered as ``name`` ('mtcnn' or 'retinaface'), on ``device``.

    Extra keyword arguments go to the detector (for MTCNN: ``min_face_size``, ``factor``,
    ``thresholds``, ``weights_dir``; for RetinaFace: ``score_threshold``, ``nms_threshold``,
    ``weights_dir``). An unknown name raises an error that lists the registered detectors; a
    missing weight file raises one that names the command that fetches it.
    """
    return DETECTORS.get(name)(device=device, **kw)


def list_detectors() -> List[str]:
    return DETECTORS.names()


def select_face(
    boxes: np.ndarray, points: np.ndarray, image_shape: Tuple[int, ...], policy: str = "center"
) -> Tuple[int, np.ndarray, np.ndarray]:
    """Choose one face among a detector's output.

    ``policy``: ``'center'`` (the original SphereFace, docs/theory.md#face-detection: the face whose box centre is
    nearest the image centre), ``'largest'`` (largest box area) or ``'score'`` (highest score).
    Returns ``(index, box (5,), points (5, 2))``; raises ``ValueError`` when there is no face, so a
    caller can never align a guessed face by accident.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)
    if len(boxes) != len(points):
        raise ValueError(f"{len(boxes)} boxes but {len(points)} landmark sets")
    if len(boxes) == 0:
        raise ValueError("no face detected: nothing to select")
    if policy == "center":
        h, w = image_shape[:2]
        # 0-based pixel centres: the image centre is ((w - 1) / 2, (h - 1) / 2)
        cx = (boxes[:, 0] + boxes[:, 2]) / 2 - (w - 1) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2 - (h - 1) / 2
        i = int(np.argmin(cx * cx + cy * cy))
    elif policy == "largest":
        i = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    elif policy == "score":
        i = int(np.argmax(boxes[:, 4]))
    else:
        raise ValueError(f"unknown face selection policy {policy!r}; choose one of {', '.join(SELECT_POLICIES)}")
    return i, boxes[i], points[i]


__all__ = ["DETECTORS", "SELECT_POLICIES", "create_detector", "list_detectors", "select_face"]
