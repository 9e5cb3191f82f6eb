"""Verification (LFW 10-fold, any pairs list, insightface .bin packs, IJB 1:1 and 1:N) and MegaFace scoring.

``from eval import load_bin_pack, parse_pairs, evaluate_features, FaceEmbedder``; names are
resolved on first use, so importing the package loads neither torch nor matplotlib.
"""
from __future__ import annotations

from sphereface_plus.lazy_exports import lazy_exports

_EXPORTS = {
    "load_bin_pack": "eval.pairs",
    "parse_lfw_pairs": "eval.pairs",
    "parse_pairs_file": "eval.pairs",
    "folder_pairs": "eval.pairs",
    "Pair": "eval.pairs",
    "parse_pairs": "eval.lfw",
    "evaluate_features": "eval.lfw",
    "verification_report": "eval.verification_metrics",
    "PROTOCOLS": "eval.protocols",
    "protocol_report": "eval.protocols",
    "STANDARD_PACKS": "eval.packs",
    "kfold_accuracy": "eval.verification_metrics",
    "roc_curve": "eval.verification_metrics",
    "tar_at_far": "eval.verification_metrics",
    "extract_features": "eval.features",
    "load_embedding_model": "eval.features",
    "load_inference_model": "eval.runtime",
    "write_report": "eval.report",
    "FaceEmbedder": "eval.embedder",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
