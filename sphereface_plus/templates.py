"""The alignment templates: the one owner of their names, crop sizes and landmark positions.

A template says where the five landmarks (left eye, right eye, nose tip, left mouth corner, right mouth
corner, as seen in the image) land in an aligned crop, and the crop's size
(docs/theory.md#five-point-alignment). It is a fact every floor needs: the recipes check
``data.template`` and the importers record the template a model was trained on (the library), alignment
warps to it (``data_prep.geometry``), evaluation embeds crops of its size (``eval``). So it lives here, at
the bottom, and the others import it.

``150x150`` is dlib's face chip (size 150, padding 0.25): its points follow from dlib's mean face shape
by :func:`dlib_chip_points`, and it is fitted without the mirror-image candidate
(:data:`NONREFLECTIVE_TEMPLATES`, docs/theory.md#dlib-chip).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

__all__ = ["TEMPLATES", "TEMPLATE_SIZES", "NONREFLECTIVE_TEMPLATES", "template_entry", "dlib_chip_points",
           "DLIB_CHIP_SIZE", "DLIB_CHIP_PADDING", "DLIB_FRAME_FIVE_POINTS", "DLIB_FRAME_PREDICTOR_POINTS"]

# Published SphereFace template for a 112 (h) x 96 (w) crop, (x, y), MATLAB 1-based coordinates:
# left eye, right eye, nose tip, left mouth corner, right mouth corner.
_TEMPLATE_112x96_MATLAB = np.array(
    [
        [30.2946, 51.6963],
        [65.5318, 51.5014],
        [48.0252, 71.7366],
        [33.5493, 92.3655],
        [62.7299, 92.2041],
    ],
    dtype=np.float64,
)

# dlib's face frame (dlib/image_transforms/interpolation.h, get_face_chip_details): the unit square in which
# its mean face shape lies. The iBUG 300-W points of that mean shape that the toolkit's five landmarks
# correspond to, (x, y): the eye contours 36-41 (the eye on the image's left) and 42-47, the nose tip 30,
# the mouth corners 48 and 54.
_DLIB_MEAN_FACE = {
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852), 39: (0.334606, 0.231733),
    40: (0.260918, 0.245099), 41: (0.182743, 0.244077), 42: (0.645647, 0.231733), 43: (0.714428, 0.179852),
    44: (0.793132, 0.178758), 45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    30: (0.490127, 0.515625), 48: (0.254149, 0.780233), 54: (0.726104, 0.780233),
}
#: the toolkit's five landmarks in dlib's face frame: eye centres (the mean of each eye's six contour
#: points), nose tip, mouth corners (docs/theory.md#dlib-chip)
DLIB_FRAME_FIVE_POINTS = np.array(
    [np.mean([_DLIB_MEAN_FACE[i] for i in range(36, 42)], axis=0),
     np.mean([_DLIB_MEAN_FACE[i] for i in range(42, 48)], axis=0),
     _DLIB_MEAN_FACE[30], _DLIB_MEAN_FACE[48], _DLIB_MEAN_FACE[54]], dtype=np.float64)
#: the points of dlib's own 5-point shape predictor in the same frame (get_face_chip_details): the outer and
#: inner corner of the eye on the image's right, the outer and inner corner of the other eye, the nose base
DLIB_FRAME_PREDICTOR_POINTS = np.array(
    [[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677], [0.1205750620789, 0.2137274526848],
     [0.3340850613712, 0.2290642403242], [0.4901123135679, 0.6277975316475]], dtype=np.float64)
DLIB_CHIP_SIZE, DLIB_CHIP_PADDING = 150, 0.25


def dlib_chip_points(frame_points, size: int = DLIB_CHIP_SIZE, padding: float = DLIB_CHIP_PADDING) -> np.ndarray:
    """0-based pixel positions in dlib's ``size`` x ``size`` face chip of points of dlib's face frame.

    ``get_face_chip_details`` places a frame point ``u`` at ``size * (padding + u) / (1 + 2 padding)``;
    its chip extraction then maps the chip's corner pixels onto a rectangle one pixel narrower than
    ``size`` chip units (``centered_drect``), which puts every chip pixel half a pixel from that position
    (exactly where the face's scale in the image is one chip pixel per image pixel; the scale difference
    elsewhere is ``(1 - 1/s) / (size - 1)``, docs/theory.md#dlib-chip).
    """
    u = np.asarray(frame_points, dtype=np.float64)
    return size * (padding + u) / (1 + 2 * padding) - 0.5


#: name -> (crop height, crop width, 5 x 2 template points in MATLAB 1-based coordinates).
#: ``112x112`` is the same face placed in a wider crop: x + 8 (docs/theory.md#five-point-alignment).
#: ``150x150`` is dlib's face chip (docs/theory.md#dlib-chip), stored 1-based like the others.
TEMPLATES: Dict[str, Tuple[int, int, np.ndarray]] = {
    "112x96": (112, 96, _TEMPLATE_112x96_MATLAB),
    "112x112": (112, 112, _TEMPLATE_112x96_MATLAB + np.array([8.0, 0.0])),
    "150x150": (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE, dlib_chip_points(DLIB_FRAME_FIVE_POINTS) + 1.0),
}
#: templates fitted without the mirror-image candidate: dlib's chip is a rotation + scale + shift only
#: (``find_similarity_transform``); SphereFace's are MATLAB's ``cp2tform(..., 'similarity')``
NONREFLECTIVE_TEMPLATES = ("150x150",)

#: name -> (crop height, crop width)
TEMPLATE_SIZES: Dict[str, Tuple[int, int]] = {name: (h, w) for name, (h, w, _) in TEMPLATES.items()}


def template_entry(template: str) -> Tuple[int, int, np.ndarray]:
    """``(height, width, points)`` of a template; ValueError naming the choices for an unknown name."""
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}") from None
