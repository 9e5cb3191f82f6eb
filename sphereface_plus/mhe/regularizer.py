"""MHE and its family on the convolution and linear layers of a whole network: :class:`MHERegularizer`.

``loss = hidden_coef * Σ_hidden E_layer + output_coef * E_output``, each ``E`` the layer energy of
:func:`sphereface_plus.mhe.energy.mhe_energy` (hidden layers with an optional half-space form, the output
layer always full-space), as in the CIFAR experiments of Liu et al., "Learning towards Minimum
Hyperspherical Energy" (NeurIPS 2018); ``docs/theory.md#mhe-kernels``. :data:`DEFAULT_COEFFICIENTS`
holds the reference code's two weights by kernel. ``objective`` picks another member of the family
(:data:`~sphereface_plus.mhe.objectives.OBJECTIVES`: CoMHE, MHS, MHP, R-MHP, MHC, MGD), ``E`` then being
that objective's layer term (``docs/theory.md#mhe-family``).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from sphereface_plus.mhe.family import layer_term, make_state
from sphereface_plus.mhe.kernels import normalize_power
from sphereface_plus.mhe.objectives import (DEFAULT_COEFFICIENTS, DEFAULT_OBJECTIVE, OBJECTIVES, ObjectiveSettings,
                                            check_objective, default_coefficients, resolve_settings)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_COEFFICIENTS", "MHERegularizer"]

LayerPatterns = Optional[Union[str, Sequence[str]]]


def _as_patterns(p: LayerPatterns) -> Optional[List[str]]:
    if p is None:
        return None
    if isinstance(p, str):
        return [p]
    return list(p)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


class MHERegularizer:
    """MHE on the convolution and linear layers of a model (``docs/theory.md#mhe-kernels``).

    ``loss = hidden_coef * Σ_hidden E_layer + output_coef * E_output``. Hidden layers use half-space MHE
    when ``half_space=True``; the output layer is always full-space.

    Args:
        model: any ``nn.Module``; its ``Linear`` and ``Conv1d/2d/3d`` layers are the candidates, named
            as in ``model.named_modules()`` (e.g. ``features.conv1_1``, ``fc6``, ``score``).
        power: kernel (see :func:`mhe_energy`); ``None``: ``'0'`` for MHE, the authors' ``'2'`` for CoMHE
            (the other objectives have no kernel and refuse one).
        half_space: the half-space form on the hidden layers.
        hidden_coef, output_coef: weights of the two terms; ``None`` takes the authors' weights:
            :data:`DEFAULT_COEFFICIENTS` for ``power`` (1 and 10 for 0/1/2/a0; 0.1 and 1 for a1/a2) for MHE
            and CoMHE, the objective's own for the others
            (:func:`~sphereface_plus.mhe.objectives.default_coefficients`).
        include: shell-style patterns (``fnmatch``) of layer names to regularise; default all candidates.
        exclude: patterns of layer names to leave out (applied after ``include``).
        output_layers: patterns naming the output layer(s); default: the model's last conv/linear
            layer in module order (``score`` for ``cifar_cnn9``), if it is among the selected layers.
            Pass ``()`` for no output layer. (On a face backbone alone the last layer is the embedding
            ``fc5``, not a classifier: pass ``output_layers=()`` there and use :func:`classifier_mhe`
            on the head's weight.)
        check_finite: refuse NaN/inf weights (see :func:`mhe_energy`; off saves a sync per layer).
        objective: a name of :data:`~sphereface_plus.mhe.objectives.OBJECTIVES` (default ``'mhe'``).
        settings: the objective's settings (:func:`~sphereface_plus.mhe.objectives.resolve_settings`;
            ``None``: the authors' defaults).

    Calling the regulariser returns ``(loss, values)``: the weighted sum (with gradient) and a dict
    ``layer name -> detached term`` for logging, each term with the sign it enters the loss with (MHP's
    polarisation, which the network maximises, is logged negative). Layers with fewer than two neurons
    are skipped (with a warning): they have no pair.

    Objectives with state (CoMHE's projections, MHP/MHC's poles) need :meth:`advance` once per network
    update, before the loss, with the update's learning rate (their inner optimisers run at it); their
    state is in :meth:`state_dict` / :meth:`load_state_dict` for checkpoints. ``advance`` does nothing for
    the others, so a training loop may call it whatever the objective.
    """

    def __init__(
        self,
        model: nn.Module,
        power: Optional[Union[str, int]] = None,
        half_space: bool = False,
        hidden_coef: Optional[float] = None,
        output_coef: Optional[float] = None,
        include: LayerPatterns = None,
        exclude: LayerPatterns = None,
        output_layers: LayerPatterns = None,
        check_finite: bool = True,
        objective: str = DEFAULT_OBJECTIVE,
        settings: Optional[ObjectiveSettings] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MHERegularizer needs an nn.Module, got {type(model).__name__}")
        self.objective = check_objective(objective)
        spec = OBJECTIVES[self.objective]
        if power is not None and not spec.uses_power:
            raise ValueError(f"MHE objective {self.objective!r} has no kernel: leave power unset (got {power!r})")
        self.power = normalize_power(power if power is not None else ("0" if self.objective == "mhe" else "2"))
        self.half_space = bool(half_space)
        if self.half_space and not spec.half_space:
            raise ValueError(f"MHE objective {self.objective!r} has no half-space form (the sum of [W; -W] is 0): "
                             f"use half_space=False")
        given = settings if settings is not None else ObjectiveSettings()
        self.settings = resolve_settings(self.objective, given.projection_dim, given.projections, given.inner_steps,
                                         given.gamma, given.seed)
        self.check_finite = bool(check_finite)
        default_hidden, default_output = default_coefficients(self.objective, self.power)
        self.hidden_coef = float(default_hidden if hidden_coef is None else hidden_coef)
        self.output_coef = float(default_output if output_coef is None else output_coef)
        include_p, exclude_p = _as_patterns(include), _as_patterns(exclude) or []
        candidates = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(m, "weight", None) is not None
        ]
        selected = [
            (name, m)
            for name, m in candidates
            if (include_p is None or _matches(name, include_p)) and not _matches(name, exclude_p)
        ]
        if not selected:
            raise ValueError(
                f"MHERegularizer selected no layer (include={include_p}, exclude={exclude_p}); the model's "
                f"conv/linear layers are: {', '.join(n for n, _ in candidates) or '(none)'}"
            )
        usable = []
        for name, m in selected:
            if m.weight.shape[0] < 2:
                logger.warning("MHE skips layer %s: it has %d neuron(s), MHE needs at least 2", name, m.weight.shape[0])
            else:
                usable.append((name, m))
        if not usable:
            raise ValueError("MHERegularizer: every selected layer has fewer than 2 neurons")
        out_p = _as_patterns(output_layers)
        if out_p is None:
            # the model's output layer: its last conv/linear layer in module order, when it is selected
            out_names = {candidates[-1][0]} & {name for name, _ in usable}
        else:
            out_names = {name for name, _ in usable if _matches(name, out_p)}
            if out_p and not out_names:
                raise ValueError(
                    f"output_layers={out_p} matches none of the selected layers: {', '.join(n for n, _ in usable)}"
                )
        self.layers: List[Tuple[str, nn.Module, bool]] = [(name, m, name in out_names) for name, m in usable]
        self.sign = spec.sign
        # CoMHE projects the hidden layers whose neurons have more than projection_dim entries (the authors'
        # first conv, 3x3x3 = 27 inputs, and their output layer keep plain MHE)
        pd = self.settings.projection_dim
        projected = [name for name, m, is_out in self.layers if pd is not None and not is_out and m.weight[0].numel() > pd]
        self.state = make_state(self.objective, [name for name, *_ in self.layers], self.settings, projected,
                                self.power, {name: self._half(is_out) for name, _, is_out in self.layers})
        logger.debug(
            "MHE objective %s, power %s on %d hidden and %d output layers",
            self.objective,
            self.power,
            sum(not o for *_, o in self.layers),
            sum(o for *_, o in self.layers),
        )

    @property
    def hidden_layers(self) -> List[str]:
        return [name for name, _, is_out in self.layers if not is_out]

    @property
    def output_layers(self) -> List[str]:
        return [name for name, _, is_out in self.layers if is_out]

    def _half(self, is_out: bool) -> bool:
        return self.half_space and not is_out

    def coefficient(self, name: str) -> float:
        """The weight of layer ``name``'s term: ``output_coef`` for an output layer, else ``hidden_coef``."""
        is_out = next(o for n, _, o in self.layers if n == name)
        return self.output_coef if is_out else self.hidden_coef

    def advance(self, lr: float) -> None:
        """The objective's work between network updates, before the loss of the update at ``lr``: a new
        draw (CoMHE-RP), ``inner_steps`` steps of the projections (CoMHE-AP/AD) or poles (MHP/MHC) on the
        current weights. Nothing for the stateless objectives."""
        self.state.advance({name: m.weight for name, m, _ in self.layers}, lr,
                           {name: self.coefficient(name) for name, *_ in self.layers})

    def state_dict(self) -> Dict[str, object]:
        """The objective's state (only its name for the stateless objectives)."""
        return self.state.state_dict()

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Load :meth:`state_dict`; a state of another objective is refused."""
        self.state.load_state_dict(state)

    def __call__(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        values: Dict[str, torch.Tensor] = {}
        hidden_sum: Optional[torch.Tensor] = None
        output_sum: Optional[torch.Tensor] = None
        for name, module, is_out in self.layers:
            e = layer_term(self.objective, module.weight, self._half(is_out), self.power, self.state, name,
                           check_finite=self.check_finite)
            if self.sign != 1.0:
                e = self.sign * e
            values[name] = e.detach()
            if is_out:
                output_sum = e if output_sum is None else output_sum + e
            else:
                hidden_sum = e if hidden_sum is None else hidden_sum + e
        loss = None
        if hidden_sum is not None:
            loss = self.hidden_coef * hidden_sum
        if output_sum is not None:
            loss = self.output_coef * output_sum if loss is None else loss + self.output_coef * output_sum
        return loss, values

    def __repr__(self) -> str:
        return (
            f"MHERegularizer(objective={self.objective!r}, power={self.power!r}, half_space={self.half_space}, hidden_coef={self.hidden_coef}, "
            f"output_coef={self.output_coef}, hidden={self.hidden_layers}, output={self.output_layers})"
        )
