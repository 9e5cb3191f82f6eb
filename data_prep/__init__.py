"""Face detection, 5-point alignment to the SphereFace template, and dataset preparation.

``from data_prep import similarity_transform, align_face, create_detector``; names are resolved on
first use, so importing the package has no side effects.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "similarity_transform": "data_prep.geometry",
    "align_face": "data_prep.geometry",
    "TEMPLATES": "data_prep.geometry",
    "create_detector": "data_prep.detectors",
    "list_detectors": "data_prep.detectors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
