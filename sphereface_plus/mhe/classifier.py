"""The SphereFace+ MHE term on a classifier's weights ``C x d``: :func:`classifier_mhe` and its modes.

SphereFace+ (Liu et al., "Learning towards Minimum Hyperspherical Energy", NeurIPS 2018) adds to the
A-Softmax loss an MHE term on the classifier's class rows; :data:`CLASSIFIER_MODES` lists the forms
offered (``docs/theory.md#classifier-mhe-modes``): the mini-batch form (the classes of the batch against
all other classes), the energy among the distinct batch classes, the exact full-space energy computed in
row blocks (memory ``O(block * C)``, never ``O(C^2)``), and the Caffe AMONG term of the released models
(:mod:`sphereface_plus.mhe.caffe_among`). The kernels are those of :mod:`sphereface_plus.mhe.kernels`.

``objective`` applies another member of the family (:data:`~sphereface_plus.mhe.objectives.OBJECTIVES`)
to the classifier's rows in the modes it offers (``docs/theory.md#classifier-family``), with explicit
projections or a pole; :class:`ClassifierMHE` holds them (and their inner optimisers) for a trainer.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch

from sphereface_plus.heads.functional import check_labels
from sphereface_plus.mhe.caffe_among import caffe_among_layer
from sphereface_plus.mhe import comhe, uniformity
from sphereface_plus.mhe.energy import (DENSE_MAX_NEURONS, _check_weight, _default_block, _dense_pair_energy,
                                        mhe_energy)
from sphereface_plus.mhe.family import make_state
from sphereface_plus.mhe.kernels import check_variant, mhe_kernel, normalize_power, normalize_rows, variant_rows
from sphereface_plus.mhe.objectives import (DEFAULT_OBJECTIVE, LEARNED_PROJECTIONS, OBJECTIVES, POLES,
                                            RANDOM_PROJECTIONS, ObjectiveSettings, check_objective, resolve_settings)

__all__ = ["CLASSIFIER_MODES", "classifier_mhe", "ClassifierMHE"]

CLASSIFIER_MODES = ("batch_vs_all", "batch_unique", "full", "caffe_among")


def _check_labels(labels: torch.Tensor, num_classes: int, check_range: bool = True) -> torch.Tensor:
    labels = check_labels(labels, None, num_classes, check_range=check_range)
    if labels.numel() == 0:
        raise ValueError("labels is empty: classifier_mhe needs at least one sample")
    return labels


def classifier_mhe(
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    power: Union[str, int] = "2",
    mode: str = "batch_vs_all",
    block_size: Optional[int] = None,
    check_finite: bool = True,
    replicas: int = 1,
    variant: str = "mhe",
    check_labels: bool = True,
    objective: str = DEFAULT_OBJECTIVE,
    projections: Optional[torch.Tensor] = None,
    pole: Optional[torch.Tensor] = None,
    lr: float = 0.0,
    gamma: float = 10.0,
) -> torch.Tensor:
    """The SphereFace+ MHE term on classifier weights ``C x d`` (``docs/theory.md#classifier-mhe-modes``).

    Modes:
        ``batch_vs_all``: ``1/(B(C-1)) Σ_b Σ_{j≠y_b} e(ŵ_{y_b}, ŵ_j)``, cost ``O(B C d)`` (a class that
        appears several times in the batch counts several times, as in the formula).
        ``batch_unique``: mean pair energy among the distinct classes of the batch; a batch of a
        single class has no pair and gives 0.
        ``full``: exactly :func:`mhe_energy` of ``weight`` (full space), computed in row blocks of
        ``block_size`` (default about 4M entries per block) so memory is ``O(block C)``; ``labels`` is
        not used (pass ``None`` or the batch labels, which are then only validated).
        ``caffe_among``: the Caffe ``InterClass`` layer (type ``AMONG``) that trained the released
        SphereFace+ models (``inter_class_layer.cpp``, CPU forward and backward; see
        :mod:`sphereface_plus.mhe.caffe_among` and ``docs/theory.md#caffe-among``). The value is the layer's
        output ``D = (1/N) Σ_i Σ_b |W_i - W_{y_b}|²`` on the rows as given (no normalisation: the head
        keeps them unit, as Caffe's margin layer does before this layer; ``power`` is not used). Its
        backward is not D's gradient: it is the layer's diff, ``-4/(M D² + 1e-5) (W_{y_b} - w_n)`` added
        to row ``y_b`` for every sample b (``w_n`` the normalised mean row; classes absent from the batch
        get nothing, a class seen k times gets k terms), multiplied by the incoming gradient. The Caffe
        layer ignores its top_diff and takes alpha as a parameter; here alpha arrives as that incoming
        gradient, so ``(alpha * classifier_mhe(W, y, mode='caffe_among')).backward()`` gives exactly the
        Caffe diff for that alpha (the trainer's ``mhe.lambda_m`` is alpha; a loss scaler or gradient
        accumulation then scales it as it scales every other gradient). ``replicas`` > 1 splits the
        labels into that many equal consecutive groups, each one Caffe GPU's layer with its own D, and
        averages them (Caffe's multi-GPU all-reduce divides the summed diffs by the number of GPUs): the
        released recipe ran 2 GPUs x 256, and D, hence the diff, depends on the per-GPU batch.

    ``check_finite``: as in :func:`mhe_energy`; ``check_labels=False`` leaves out the labels' range check
    (labels their owner checked already, without a host sync). ``replicas``: only for ``caffe_among``. ``variant``:
    ``'mhe'`` (default, the MHE reference code's kernels) or ``'opensphere_v0'`` (OpenSphere_v0's
    SphereFace+: unit rows, cosine clamped at 1e-5, kernels on theta itself; batch modes only; see
    :data:`~sphereface_plus.mhe.kernels.MHE_VARIANTS`, docs/theory.md#sphereface-plus-v0).

    ``objective``: another member of the family on the classifier rows (``docs/theory.md#classifier-family``),
    in the modes of its ``classifier_modes``: ``full`` (all rows) or ``batch_unique`` (the distinct classes
    of the batch) for every one, ``batch_vs_all`` for CoMHE-RP and MHS. The value returned is the term the
    network minimises (MHP's sign applied). CoMHE-RP takes ``projections`` (``pn x pd x d``), CoMHE-AP/AD a
    ``projections`` matrix ``pd x d`` and the ``lr`` of the look-ahead step, MHP and MHC a ``pole`` (``d``),
    MHC ``gamma``.

    Returns:
        A 0-dim tensor with gradient with respect to ``weight``.
    """
    power = normalize_power(power)
    if check_objective(objective) != "mhe":
        return _family_term(weight, labels, power, mode, block_size, check_finite, variant, objective, projections,
                            pole, lr, gamma, check_labels)
    if mode not in CLASSIFIER_MODES:
        raise ValueError(f"unknown classifier_mhe mode {mode!r}: choose one of {', '.join(CLASSIFIER_MODES)}")
    check_variant(variant, mode)
    _check_weight(weight, "classifier weight", check_finite)
    if weight.dim() != 2:
        raise ValueError(f"classifier weight must be C x d, got shape {tuple(weight.shape)}")
    num_classes = weight.shape[0]
    if mode == "full":
        if labels is not None:
            _check_labels(labels, num_classes, check_labels)
        return mhe_energy(weight, power, half_space=False, block_size=block_size or _default_block(num_classes),
                          check_finite=check_finite)
    if labels is None:
        raise ValueError(f"classifier_mhe mode {mode!r} needs the batch labels")
    labels = _check_labels(labels, num_classes, check_labels).to(weight.device)
    if replicas != 1 and mode != "caffe_among":
        raise ValueError(f"replicas={replicas!r} is only for mode 'caffe_among' (got mode {mode!r})")
    if mode == "caffe_among":
        if isinstance(replicas, bool) or int(replicas) != replicas or replicas < 1 or labels.numel() % int(replicas):
            raise ValueError(
                f"replicas must be a positive integer dividing the {labels.numel()} labels (one equal group per "
                f"Caffe GPU), got {replicas!r}"
            )
        return caffe_among_layer(weight, labels, replicas=int(replicas))
    w_hat = variant_rows(weight, variant)
    if mode == "batch_unique":
        classes = torch.unique(labels)
        if classes.numel() < 2:
            return (w_hat[classes] * 0.0).sum()  # no pair: zero energy, still part of the graph
        return _dense_pair_energy(w_hat[classes], power, variant)
    return _batch_vs_all(w_hat, labels, power, variant)


def _batch_vs_all(w_hat: torch.Tensor, labels: torch.Tensor, power: str, variant: str = "mhe") -> torch.Tensor:
    """``1/(B(C-1)) Σ_b Σ_{j≠y_b} e(ŵ_{y_b}, ŵ_j)`` on prepared rows ``ŵ``."""
    bsz, num_classes = labels.numel(), w_hat.shape[0]
    cos = w_hat[labels] @ w_hat.t()  # B x C
    own = torch.zeros_like(cos, dtype=torch.bool)
    own[torch.arange(bsz, device=cos.device), labels] = True
    e = mhe_kernel(cos.masked_fill(own, 0.0), power, variant).masked_fill(own, 0.0)
    return e.sum() / (bsz * (num_classes - 1))


def _mhs_batch_vs_all(weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MHS over the pairs ``(y_b, j)``, ``j ≠ y_b``: minus the smallest ``‖u_{y_b} - u_j‖²``, ties summed, a
    class seen k times in the batch counting its pairs k times (memory ``O(B C)``).

    A pair of two batch classes appears from both ends (``(y_b, y_c)`` and ``(y_c, y_b)``); its two entries
    are taken from one computed value, so that they tie exactly as the mathematics says.
    """
    u = uniformity.uniform_rows(weight)
    classes, counts = torch.unique(labels, return_counts=True)
    cos = u[classes] @ u.t()  # U x C
    inner = cos[:, classes]  # U x U: make it exactly symmetric from its upper triangle
    cos = cos.index_put((torch.arange(classes.numel(), device=cos.device).unsqueeze(1), classes.unsqueeze(0)),
                        torch.triu(inner) + torch.triu(inner, 1).t())
    d = 2.0 - 2.0 * cos
    own = torch.zeros_like(d, dtype=torch.bool)
    own[torch.arange(classes.numel(), device=d.device), classes] = True
    blocked = own | (d.detach() == 0)
    target = d.detach().masked_fill(blocked, math.inf).min()
    ties = (d.detach() == target) & ~blocked
    return -(d * counts.unsqueeze(1).to(d.dtype))[ties].sum()


def _family_term(weight, labels, power, mode, block_size, check_finite, variant, objective, projections, pole, lr,
                 gamma, check_range=True) -> torch.Tensor:
    """:func:`classifier_mhe` for an objective other than MHE."""
    spec = OBJECTIVES[objective]
    if mode not in spec.classifier_modes:
        raise ValueError(f"MHE objective {objective!r} on a classifier offers the modes {', '.join(spec.classifier_modes)}, "
                         f"not {mode!r}")
    if variant != "mhe":
        raise ValueError(f"MHE variant {variant!r} is only for objective 'mhe', not {objective!r}")
    _check_weight(weight, "classifier weight", check_finite)
    if weight.dim() != 2:
        raise ValueError(f"classifier weight must be C x d, got shape {tuple(weight.shape)}")
    need = {RANDOM_PROJECTIONS: ("projections", projections), LEARNED_PROJECTIONS: ("projections", projections),
            POLES: ("pole", pole)}.get(spec.state)
    if need is not None and need[1] is None:
        raise ValueError(f"MHE objective {objective!r} needs its {need[0]} (ClassifierMHE keeps them for a trainer)")
    if mode == "full":
        if labels is not None:
            _check_labels(labels, weight.shape[0], check_range)
        rows = weight
    else:
        if labels is None:
            raise ValueError(f"classifier_mhe mode {mode!r} needs the batch labels")
        labels = _check_labels(labels, weight.shape[0], check_range).to(weight.device)
        if mode == "batch_vs_all":
            if objective == "mhs":
                return _mhs_batch_vs_all(weight, labels)
            proj = comhe.project_rows(weight, projections)
            return torch.stack([_batch_vs_all(normalize_rows(x), labels, power) for x in proj]).mean()
        rows = weight[torch.unique(labels)]
        if rows.shape[0] < 2:
            return (rows * 0.0).sum()  # no pair: zero, still part of the graph
    if spec.state == LEARNED_PROJECTIONS and rows.shape[0] > DENSE_MAX_NEURONS:
        raise ValueError(f"MHE objective {objective!r} builds {rows.shape[0]} x {rows.shape[0]} cosine matrices for its "
                         f"projection; above {DENSE_MAX_NEURONS} rows use mode batch_unique")
    term = {
        "comhe_rp": lambda: comhe.comhe_rp_energy(rows, projections, power, check_finite=False),
        "comhe_ap": lambda: comhe.comhe_learned_energy(rows, projections, lr, "angle", power, check_finite=False),
        "comhe_ad": lambda: comhe.comhe_learned_energy(rows, projections, lr, "adversarial", power, check_finite=False),
        "mhs": lambda: uniformity.mhs_energy(rows, block_size=block_size, check_finite=False),
        "mhp": lambda: uniformity.mhp_energy(rows, pole, check_finite=False),
        "r_mhp": lambda: uniformity.r_mhp_energy(rows, check_finite=False),
        "mhc": lambda: uniformity.mhc_energy(rows, pole, gamma=gamma, check_finite=False),
        "mgd": lambda: uniformity.mgd_energy(rows, check_finite=False),
    }[objective]()
    return term if spec.sign == 1.0 else spec.sign * term


class ClassifierMHE:
    """The SphereFace+ classifier term of any objective, with the state of the stateful ones.

    ``term = ClassifierMHE("mhp", mode="full")``; each update ``term.advance(head.weight, labels, lr)``
    (the inner optimisers of projections and poles, at the network's learning rate, on the rows the mode
    uses), then ``loss = head_loss + lambda_m * term(head.weight, labels)``; ``state_dict`` /
    ``load_state_dict`` for checkpoints. ``coefficient`` weighs the term in the poles' own loss (the
    trainer passes its ``lambda_m``, as the authors' pole loss carries the layer's coefficient). With
    objective ``'mhe'`` it is exactly :func:`classifier_mhe`.
    """

    NAME = "classifier"

    def __init__(self, objective: str = DEFAULT_OBJECTIVE, power: Union[str, int] = "2", mode: str = "batch_vs_all",
                 variant: str = "mhe", settings: Optional[ObjectiveSettings] = None, coefficient: float = 1.0,
                 block_size: Optional[int] = None, check_finite: bool = False):
        self.objective = check_objective(objective)
        spec = OBJECTIVES[self.objective]
        if mode not in spec.classifier_modes:
            raise ValueError(f"MHE objective {self.objective!r} on a classifier offers the modes "
                             f"{', '.join(spec.classifier_modes)}, not {mode!r}")
        self.power, self.mode, self.variant = normalize_power(power), mode, variant
        given = settings if settings is not None else ObjectiveSettings()
        self.settings = resolve_settings(self.objective, given.projection_dim, given.projections, given.inner_steps,
                                         given.gamma, given.seed)
        self.coefficient, self.block_size, self.check_finite = float(coefficient), block_size, bool(check_finite)
        self.state = make_state(self.objective, [self.NAME], self.settings, [self.NAME], self.power, {self.NAME: False})

    def _rows(self, weight: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if self.mode == "full" or labels is None:
            return weight
        return weight[torch.unique(labels.to(weight.device))]

    def advance(self, weight: torch.Tensor, labels: Optional[torch.Tensor], lr: float) -> None:
        """The inner optimisers' steps of this update (nothing for the stateless objectives)."""
        if OBJECTIVES[self.objective].state is None:
            return
        if self.mode != "full" and OBJECTIVES[self.objective].state != RANDOM_PROJECTIONS and \
                torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise ValueError(f"MHE objective {self.objective!r} trains its state on the batch's classes in mode "
                             f"{self.mode!r}, which differ between processes; use mode full with several processes")
        rows = self._rows(weight, labels).detach()
        if rows.shape[0] >= 2:
            self.state.advance({self.NAME: rows}, lr, {self.NAME: self.coefficient})

    def __call__(self, weight: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        extra: Dict[str, Any] = {}
        kind = OBJECTIVES[self.objective].state
        if kind == RANDOM_PROJECTIONS:
            extra["projections"] = self.state.projections(self.NAME, weight)
        elif kind == LEARNED_PROJECTIONS:
            extra.update(projections=self.state.projection(self.NAME, weight), lr=self.state.lr or 0.0)
        elif kind == POLES:
            extra.update(pole=self.state.pole(self.NAME, weight), gamma=self.settings.gamma or 10.0)
        return classifier_mhe(weight, labels, self.power, self.mode, self.block_size, self.check_finite,
                              variant=self.variant, objective=self.objective, **extra)

    def state_dict(self) -> Dict[str, Any]:
        """The objective's state (as :meth:`MHERegularizer.state_dict`)."""
        return self.state.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.state.load_state_dict(state)
