"""Minimum Hyperspherical Energy (MHE) regularisers (Liu et al., "Learning towards Minimum Hyperspherical
Energy", NeurIPS 2018), one module per concept:

- :mod:`~sphereface_plus.mhe.kernels` -- the six pair kernels ``e(c)`` on the cosine of two neurons
  (:data:`POWERS`, :func:`mhe_kernel`, :func:`normalize_rows`; ``docs/theory.md#mhe-kernels``).
- :mod:`~sphereface_plus.mhe.energy` -- :func:`mhe_energy`, the energy of one layer: the kernel averaged
  over the pairs ``i < j`` of its neurons, dense or in row blocks.
- :mod:`~sphereface_plus.mhe.classifier` -- :func:`classifier_mhe`, the SphereFace+ term on classifier
  weights ``C x d`` in the forms of :data:`CLASSIFIER_MODES` (``docs/theory.md#classifier-mhe-modes``).
- :mod:`~sphereface_plus.mhe.caffe_among` -- the Caffe ``InterClass`` layer of type ``AMONG`` that
  trained the released SphereFace+ models, used by ``classifier_mhe(mode='caffe_among')`` and by the
  row-sharded classifier (``docs/theory.md#caffe-among``).
- :mod:`~sphereface_plus.mhe.regularizer` -- :class:`MHERegularizer`, MHE (or another objective of the
  family) on the convolution and linear layers of any ``nn.Module`` with the reference's
  :data:`DEFAULT_COEFFICIENTS`.
- :mod:`~sphereface_plus.mhe.objectives` -- the family's registry :data:`OBJECTIVES` (MHE, CoMHE-RP/AP/AD,
  MHS, MHP, R-MHP, MHC, MGD), their settings and the authors' per-layer weights
  (``docs/theory.md#mhe-family``).
- :mod:`~sphereface_plus.mhe.comhe` -- CoMHE's layer terms with explicit projections.
- :mod:`~sphereface_plus.mhe.uniformity` -- MHS, MHP, R-MHP, MHC and MGD of one layer (explicit poles).
- :mod:`~sphereface_plus.mhe.family` -- one layer's term by objective, and the state (projections,
  poles, inner optimisers) of the objectives that keep one.

The public names of the submodules are re-exported here: ``from sphereface_plus.mhe import classifier_mhe``.
"""
from __future__ import annotations

from sphereface_plus.mhe.caffe_among import (
    CAFFE_COEF_EPS,
    CAFFE_MEAN_EPS,
    caffe_among_diff,
    caffe_among_direction,
    caffe_among_distance,
    caffe_among_distance_from_sums,
    caffe_among_partial_sums,
)
from sphereface_plus.mhe.classifier import CLASSIFIER_MODES, ClassifierMHE, classifier_mhe
from sphereface_plus.mhe.comhe import (
    adversarial_energy,
    angle_preserving_loss,
    comhe_learned_energy,
    comhe_rp_energy,
    lookahead_projection,
    projection_step,
    random_projections,
)
from sphereface_plus.mhe.energy import BLOCK_ENTRIES, DENSE_MAX_NEURONS, mhe_energy
from sphereface_plus.mhe.kernels import (
    ANGLE_EPS,
    DIST_FLOOR,
    MHE_VARIANTS,
    NORM_EPS,
    OPENSPHERE_V0_CLAMP,
    POWERS,
    check_variant,
    mhe_kernel,
    normalize_power,
    normalize_rows,
    variant_rows,
)
from sphereface_plus.mhe.objectives import (
    DEFAULT_COEFFICIENTS,
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    ObjectiveSettings,
    check_objective,
    default_coefficients,
    resolve_settings,
)
from sphereface_plus.mhe.regularizer import MHERegularizer
from sphereface_plus.mhe.uniformity import mgd_energy, mhc_energy, mhp_energy, mhs_energy, pole_step, r_mhp_energy

__all__ = [
    "POWERS",
    "CLASSIFIER_MODES",
    "DEFAULT_COEFFICIENTS",
    "normalize_power",
    "normalize_rows",
    "mhe_kernel",
    "mhe_energy",
    "classifier_mhe",
    "ClassifierMHE",
    "caffe_among_partial_sums",
    "caffe_among_distance_from_sums",
    "caffe_among_distance",
    "caffe_among_direction",
    "caffe_among_diff",
    "MHERegularizer",
    "MHE_VARIANTS",
    "OPENSPHERE_V0_CLAMP",
    "check_variant",
    "variant_rows",
    "OBJECTIVES",
    "DEFAULT_OBJECTIVE",
    "ObjectiveSettings",
    "check_objective",
    "default_coefficients",
    "resolve_settings",
    "comhe_rp_energy",
    "comhe_learned_energy",
    "angle_preserving_loss",
    "adversarial_energy",
    "lookahead_projection",
    "random_projections",
    "projection_step",
    "pole_step",
    "mhs_energy",
    "mhp_energy",
    "r_mhp_energy",
    "mhc_energy",
    "mgd_energy",
]
