"""Classifier heads: registry ``create_head(name, in_features, num_classes, **kw)``.

Every head is a :class:`~sphereface_plus.heads.base.ClassifierHead` returning a
:class:`~sphereface_plus.heads.base.HeadOutput` ``(loss, logits, terms)`` (the contract: :mod:`.base`,
docs/heads.md). Registered: ``a_softmax`` (SphereFace), ``softmax`` (plain linear), ``cosface``,
``arcface`` (and whatever other modules register). The pure functions underneath (``psi``,
``a_softmax_logits``, ``cosface_logits``, ``arcface_logits``, ``a_softmax_lambda``) are re-exported
here; the modules live in :mod:`.modules`. ``A_SOFTMAX_GRADIENTS`` lists the backward passes
``a_softmax`` offers (``gradient='exact'``, ``'caffe'`` or ``'detached'``). :func:`head_parameters` is
the one list of a head's settings (its constructor's keyword arguments) and their defaults.
"""
from __future__ import annotations

import inspect
import typing
from typing import Any, Dict, List

import torch.nn as nn

from sphereface_plus.registry import Registry

HEADS = Registry("head")
register_head = HEADS.register


def create_head(name: str, in_features: int = 512, num_classes: int = 10572, **kwargs: Any) -> nn.Module:
    """Build the registered head ``name``; an unknown name raises an error listing the choices."""
    return HEADS.create(name, in_features=in_features, num_classes=num_classes, **kwargs)


def list_heads() -> List[str]:
    return HEADS.names()


#: the constructor arguments every head takes from the trainer, never settings
HEAD_SIZE_ARGUMENTS = ("in_features", "num_classes")


def head_parameters(name: str) -> Dict[str, inspect.Parameter]:
    """The settings of the registered head ``name``: its constructor's keyword arguments (defaults and
    annotations as declared), ``in_features`` / ``num_classes`` left out. A builder that passes
    ``**kwargs`` on is looked through to the class its return annotation names."""
    builder = HEADS.get(name)
    target = builder
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        hints = typing.get_type_hints(builder) if not isinstance(builder, type) else {}
        cls = hints.get("return")
        if isinstance(cls, type):
            target = cls
            params = inspect.signature(cls).parameters
    out = {}
    for pname, p in params.items():
        if pname in HEAD_SIZE_ARGUMENTS or p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if p.annotation is not inspect.Parameter.empty and isinstance(p.annotation, str):
            try:  # resolve string annotations (from __future__ import annotations)
                hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
                p = p.replace(annotation=hints.get(pname, p.annotation))
            except Exception:  # an annotation that does not resolve: no type check for it
                p = p.replace(annotation=inspect.Parameter.empty)
        out[pname] = p
    return out


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
    "head_parameters",
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
