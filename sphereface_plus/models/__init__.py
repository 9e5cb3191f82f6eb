"""Backbone registry: ``create_backbone(name, **kwargs)``, ``list_backbones()``.

Each family lives in its own file and registers its sizes with ``@register_backbone``:
``sphere.py`` (SphereFace ResNets, SPEC section 3) and ``cifar.py`` (the 9-conv CIFAR CNN, SPEC
section 7).
"""
from __future__ import annotations

from typing import Any, List

import torch.nn as nn

from sphereface_plus.registry import Registry

BACKBONES = Registry("backbone")
register_backbone = BACKBONES.register


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name``; an unknown name raises an error listing the choices."""
    return BACKBONES.create(name, **kwargs)


def list_backbones() -> List[str]:
    return BACKBONES.names()


# importing the family modules registers their builders
from sphereface_plus.models import cifar as _cifar  # noqa: E402,F401
from sphereface_plus.models import sphere as _sphere  # noqa: E402,F401
