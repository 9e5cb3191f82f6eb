"""Classifier heads (SPEC section 4): registry ``create_head(name, in_features, num_classes, **kw)``.

Registered: ``a_softmax`` (SphereFace), ``softmax`` (plain linear), ``cosface``, ``arcface``. The pure
functions underneath (``psi``, ``a_softmax_logits``, ``cosface_logits``, ``arcface_logits``,
``a_softmax_lambda``) are re-exported here; the modules live in :mod:`.modules`. ``A_SOFTMAX_GRADIENTS``
lists the backward passes ``a_softmax`` offers (``gradient='exact'`` or ``'caffe'``).
"""
from __future__ import annotations

from typing import Any, List

import torch.nn as nn

from sphereface_plus.registry import Registry

HEADS = Registry("head")
register_head = HEADS.register


def create_head(name: str, in_features: int = 512, num_classes: int = 10572, **kwargs: Any) -> nn.Module:
    """Build the registered head ``name``; an unknown name raises an error listing the choices."""
    return HEADS.create(name, in_features=in_features, num_classes=num_classes, **kwargs)


def list_heads() -> List[str]:
    return HEADS.names()


# importing the modules registers their builders
from sphereface_plus.heads.functional import (  # noqa: E402
    A_SOFTMAX_GRADIENTS,
    a_softmax_lambda,
    a_softmax_logits,
    arcface_logits,
    cosface_logits,
    psi,
    softmax_logits,
)
from sphereface_plus.heads.base import ClassifierHead, HeadOutput, NO_TARGET  # noqa: E402
from sphereface_plus.heads.modules import ArcFaceHead, ASoftmaxHead, CosFaceHead, SoftmaxHead  # noqa: E402
# the heads of issue 19 beyond the originals (each file registers its builder)
from sphereface_plus.heads.sphereface_r import SphereFaceRHead  # noqa: E402
from sphereface_plus.heads.sphereface2 import SphereFace2Head  # noqa: E402
from sphereface_plus.heads.adaface import AdaFaceHead  # noqa: E402
from sphereface_plus.heads.magface import MagFaceHead  # noqa: E402

__all__ = [
    "HEADS",
    "register_head",
    "create_head",
    "list_heads",
    "psi",
    "a_softmax_lambda",
    "a_softmax_logits",
    "A_SOFTMAX_GRADIENTS",
    "softmax_logits",
    "cosface_logits",
    "arcface_logits",
    "ClassifierHead",
    "HeadOutput",
    "NO_TARGET",
    "ASoftmaxHead",
    "SoftmaxHead",
    "CosFaceHead",
    "ArcFaceHead",
    "SphereFaceRHead",
    "SphereFace2Head",
    "AdaFaceHead",
    "MagFaceHead",
]
