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

#: the constructor arguments every head takes from the trainer, never settings
HEAD_SIZE_ARGUMENTS = ("in_features", "num_classes")


def register_head(name: str):
    """Class decorator: register a head under ``name``. Its constructor's keyword arguments (after
    ``in_features`` and ``num_classes``) are its settings (``head.<setting>=value`` in a recipe), read from the
    signature itself: a constructor that hides them behind ``**kwargs`` is refused here."""
    def deco(cls):
        params = inspect.signature(cls).parameters.values()
        if any(p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL) for p in params):
            raise TypeError(f"head {name!r}: {getattr(cls, '__name__', cls)} takes *args/**kwargs; a head's settings "
                            "are its constructor's named keyword arguments (docs/heads.md#adding-a-head)")
        return HEADS.register(name)(cls)

    return deco


def create_head(name: str, in_features: int = 512, num_classes: int = 10572, **kwargs: Any) -> nn.Module:
    """Build the registered head ``name``; an unknown name raises an error listing the choices."""
    return HEADS.create(name, in_features=in_features, num_classes=num_classes, **kwargs)


def list_heads() -> List[str]:
    return HEADS.names()


def head_parameters(name: str) -> Dict[str, inspect.Parameter]:
    """The settings of the registered head ``name``: its constructor's keyword arguments (defaults and
    annotations as declared, string annotations resolved), ``in_features`` / ``num_classes`` left out."""
    cls = HEADS.get(name)
    try:  # resolve string annotations (from __future__ import annotations)
        hints = typing.get_type_hints(cls.__init__ if isinstance(cls, type) else cls)
    except Exception:  # an annotation that does not resolve: no type check for it
        hints = {}
    out = {}
    for pname, p in inspect.signature(cls).parameters.items():
        if pname in HEAD_SIZE_ARGUMENTS:
            continue
        if isinstance(p.annotation, str):
            p = p.replace(annotation=hints.get(pname, inspect.Parameter.empty))
        out[pname] = p
    return out


# importing the modules registers their heads
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
# the heads of the SphereFace family and the field beyond the originals (docs/heads_family.md; each file
# registers its heads)
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
