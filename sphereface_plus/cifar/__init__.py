"""The MHE CIFAR experiments (Liu et al., NeurIPS 2018): the recipe and its trainer.

- :mod:`~sphereface_plus.cifar.config`: :class:`CifarConfig` (the schema of ``configs/cifar/*.yaml``), the
  reference schedule, the published CIFAR-100 table and the sweep's settings;
- :mod:`~sphereface_plus.cifar.trainer`: the network, the MHE regulariser of the recipe, one step, the
  evaluation and :class:`CifarTrainer` (a task of the engine's one loop).

The command is ``sphereface-plus cifar`` (:mod:`sphereface_plus.commands.cifar`); the data are
``data_prep.cifar``'s. Importing this package loads nothing heavy.
"""
from __future__ import annotations

from sphereface_plus.lazy_exports import lazy_exports

_EXPORTS = {
    **{n: "sphereface_plus.cifar.config" for n in (
        "CifarConfig", "CIFAR_CLASSES", "MODEL_NAMES", "PUBLISHED_CIFAR100", "SWEEP_SETTINGS", "REFERENCE_ITERATIONS",
        "REFERENCE_MILESTONES", "LR_SCHEDULES", "HIDDEN_LAYERS", "OUTPUT_LAYER", "scaled_milestones")},
    **{n: "sphereface_plus.cifar.trainer" for n in (
        "CifarTrainer", "build_model", "build_optimizer", "build_regularizer", "split_terms", "mhe_snapshot",
        "frozen_batchnorm_stats", "forward", "evaluate", "train_step")},
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
