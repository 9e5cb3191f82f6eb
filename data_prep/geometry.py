"""5-point similarity alignment to the SphereFace template (docs/theory.md#five-point-alignment).

Three pieces, all pure functions:

- ``TEMPLATES`` (owned by :mod:`sphereface_plus.templates`): the reference landmark positions of a 112x96
  crop (and of 112x112, same points with x + 8), stored as published (MATLAB, 1-based) and converted to
  the 0-based pixel convention of OpenCV / numpy by :func:`template_points`.
- :func:`similarity_transform`: the least-squares similarity over all five points with the exact
  semantics of MATLAB ``cp2tform(input, base, 'similarity')`` used by the original SphereFace
  preprocessing (``code/preprocess/face_align_demo.m``), including the reflected fit.
- :func:`align_face`: bilinear ``cv2.warpAffine`` with a black border.

The 1-based / 0-based offset
----------------------------
MATLAB indexes the first pixel as (1, 1); the published template points are in that convention and
the original landmarks (MATLAB MTCNN) were too. OpenCV's first pixel centre is (0, 0), and landmarks in
this toolkit are 0-based (docs/interfaces.md). A similarity is affine, so shifting both point sets by
the same (-1, -1) leaves the rotation and scale unchanged and gives the same warp: with 0-based
landmarks we therefore use ``template - 1``. Ports that pair 0-based landmarks with the 1-based
template place the face about one pixel too far right and down.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import numpy as np

from sphereface_plus.templates import template_entry

logger = logging.getLogger(__name__)

def _check_template(template: str) -> Tuple[int, int, np.ndarray]:
    return template_entry(template)


def template_points(template: str = "112x96") -> np.ndarray:
    """The template's five points in 0-based pixel coordinates (published values minus 1)."""
    _, _, pts = _check_template(template)
    return pts - 1.0


def template_size(template: str = "112x96") -> Tuple[int, int]:
    """``(height, width)`` of the crop a template produces."""
    h, w, _ = _check_template(template)
    return h, w


def _as_points(pts, name: str) -> np.ndarray:
    arr = np.asarray(pts, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be an N x 2 array of (x, y) points with N >= 2, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values: {arr.tolist()}")
    return arr


def _nonreflective_inverse_fit(uv: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """MATLAB ``findNonreflectiveSimilarity``: fit xy -> uv in least squares, return the forward map.

    Returns the 2 x 3 matrix of the map uv -> xy. Like MATLAB, the least squares is solved for the
    inverse map (base points ``xy`` to input points ``uv``: ``u = sc*x + ss*y + tx``,
    ``v = -ss*x + sc*y + ty``) and then inverted. The residual is therefore measured in the input
    image, not in the crop: the inverse of this fit is not the least-squares fit of uv -> xy when
    the points do not match exactly (its scale is larger by 1 / correlation^2), and only the
    inverse-fit form reproduces the original crops.
    """
    return np.array(_fit(uv[:, 0].tolist(), uv[:, 1].tolist(), xy[:, 0].tolist(), xy[:, 1].tolist())).reshape(2, 3)


def _fit(u: List[float], v: List[float], x: List[float], y: List[float]) -> Tuple[float, ...]:
    """Closed form of :func:`_nonreflective_inverse_fit` on plain floats, as (m00, m01, m02, m10, m11, m12).

    MATLAB solves the 2N x 4 system ``X \\ U``; its normal equations decouple after centring, so the
    same solution is written in closed form here. Plain Python floats because for five points numpy's
    per-call overhead (a ``lstsq`` per image cost more than decoding the JPEG) dominates.
    tests/test_geometry.py checks it against a line-by-line ``lstsq`` port of the MATLAB code.
    """
    n = len(u)
    mx, my, mu, mv = sum(x) / n, sum(y) / n, sum(u) / n, sum(v) / n
    s_xy = s_uv = num_c = num_s = 0.0
    for i in range(n):
        xc, yc, uc, vc = x[i] - mx, y[i] - my, u[i] - mu, v[i] - mv
        s_xy += xc * xc + yc * yc
        s_uv += uc * uc + vc * vc
        num_c += uc * xc + vc * yc
        num_s += uc * yc - vc * xc
    if not s_xy > 0.0:
        raise ValueError(
            f"target points are degenerate (they coincide): {list(zip(x, y))}; a similarity needs two distinct points"
        )
    sc, ss = num_c / s_xy, num_s / s_xy
    tx = mu - sc * mx - ss * my
    ty = mv + ss * mx - sc * my
    r2 = sc * sc + ss * ss
    scale_ref = max(s_uv, max(abs(t) for t in u + v) ** 2, 1.0)
    if r2 * s_xy <= 1e-18 * scale_ref:
        raise ValueError(
            f"landmarks are degenerate (the points coincide or carry no shape): {list(zip(u, v))}; "
            "a similarity needs at least two distinct points"
        )
    # invert u = A x + t with A = [[sc, ss], [-ss, sc]]:  x = A^-1 (u - t),  A^-1 = A^T / r2
    a, b = sc / r2, ss / r2
    return a, -b, -(a * tx - b * ty), b, a, -(b * tx + a * ty)


def _residual_norm(m: Tuple[float, ...], u, v, x, y) -> float:
    """MATLAB ``norm`` of the N x 2 residual of ``m`` (its largest singular value, via the 2x2 Gram)."""
    a = c = b = 0.0
    for i in range(len(u)):
        rx = m[0] * u[i] + m[1] * v[i] + m[2] - x[i]
        ry = m[3] * u[i] + m[4] * v[i] + m[5] - y[i]
        a += rx * rx
        c += ry * ry
        b += rx * ry
    return math.sqrt(max(0.0, (a + c) / 2 + math.hypot((a - c) / 2, b)))


def similarity_transform(src, dst, reflective: bool = True) -> np.ndarray:
    """Least-squares similarity mapping ``src`` points onto ``dst`` points (MATLAB ``cp2tform``).

    Args:
        src: N x 2 (x, y) points in the input image (the detected landmarks), N >= 2.
        dst: N x 2 (x, y) points they should land on (the template).
        reflective: also fit the mirror-image similarity and keep it when its residual is smaller
            (``cp2tform(..., 'similarity')``); ``False`` gives ``'nonreflective similarity'``.

    Returns:
        2 x 3 float64 ``M`` with ``dst ~= M @ [src; 1]``, ready for ``cv2.warpAffine``.

    All points are used (no RANSAC, no outlier rejection). Details that follow MATLAB exactly:
    the fit is the least-squares inverse map dst -> src, inverted (see
    :func:`_nonreflective_inverse_fit`); the reflected candidate is fitted on dst with x negated and
    then composed with the reflection; the candidates are compared by MATLAB's ``norm`` of the
    N x 2 residual matrix in ``dst`` space, i.e. its largest singular value (not the Frobenius norm),
    ties going to the non-reflective fit.
    """
    uv = _as_points(src, "src")
    xy = _as_points(dst, "dst")
    if uv.shape != xy.shape:
        raise ValueError(f"src and dst must have the same shape, got {uv.shape} and {xy.shape}")
    u, v, x, y = uv[:, 0].tolist(), uv[:, 1].tolist(), xy[:, 0].tolist(), xy[:, 1].tolist()
    m = _fit(u, v, x, y)
    if reflective:
        r = _fit(u, v, [-t for t in x], y)
        m2 = (-r[0], -r[1], -r[2], r[3], r[4], r[5])  # undo the reflection of the target: x -> -x
        if _residual_norm(m2, u, v, x, y) < _residual_norm(m, u, v, x, y):
            m = m2
    return np.array(m, dtype=np.float64).reshape(2, 3)


def warp_points(matrix, pts) -> np.ndarray:
    """Apply a 2 x 3 affine matrix to N x 2 points."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(pts, dtype=np.float64)
    return p @ m[:, :2].T + m[:, 2]


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Return a 3-channel BGR uint8 view/copy of a grayscale, BGR or BGRA uint8 image."""
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (as cv2.imread returns), got dtype {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.ndim == 3 and img.shape[2] == 4:
        # Alpha is dropped, not composited: cv2.imread(IMREAD_COLOR) does the same.
        return np.ascontiguousarray(img[:, :, :3])
    raise ValueError(f"image must be H x W, H x W x 1, H x W x 3 or H x W x 4, got shape {img.shape}")


def cut_wide_crop(image: np.ndarray, input_size) -> Optional[np.ndarray]:
    """Fit an aligned crop to a model's ``(H, W)``: the crop itself when it has that size; the central
    columns when it is the wide (112x112) version of a narrower (112x96) input; else None.

    The 112x112 template is the 112x96 one shifted by 8 px in x (docs/theory.md#five-point-alignment), so the middle 96
    columns of a 112x112 crop are exactly the 112x96 alignment.
    """
    h, w = int(input_size[0]), int(input_size[1])
    ih, iw = image.shape[:2]
    if (ih, iw) == (h, w):
        return image
    if ih == h and iw > w and (iw - w) % 2 == 0:
        dx = (iw - w) // 2
        return image[:, dx : dx + w]
    return None


def alignment_matrix(landmarks, template: str = "112x96", reflective: bool = True) -> np.ndarray:
    """The 2 x 3 matrix that maps 0-based ``landmarks`` (5 x 2) onto the 0-based template."""
    pts = _as_points(landmarks, "landmarks")
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks must be 5 x 2 (left eye, right eye, nose, left and right mouth corner), got shape {pts.shape}")
    return similarity_transform(pts, template_points(template), reflective=reflective)


def align_face(image: np.ndarray, landmarks, template: str = "112x96") -> np.ndarray:
    """Warp ``image`` so that its 5 ``landmarks`` (0-based, in the order of
    docs/theory.md#five-point-alignment) fit the SphereFace template.

    Returns a 112 x 96 x 3 (or 112 x 112 x 3) BGR uint8 crop: bilinear interpolation, black outside
    the image, like MATLAB ``imtransform`` in the original preprocessing. Grayscale input is expanded
    to three channels, an alpha channel is dropped.
    """
    import cv2

    img = to_bgr(image)
    h, w = template_size(template)
    m = alignment_matrix(landmarks, template)
    return cv2.warpAffine(
        img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
    )
