"""SphereFace-R (SphereFace Revived, Liu et al., TPAMI 2022): the head ``sphereface_r``.

Three ways to put the multiplicative margin ``m`` on the angle (``version``, the paper's v0/v1/v2, as
OpenSphere_v0 ``model/head/spherefacer.py`` ``get_d_theta`` computes them), each with hard or soft
feature normalisation (``norm``), the margin added as a detached offset (OpenSphere's "characteristic
gradient detachment"), docs/theory.md#sphereface-r:

- ``v0``: the target ``ψ(θ_y) = (-1)^k cos(m θ_y) - 2k``, ``k = floor(m θ_y / π)`` (SphereFace's ψ for a
  real ``m``); non-targets ``cos θ_j``.
- ``v1``: the target ``cos(min(m θ_y, 3.14159))``; non-targets ``cos θ_j``.
- ``v2``: the target ``cos θ_y``; non-targets ``cos(θ_j / m)`` (the margin moves the other classes).

Angles are ``arccos(clamp(cos, -1 + 1e-5, 1 - 1e-5))`` on every column, as in the reference, and the
offset ``d = φ - cos θ`` is computed for every column (so the clamps show in the non-target columns
too). Hard: logits ``s (cos θ + d)``, loss ``lw / s * CE``. Soft: logits ``|x| (cos θ + d)`` (the gradient
flows through ``|x|``), loss ``lw / s * CE + t * mean_b | |x_b| - s |``.

The margin schedule is head state: ``m(t) = m + dm * #{step in steps : step < t}`` at the ``t``-th
training forward (OpenSphere_v0's ``SphereFaceR_S``: ``m = 1 + dm * n_step``, the counter advanced
before use), ``t`` the buffer ``iteration`` saved in checkpoints.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch

from sphereface_plus.heads import register_head
from sphereface_plus.heads.base import ClassifierHead
from sphereface_plus.heads.geometry import (PI_CLAMP, WEIGHT_GRADIENTS, check_choice, clamped_acos,
                                            feature_cosine, target_mask, unit_rows)

__all__ = [
    "SPHEREFACE_R_VERSIONS",
    "FEATURE_NORMS",
    "MARGIN_GRADIENTS",
    "ACOS_EPS",
    "sphereface_r_phi",
    "sphereface_r_margin",
    "SphereFaceRHead",
]

SPHEREFACE_R_VERSIONS = ("v0", "v1", "v2")
FEATURE_NORMS = ("hard", "soft")
# "detached": the margin offset carries no gradient (OpenSphere); "exact": autograd of the forward
MARGIN_GRADIENTS = ("detached", "exact")
ACOS_EPS = 1e-5  # OpenSphere's clamp of the cosine before arccos

# OpenSphere_v0's defaults (SphereFaceR_H / SphereFaceR_S), by feature normalisation
_DEFAULTS = {
    "hard": {"m": 1.5, "dm": 0.0},
    "soft": {"m": 1.0, "dm": 1.5},
}


def sphereface_r_phi(cos: torch.Tensor, target: torch.Tensor, m: float, version: str) -> torch.Tensor:
    """``φ`` of every column (B x C), ``target`` the boolean one-hot (docs/theory.md#sphereface-r).

    Differentiable through the clamped arccos (used as is by ``gradient='exact'``)."""
    check_choice(version, SPHEREFACE_R_VERSIONS, "SphereFace-R version")
    theta = clamped_acos(cos, ACOS_EPS)
    m_theta = torch.where(target, theta * float(m), theta)
    if version == "v0":
        k = torch.floor(m_theta / math.pi).detach()
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * torch.cos(m_theta) - 2.0 * k
    if version == "v1":
        return torch.cos(m_theta.clamp(ACOS_EPS, PI_CLAMP))
    return torch.cos(m_theta / float(m))


def sphereface_r_margin(cos: torch.Tensor, target: torch.Tensor, m: float, version: str,
                        gradient: str = "detached") -> torch.Tensor:
    """``cos θ + d`` with ``d = φ - cos θ`` detached (``'detached'``, OpenSphere) or not (``'exact'``)."""
    check_choice(gradient, MARGIN_GRADIENTS, "SphereFace-R gradient")
    if gradient == "exact":
        return sphereface_r_phi(cos, target, m, version)
    with torch.no_grad():
        d = sphereface_r_phi(cos, target, m, version) - cos
    return cos + d


@register_head("sphereface_r")
class SphereFaceRHead(ClassifierHead):
    """SphereFace-R (TPAMI 2022), OpenSphere_v0's ``SphereFaceR_H`` (``norm='hard'``) and ``SphereFaceR_S``
    (``norm='soft'``); formulas in the module docstring and docs/theory.md#sphereface-r.

    Args:
        version: ``'v0'`` (default; the ψ of SphereFace with a real m), ``'v1'``, ``'v2'``.
        norm: ``'hard'`` (default; features rescaled to ``s``) or ``'soft'`` (``|x|`` kept, pulled to
            ``s`` by ``t * mean | |x| - s |``).
        s: feature scale (30, OpenSphere_v0; the published VGGFace2 v2 recipe uses 60).
        m: the margin (hard: 1.5; soft: 1.0, the start of the schedule).
        dm, steps: ``m(t) = m + dm * #{step < t}`` (hard: dm 0; soft: dm 1.5; steps ``[]``).
        t: weight of the soft norm term (0.01).
        lw: loss weight; the main loss is ``lw / s * CE`` (50).
        gradient: ``'detached'`` (default, OpenSphere: the margin offset has no gradient) or ``'exact'``.
        weight_gradient: ``'stored'`` (default, OpenSphere: in-place unit rows, plain gradient) or
            ``'normalized'`` (normalise in the graph).
    """

    @classmethod
    def settings_in_force(cls, settings: Dict[str, Any]) -> Dict[str, Any]:
        """``m`` and ``dm`` follow the feature normalisation when not given (hard or soft: OpenSphere's)."""
        out = dict(settings)
        defaults = _DEFAULTS.get(out.get("norm", "hard"))
        for key in ("m", "dm"):
            if out.get(key) is None and defaults is not None:
                out[key] = float(defaults[key])
        return out

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        version: str = "v0",
        norm: str = "hard",
        s: float = 30.0,
        m: Optional[float] = None,
        dm: Optional[float] = None,
        steps: Sequence[int] = (),
        t: float = 0.01,
        lw: float = 50.0,
        gradient: str = "detached",
        weight_gradient: str = "stored",
    ):
        super().__init__(in_features, num_classes, renorm_weight=(weight_gradient == "stored"))
        self.version = check_choice(version, SPHEREFACE_R_VERSIONS, "SphereFace-R version")
        self.norm = check_choice(norm, FEATURE_NORMS, "SphereFace-R feature normalisation")
        self.gradient = check_choice(gradient, MARGIN_GRADIENTS, "SphereFace-R gradient")
        self.weight_gradient = check_choice(weight_gradient, WEIGHT_GRADIENTS, "weight gradient")
        defaults = _DEFAULTS[self.norm]
        self.s = float(s)
        self.m = float(defaults["m"] if m is None else m)
        self.dm = float(defaults["dm"] if dm is None else dm)
        self.steps = sorted(int(v) for v in steps)
        self.t = float(t)
        self.lw = float(lw)
        if self.s <= 0 or self.m <= 0 or self.lw < 0 or self.t < 0:
            raise ValueError(f"SphereFace-R needs s > 0, m > 0, lw >= 0, t >= 0; got s={s}, m={self.m}, lw={lw}, t={t}")
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    # schedule
    def m_at(self, iteration: int) -> float:
        return self.m + self.dm * sum(1 for step in self.steps if step < int(iteration))

    @property
    def current_m(self) -> float:
        return self.m_at(int(self.iteration))

    def begin_forward(self) -> None:
        super().begin_forward()
        if self.training:
            self.iteration += 1

    def state_terms(self):
        return {"m": torch.tensor(self.current_m)}

    # hooks
    @property
    def loss_weight(self) -> float:
        return self.lw / self.s

    def margin_logits(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        cos, x_norm = feature_cosine(embeddings, unit_rows(self.weight, self.weight_gradient))
        scale = self.s if self.norm == "hard" else x_norm
        if labels is None:
            return scale * cos
        value = sphereface_r_margin(cos, target_mask(labels, cos), self.current_m, self.version, self.gradient)
        return scale * value

    def aux_loss(self, embeddings: torch.Tensor):
        if self.norm == "hard":
            return super().aux_loss(embeddings)
        norm_loss = (embeddings.norm(dim=1) - self.s).abs().mean()
        return self.t * norm_loss, {"norm_loss": norm_loss}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, version={self.version!r}, "
                f"norm={self.norm!r}, s={self.s}, m={self.m}, dm={self.dm}, steps={self.steps}, t={self.t}, "
                f"lw={self.lw}, gradient={self.gradient!r}, weight_gradient={self.weight_gradient!r}")
