"""The face model trained by the face trainer: backbone + classifier head + the SphereFace+ MHE term.

``FaceModel(images, labels) -> (HeadOutput, mhe)``: the backbone runs under the trainer's autocast; the
head, its loss and the MHE term always in float32 (float64 in the reference mode): cos(m theta)
polynomials lose too much in 16 bits. ``mhe`` is the unweighted classifier energy; the trainer's loss is
``out.loss + lambda_m * mhe`` (docs/theory.md#sphereface-plus), the one place lambda_M is applied. The MHE
term is computed inside the forward so that DDP sees every use of the head's weight in one graph; how it
is computed over the processes is the layout's (:mod:`sphereface_plus.face.layout`). Another objective of
the MHE family (``mhe_term``, a :class:`~sphereface_plus.mhe.ClassifierMHE`; docs/theory.md#classifier-family)
replaces MHE's term; its projections or poles are its own state, which the trainer advances and saves.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

__all__ = ["FaceModel", "head_dtype"]


def head_dtype(t: torch.Tensor) -> torch.Tensor:
    """The head, the losses and MHE run in float32 whatever the backbone's autocast (cos(m theta)
    polynomials lose too much in 16 bits), or in float64 in the float64 reference mode."""
    return t if t.dtype == torch.float64 else t.float()


class FaceModel(nn.Module):
    """``backbone`` and ``head`` as one module (parameters: backbone first, then head, in every layout, so
    optimiser state dicts line up between layouts); ``layout`` (not a module) says how the head is split."""

    def __init__(self, backbone: nn.Module, head: nn.Module, layout: Any, lambda_m: float = 0.0,
                 mhe_power: str = "2", mhe_mode: str = "batch_vs_all", mhe_variant: str = "mhe",
                 mhe_term: Optional[Any] = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.layout = layout
        self.lambda_m, self.mhe_power, self.mhe_mode = float(lambda_m), str(mhe_power), mhe_mode
        self.mhe_variant = mhe_variant  # sphereface_plus.mhe.MHE_VARIANTS
        self.mhe_term = mhe_term  # another objective of the family (ClassifierMHE), or None for MHE's own

    def forward(self, images: torch.Tensor, labels: torch.Tensor, backbone: Optional[nn.Module] = None):
        """``backbone``: the DDP-wrapped backbone when only the backbone is data-parallel (a sharded head)."""
        emb = (backbone or self.backbone)(images)
        with torch.autocast(images.device.type, enabled=False):
            out = self.head(head_dtype(emb), labels)
            if self.lambda_m > 0 and self.mhe_term is not None:
                mhe = self.mhe_term(head_dtype(self.head.weight), labels)
            elif self.lambda_m > 0:
                mhe = self.layout.classifier_mhe(self.head, out, labels, self.mhe_power, self.mhe_mode,
                                                 self.mhe_variant)
            else:
                mhe = out.loss.new_zeros(())
        return out, mhe

    def state_terms(self) -> Dict[str, torch.Tensor]:
        """The head's schedule values in force (``ClassifierHead.state_terms``: A-Softmax's ``lambda``)."""
        return self.head.state_terms()
