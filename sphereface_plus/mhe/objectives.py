"""The MHE family: every diversity objective the toolkit offers, by name (:data:`OBJECTIVES`), with the
settings and per-layer weights of the authors' code.

One registry, read by :class:`~sphereface_plus.mhe.regularizer.MHERegularizer`, by
:func:`~sphereface_plus.mhe.classifier.classifier_mhe` / :class:`~sphereface_plus.mhe.classifier.ClassifierMHE`,
by the CIFAR, face and GAN configs' validation and by the docs (``docs/theory.md#mhe-family``):

=============  ==============================================================  =======================
name           what                                                            authors' code
=============  ==============================================================  =======================
``mhe``        the hyperspherical energy (Liu et al., NeurIPS 2018)             wy1iu/MHE
``comhe_rp``   CoMHE, ``pn`` random projections to ``pd`` dimensions, drawn     rmlin/CoMHE
               anew every update (Lin et al., CVPR 2020)                        ``random_projection/``
``comhe_ap``   CoMHE, one learned angle-preserving projection                   ``angle_projection/``
``comhe_ad``   CoMHE, one learned adversarial projection                        ``adversarial_projection/``
``mhs``        maximum hyperspherical separation (Liu et al., AISTATS 2021)     wy1iu/Sphere-Uniformity
                                                                                ``mhs/``
``mhp``        maximum hyperspherical polarisation, learned poles               ``mhp/``
``r_mhp``      relaxed MHP: the norm of the neurons' sum                        ``r_mhp/``
``mhc``        minimum hyperspherical covering, learned poles                   ``mhc/``
``mgd``        maximum Gram determinant                                         ``mgd/``
=============  ==============================================================  =======================

The per-layer formulas are in :mod:`~sphereface_plus.mhe.comhe` and :mod:`~sphereface_plus.mhe.uniformity`;
the state of the objectives that have one (projections, poles and their inner optimisers) in
:mod:`~sphereface_plus.mhe.family`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

from sphereface_plus.mhe.kernels import normalize_power

__all__ = ["OBJECTIVES", "DEFAULT_OBJECTIVE", "DEFAULT_COEFFICIENTS", "Objective", "ObjectiveSettings",
           "check_objective", "default_coefficients", "resolve_settings"]

DEFAULT_OBJECTIVE = "mhe"

# (hidden, output) coefficients of the MHE reference code, by power: wy1iu/MHE code/architecture.py,
# _add_thomson_constraint (hidden layers) and _add_thomson_constraint_final (the output layer). CoMHE
# (rmlin/CoMHE */architecture.py, power 2 only) uses the same (1, 10).
DEFAULT_COEFFICIENTS: Dict[str, Tuple[float, float]] = {
    "0": (1.0, 10.0),
    "1": (1.0, 10.0),
    "2": (1.0, 10.0),
    "a0": (1.0, 10.0),
    "a1": (0.1, 1.0),
    "a2": (0.1, 1.0),
}

# State kinds (sphereface_plus.mhe.family)
RANDOM_PROJECTIONS = "random_projections"
LEARNED_PROJECTIONS = "learned_projections"
POLES = "poles"

# Inner optimisers of the authors' train.py files:
# CoMHE-AP/AD: GradientDescentOptimizer(lr) on the projection loss + 1e-3 * l2_regularizer(5e-4)(P), i.e. a
# decay gradient of 1e-3 * 5e-4 * P; MHP/MHC: MomentumOptimizer(lr, 0.9) on the pole loss +
# l2_regularizer(5e-4)(v). lr is the network's learning rate of the update in both.
PROJECTION_WEIGHT_DECAY = 1e-3 * 5e-4
POLE_WEIGHT_DECAY = 5e-4
POLE_MOMENTUM = 0.9


@dataclass(frozen=True)
class Objective:
    """One member of the family: what the registry knows about it.

    ``coefficients``: the authors' ``(hidden, output)`` weights, ``None`` for the kernel-indexed
    :data:`DEFAULT_COEFFICIENTS`. ``sign``: the network minimises ``sign * coef * term`` (``-1`` for MHP,
    which the network maximises while its poles minimise it). ``half_space``: whether the objective has a
    half-space form (the authors use it on every hidden layer except for R-MHP, whose sum of ``[W; -W]``
    is 0). ``state``: ``None`` or the kind of state it keeps. ``classifier_modes``: the forms of the
    classifier term (:data:`~sphereface_plus.mhe.classifier.CLASSIFIER_MODES`) it offers.
    """

    name: str
    title: str
    paper: str
    source: str
    coefficients: Optional[Tuple[float, float]]
    uses_power: bool
    half_space: bool = True
    sign: float = 1.0
    state: Optional[str] = None
    classifier_modes: Tuple[str, ...] = ("batch_unique", "full")
    defaults: Dict[str, Union[int, float]] = field(default_factory=dict)


_COMHE = "Lin et al., CVPR 2020"
_UNIFORMITY = "Liu et al., AISTATS 2021"

OBJECTIVES: Dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("mhe", "MHE", "Liu et al., NeurIPS 2018, eq. 1", "wy1iu/MHE code/architecture.py", None, True,
                  classifier_modes=("batch_vs_all", "batch_unique", "full", "caffe_among")),
        Objective("comhe_rp", "CoMHE, random projections", f"{_COMHE}, random-projection CoMHE", "rmlin/CoMHE random_projection/architecture.py",
                  None, True, state=RANDOM_PROJECTIONS, classifier_modes=("batch_vs_all", "batch_unique", "full"),
                  defaults={"projection_dim": 40, "projections": 20}),
        Objective("comhe_ap", "CoMHE, angle-preserving projection", f"{_COMHE}, angle-preserving CoMHE",
                  "rmlin/CoMHE angle_projection/architecture.py, train.py", None, True, state=LEARNED_PROJECTIONS,
                  defaults={"projection_dim": 30, "projections": 1, "inner_steps": 1}),
        Objective("comhe_ad", "CoMHE, adversarial projection", f"{_COMHE}, adversarial-projection CoMHE",
                  "rmlin/CoMHE adversarial_projection/architecture.py, train.py", None, True,
                  state=LEARNED_PROJECTIONS, defaults={"projection_dim": 30, "projections": 1, "inner_steps": 10}),
        Objective("mhs", "maximum hyperspherical separation", f"{_UNIFORMITY}, MHS", "wy1iu/Sphere-Uniformity mhs/architecture.py",
                  (0.1, 1.0), False, classifier_modes=("batch_vs_all", "batch_unique", "full")),
        Objective("mhp", "maximum hyperspherical polarisation", f"{_UNIFORMITY}, MHP",
                  "wy1iu/Sphere-Uniformity mhp/architecture.py, train.py", (1.0, 10.0), False, sign=-1.0, state=POLES,
                  defaults={"inner_steps": 10}),
        Objective("r_mhp", "relaxed maximum hyperspherical polarisation", f"{_UNIFORMITY}, relaxed MHP",
                  "wy1iu/Sphere-Uniformity r_mhp/architecture.py", (0.01, 0.1), False, half_space=False),
        Objective("mhc", "minimum hyperspherical covering", f"{_UNIFORMITY}, MHC",
                  "wy1iu/Sphere-Uniformity mhc/architecture.py, train.py", (0.01, 0.1), False, state=POLES,
                  defaults={"inner_steps": 10, "gamma": 10.0}),
        Objective("mgd", "maximum Gram determinant", f"{_UNIFORMITY}, MGD", "wy1iu/Sphere-Uniformity mgd/architecture.py",
                  (0.01, 0.1), False),
    )
}


def check_objective(name: str) -> str:
    """``name`` if it is in :data:`OBJECTIVES`, else ``ValueError`` listing them."""
    if not isinstance(name, str) or name.strip().lower() not in OBJECTIVES:
        raise ValueError(f"unknown MHE objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return name.strip().lower()


def default_coefficients(objective: str, power: Optional[Union[str, int]] = None) -> Tuple[float, float]:
    """The authors' ``(hidden, output)`` weights of ``objective`` (for MHE and CoMHE: by ``power``)."""
    spec = OBJECTIVES[check_objective(objective)]
    if spec.coefficients is not None:
        return spec.coefficients
    return DEFAULT_COEFFICIENTS[normalize_power("2" if power is None else power)]


@dataclass(frozen=True)
class ObjectiveSettings:
    """The settings of an objective in force (:func:`resolve_settings` fills the authors' defaults).

    ``projection_dim`` (CoMHE ``pd``), ``projections`` (CoMHE-RP ``pn``; 1 for AP/AD), ``inner_steps``
    (optimiser steps of the projections (AP/AD) or poles (MHP/MHC) per network update: the authors'
    ``--iters``), ``gamma`` (MHC's soft-min temperature), ``seed`` (initial projections and poles, and the
    stream of CoMHE-RP draws). Unused settings are ``None``.
    """

    projection_dim: Optional[int] = None
    projections: Optional[int] = None
    inner_steps: Optional[int] = None
    gamma: Optional[float] = None
    seed: int = 0


def resolve_settings(objective: str, projection_dim: Optional[int] = None, projections: Optional[int] = None,
                     inner_steps: Optional[int] = None, gamma: Optional[float] = None, seed: int = 0,
                     prefix: str = "") -> ObjectiveSettings:
    """Fill the authors' defaults of ``objective`` for the settings left ``None`` and check them.

    A setting the objective does not use must be left ``None`` (``ValueError`` otherwise, so that a
    recipe cannot silently carry a setting that does nothing). ``prefix``: how a config spells the
    settings' keys in the messages (``mhe_`` for ``mhe_projection_dim``).
    """
    spec = OBJECTIVES[check_objective(objective)]
    given = {"projection_dim": projection_dim, "projections": projections, "inner_steps": inner_steps, "gamma": gamma}
    out = {}
    for key, value in given.items():
        if key not in spec.defaults:
            if value is not None:
                used = [k for k in given if k in spec.defaults]
                raise ValueError(f"MHE objective {spec.name!r} has no setting {prefix + key!r} (it uses: "
                                 f"{', '.join(prefix + k for k in used) or 'none'}); leave it unset")
            out[key] = None
            continue
        value = spec.defaults[key] if value is None else value
        if key == "gamma":
            if isinstance(value, bool) or not float(value) > 0:
                raise ValueError(f"MHE objective {spec.name!r}: {prefix}gamma must be > 0, got {value!r}")
            out[key] = float(value)
            continue
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise ValueError(f"MHE objective {spec.name!r}: {prefix + key} must be a positive integer, got {value!r}")
        out[key] = int(value)
    if spec.state == LEARNED_PROJECTIONS and out["projections"] != 1:
        raise ValueError(f"MHE objective {spec.name!r} learns one projection per layer (the authors' code); "
                         f"{prefix}projections must be 1, got {out['projections']}")
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return ObjectiveSettings(seed=int(seed), **out)
