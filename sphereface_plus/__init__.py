"""SphereFace / SphereFace+ and Minimum Hyperspherical Energy (MHE) in PyTorch.

The public API is importable from the top of the package::

    from sphereface_plus import create_backbone, create_head, classifier_mhe, MHERegularizer

Names are resolved on first use, so ``import sphereface_plus`` has no side effects and does not
import torch until a model or loss is asked for.
"""
from __future__ import annotations

from sphereface_plus.lazy_exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "create_backbone": "sphereface_plus.models",
    "list_backbones": "sphereface_plus.models",
    "register_backbone": "sphereface_plus.models",
    "backbone_from_config": "sphereface_plus.models",
    "create_head": "sphereface_plus.heads",
    "list_heads": "sphereface_plus.heads",
    "register_head": "sphereface_plus.heads",
    "psi": "sphereface_plus.heads",
    "a_softmax_logits": "sphereface_plus.heads",
    "mhe_energy": "sphereface_plus.mhe",
    "classifier_mhe": "sphereface_plus.mhe",
    "MHERegularizer": "sphereface_plus.mhe",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
