"""Verification (LFW 10-fold, any pairs list, insightface .bin packs) and MegaFace scoring.

``from eval import load_bin_pack``; names are resolved on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_bin_pack": "eval.pairs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
