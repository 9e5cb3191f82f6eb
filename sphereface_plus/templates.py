"""The alignment templates: the one owner of their names, crop sizes and landmark positions.

A template says where the five landmarks (left eye, right eye, nose tip, left mouth corner, right mouth
corner, as seen in the image) land in an aligned crop, and the crop's size
(docs/theory.md#five-point-alignment). It is a fact every floor needs: the recipes check
``data.template`` and the importers record the template a model was trained on (the library), alignment
warps to it (``data_prep.geometry``), evaluation embeds crops of its size (``eval``). So it lives here, at
the bottom, and the others import it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

__all__ = ["TEMPLATES", "TEMPLATE_SIZES", "template_entry"]

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

#: name -> (crop height, crop width, 5 x 2 template points in MATLAB 1-based coordinates).
#: ``112x112`` is the same face placed in a wider crop: x + 8 (docs/theory.md#five-point-alignment).
TEMPLATES: Dict[str, Tuple[int, int, np.ndarray]] = {
    "112x96": (112, 96, _TEMPLATE_112x96_MATLAB),
    "112x112": (112, 112, _TEMPLATE_112x96_MATLAB + np.array([8.0, 0.0])),
}

#: name -> (crop height, crop width)
TEMPLATE_SIZES: Dict[str, Tuple[int, int]] = {name: (h, w) for name, (h, w, _) in TEMPLATES.items()}


def template_entry(template: str) -> Tuple[int, int, np.ndarray]:
    """``(height, width, points)`` of a template; ValueError naming the choices for an unknown name."""
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}") from None
