"""MHE on the convolution and linear layers of a whole network: :class:`MHERegularizer`.

``loss = hidden_coef * Σ_hidden E_layer + output_coef * E_output``, each ``E`` the layer energy of
:func:`sphereface_plus.mhe.energy.mhe_energy` (hidden layers with an optional half-space form, the output
layer always full-space), as in the CIFAR experiments of Liu et al., "Learning towards Minimum
Hyperspherical Energy" (NeurIPS 2018); ``docs/theory.md#mhe-kernels``. :data:`DEFAULT_COEFFICIENTS`
holds the reference code's two weights by kernel.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from sphereface_plus.mhe.energy import mhe_energy
from sphereface_plus.mhe.kernels import normalize_power

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_COEFFICIENTS", "MHERegularizer"]

# (hidden, output) coefficients of the MHE reference code, by power: wy1iu/MHE code/architecture.py,
# _add_thomson_constraint (hidden layers) and _add_thomson_constraint_final (the output layer).
DEFAULT_COEFFICIENTS: Dict[str, Tuple[float, float]] = {
    "0": (1.0, 10.0),
    "1": (1.0, 10.0),
    "2": (1.0, 10.0),
    "a0": (1.0, 10.0),
    "a1": (0.1, 1.0),
    "a2": (0.1, 1.0),
}


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
        power: kernel (see :func:`mhe_energy`).
        half_space: half-space MHE on the hidden layers.
        hidden_coef, output_coef: weights of the two terms; ``None`` takes :data:`DEFAULT_COEFFICIENTS`
            for ``power`` (1 and 10 for 0/1/2/a0; 0.1 and 1 for a1/a2).
        include: shell-style patterns (``fnmatch``) of layer names to regularise; default all candidates.
        exclude: patterns of layer names to leave out (applied after ``include``).
        output_layers: patterns naming the output layer(s); default: the model's last conv/linear
            layer in module order (``score`` for ``cifar_cnn9``), if it is among the selected layers.
            Pass ``()`` for no output layer. (On a face backbone alone the last layer is the embedding
            ``fc5``, not a classifier: pass ``output_layers=()`` there and use :func:`classifier_mhe`
            on the head's weight.)
        check_finite: refuse NaN/inf weights (see :func:`mhe_energy`; off saves a sync per layer).

    Calling the regulariser returns ``(loss, values)``: the weighted sum (with gradient) and a dict
    ``layer name -> detached energy`` for logging. Layers with fewer than two neurons are skipped (with a
    warning): they have no pair.
    """

    def __init__(
        self,
        model: nn.Module,
        power: Union[str, int] = "0",
        half_space: bool = False,
        hidden_coef: Optional[float] = None,
        output_coef: Optional[float] = None,
        include: LayerPatterns = None,
        exclude: LayerPatterns = None,
        output_layers: LayerPatterns = None,
        check_finite: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MHERegularizer needs an nn.Module, got {type(model).__name__}")
        self.power = normalize_power(power)
        self.half_space = bool(half_space)
        self.check_finite = bool(check_finite)
        default_hidden, default_output = DEFAULT_COEFFICIENTS[self.power]
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
        logger.debug(
            "MHE power %s on %d hidden and %d output layers",
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

    def __call__(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        values: Dict[str, torch.Tensor] = {}
        hidden_sum: Optional[torch.Tensor] = None
        output_sum: Optional[torch.Tensor] = None
        for name, module, is_out in self.layers:
            e = mhe_energy(module.weight, self.power, half_space=self.half_space and not is_out,
                           check_finite=self.check_finite)
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
            f"MHERegularizer(power={self.power!r}, half_space={self.half_space}, hidden_coef={self.hidden_coef}, "
            f"output_coef={self.output_coef}, hidden={self.hidden_layers}, output={self.output_layers})"
        )
