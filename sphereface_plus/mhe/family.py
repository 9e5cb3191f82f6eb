"""One layer's term for every objective of :data:`~sphereface_plus.mhe.objectives.OBJECTIVES`, and the state
of the objectives that keep one (``docs/theory.md#mhe-family``).

:func:`layer_term` dispatches to the pure functions of :mod:`~sphereface_plus.mhe.energy`,
:mod:`~sphereface_plus.mhe.comhe` and :mod:`~sphereface_plus.mhe.uniformity`. Three small state classes
hold what the authors' graphs keep between updates, each with ``advance(weights, lr, coefficients)`` (the
work done once per network update, before the network's loss), ``state_dict()`` and ``load_state_dict()``
(checkpoints; a resume is bit-exact):

- :class:`RandomProjectionState` (CoMHE-RP): ``pn x pd x D`` Gaussian projections per layer, drawn anew
  at every update. A draw is a pure function of ``(seed, update count, layer)``, so the state is one
  counter (the authors' ``tf.random_normal`` ops draw a new matrix at every ``sess.run``).
- :class:`LearnedProjectionState` (CoMHE-AP/AD): one ``pd x D`` projection per layer, initialised N(0, 1),
  trained by ``inner_steps`` plain gradient steps per update at the network's learning rate on the
  inner objective plus a weight decay of ``1e-3 * 5e-4`` (``train.py``: ``GradientDescentOptimizer(lr_)``
  on ``ploss_op = p_loss + 1e-3 * l2_regularizer(5e-4)``).
- :class:`PoleState` (MHP, MHC): one pole ``v`` per layer, initialised N(0, 1), trained by ``inner_steps``
  momentum steps per update (``MomentumOptimizer(lr_, 0.9)`` on ``± coef * term + l2_regularizer(5e-4)``).

New tensors are created on first use on the device and in the dtype of the layer's weight, from a CPU
generator seeded by ``(seed, layer index)``, so the same seed gives the same initial state everywhere.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional

import torch

from sphereface_plus.engine.sampler import derive_seed
from sphereface_plus.mhe import comhe, uniformity
from sphereface_plus.mhe.energy import mhe_energy
from sphereface_plus.mhe.objectives import (LEARNED_PROJECTIONS, OBJECTIVES, POLES, RANDOM_PROJECTIONS,
                                            ObjectiveSettings, check_objective)

logger = logging.getLogger(__name__)

__all__ = ["layer_term", "make_state", "RandomProjectionState", "LearnedProjectionState", "PoleState"]

# derive_seed streams of the family's randomness
_STREAM_INIT, _STREAM_DRAW = 11, 12


def _initial(seed: int, index: int, shape, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(seed, _STREAM_INIT, index))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


class _LayerState:
    """Common part: the objective, the layers (name -> index, in the regulariser's order) and which of them
    are projected. ``state_dict()`` names the objective; loading another objective's state is refused."""

    def __init__(self, objective: str, layers: Iterable[str], settings: ObjectiveSettings, projected: Iterable[str] = ()):
        self.objective = objective
        self.index = {name: i for i, name in enumerate(layers)}
        self.settings = settings
        self.projected = set(projected)

    def advance(self, weights: Dict[str, torch.Tensor], lr: float, coefficients: Dict[str, float]) -> None:
        """Nothing to do between updates."""

    def state_dict(self) -> Dict[str, Any]:
        return {"objective": self.objective}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("objective") != self.objective:
            raise ValueError(f"MHE state of objective {state.get('objective')!r} cannot be loaded into objective "
                             f"{self.objective!r} (was the checkpoint written with another objective?)")


class RandomProjectionState(_LayerState):
    """CoMHE-RP: the draw of update ``count`` for layer ``i`` comes from ``derive_seed(seed, 12, count, i)``."""

    def __init__(self, objective, layers, settings, projected=()):
        super().__init__(objective, layers, settings, projected)
        self.count = 0
        self._cache: Dict[str, torch.Tensor] = {}

    def projections(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The current ``pn x pd x D`` draw of layer ``name`` (cached until the next :meth:`advance`)."""
        p = self._cache.get(name)
        if p is None or p.device != weight.device or p.dtype != weight.dtype:
            gen = torch.Generator(device=weight.device)
            gen.manual_seed(derive_seed(self.settings.seed, _STREAM_DRAW, self.count, self.index[name]))
            p = comhe.random_projections(self.settings.projections, self.settings.projection_dim, weight[0].numel(),
                                         gen, weight.device, weight.dtype)
            self._cache[name] = p
        return p

    def advance(self, weights, lr, coefficients):
        self.count += 1
        self._cache.clear()

    def state_dict(self):
        return {**super().state_dict(), "count": self.count}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.count = int(state["count"])
        self._cache.clear()


class LearnedProjectionState(_LayerState):
    """CoMHE-AP / CoMHE-AD: a projection per projected layer (``learned``: ``'angle'`` or ``'adversarial'``)."""

    def __init__(self, objective, layers, settings, projected=(), power: str = "2"):
        super().__init__(objective, layers, settings, projected)
        self.learned = "angle" if objective == "comhe_ap" else "adversarial"
        self.power = power
        self.proj: Dict[str, torch.Tensor] = {}
        self.lr: Optional[float] = None  # the learning rate of the last update (the look-ahead step's)

    def projection(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        p = self.proj.get(name)
        if p is None:
            p = _initial(self.settings.seed, self.index[name], (self.settings.projection_dim, weight[0].numel()), weight)
        elif p.device != weight.device or p.dtype != weight.dtype:
            p = p.to(device=weight.device, dtype=weight.dtype)
        self.proj[name] = p
        return p

    def advance(self, weights, lr, coefficients):
        for name, w in weights.items():
            if name in self.projected:
                p = self.projection(name, w)
                for _ in range(self.settings.inner_steps):
                    p = comhe.projection_step(w, p, lr, self.learned, self.power)
                self.proj[name] = p
        self.lr = float(lr)

    def state_dict(self):
        return {**super().state_dict(), "lr": self.lr,
                "projections": {k: v.detach().clone() for k, v in self.proj.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.lr = None if state["lr"] is None else float(state["lr"])
        self.proj = {k: v.detach().clone() for k, v in state["projections"].items()}


class PoleState(_LayerState):
    """MHP / MHC: a pole and its momentum buffer per layer."""

    def __init__(self, objective, layers, settings, half_space: Optional[Dict[str, bool]] = None):
        super().__init__(objective, layers, settings)
        self.half_space = dict(half_space or {})
        self.poles: Dict[str, torch.Tensor] = {}
        self.momentum: Dict[str, torch.Tensor] = {}

    def pole(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        v = self.poles.get(name)
        if v is None:
            v = _initial(self.settings.seed, self.index[name], (weight[0].numel(),), weight)
        elif v.device != weight.device or v.dtype != weight.dtype:
            v = v.to(device=weight.device, dtype=weight.dtype)
        self.poles[name] = v
        return v

    def term(self, name: str, weight: torch.Tensor, half_space: bool, check_finite: bool = False) -> torch.Tensor:
        """The layer's MHP / MHC energy with its pole."""
        v = self.pole(name, weight)
        if self.objective == "mhp":
            return uniformity.mhp_energy(weight, v, half_space, check_finite=check_finite)
        return uniformity.mhc_energy(weight, v, half_space, self.settings.gamma, check_finite=check_finite)

    def advance(self, weights, lr, coefficients):
        for _ in range(self.settings.inner_steps):
            for name, w in weights.items():
                self.poles[name], self.momentum[name] = uniformity.pole_step(
                    w, self.pole(name, w), self.momentum.get(name), lr, self.objective, coefficients[name],
                    self.half_space.get(name, False), self.settings.gamma or 10.0)

    def state_dict(self):
        return {**super().state_dict(),
                "poles": {k: v.detach().clone() for k, v in self.poles.items()},
                "momentum": {k: v.detach().clone() for k, v in self.momentum.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.poles = {k: v.detach().clone() for k, v in state["poles"].items()}
        self.momentum = {k: v.detach().clone() for k, v in state["momentum"].items()}


def make_state(objective: str, layers: Iterable[str], settings: ObjectiveSettings, projected: Iterable[str] = (),
               power: str = "2", half_space: Optional[Dict[str, bool]] = None) -> _LayerState:
    """The state of ``objective`` for ``layers`` (a stateless objective gets a state that holds nothing)."""
    spec = OBJECTIVES[check_objective(objective)]
    layers = list(layers)
    if spec.state == RANDOM_PROJECTIONS:
        return RandomProjectionState(spec.name, layers, settings, projected)
    if spec.state == LEARNED_PROJECTIONS:
        return LearnedProjectionState(spec.name, layers, settings, projected, power)
    if spec.state == POLES:
        return PoleState(spec.name, layers, settings, half_space)
    return _LayerState(spec.name, layers, settings)


def layer_term(objective: str, weight: torch.Tensor, half_space: bool, power: str, state: _LayerState,
               name: str, check_finite: bool = False) -> torch.Tensor:
    """One layer's term of ``objective`` before its coefficient and sign (``docs/theory.md#mhe-family``).

    A CoMHE layer that is not among ``state.projected`` (neurons of at most ``projection_dim`` entries,
    and output layers) takes the plain MHE energy, as the authors' code does for its first and last layers.
    """
    if objective == "mhe":
        return mhe_energy(weight, power, half_space=half_space, check_finite=check_finite)
    if objective.startswith("comhe_"):
        if name not in state.projected:
            return mhe_energy(weight, power, half_space=half_space, check_finite=check_finite)
        if isinstance(state, RandomProjectionState):
            return comhe.comhe_rp_energy(weight, state.projections(name, weight), power, half_space, check_finite)
        return comhe.comhe_learned_energy(weight, state.projection(name, weight), state.lr or 0.0, state.learned,
                                          power, half_space, check_finite)
    if objective == "mhs":
        return uniformity.mhs_energy(weight, half_space, check_finite=check_finite)
    if objective == "r_mhp":
        return uniformity.r_mhp_energy(weight, check_finite=check_finite)
    if objective == "mgd":
        return uniformity.mgd_energy(weight, half_space, check_finite=check_finite)
    return state.term(name, weight, half_space, check_finite=check_finite)  # MHP, MHC: the layer's pole
