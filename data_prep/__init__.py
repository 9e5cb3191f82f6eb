"""Face detection, 5-point alignment to the SphereFace template, and dataset preparation.

``from data_prep import similarity_transform, align_face, create_detector``; names are resolved on
first use, so importing the package has no side effects.
"""
from __future__ import annotations

from sphereface_plus.lazy_exports import lazy_exports

_EXPORTS = {
    "similarity_transform": "data_prep.geometry",
    "align_face": "data_prep.geometry",
    "TEMPLATES": "sphereface_plus.templates",
    "create_detector": "data_prep.detectors",
    "list_detectors": "data_prep.detectors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
