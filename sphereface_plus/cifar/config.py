"""The MHE CIFAR recipe (Liu et al., NeurIPS 2018; wy1iu/MHE ``train.py``): its schema and its published numbers.

:class:`CifarConfig` is the schema of ``configs/cifar/*.yaml`` (the seed's flags are the command's aliases
of its fields). The reference schedule, the published CIFAR-100 table and the 13 settings of the sweep live
here too, so the trainer (:mod:`sphereface_plus.cifar.trainer`), the command and the docs read one copy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from sphereface_plus.config import ConfigError
from sphereface_plus.engine.precision import SETTINGS as PRECISION_SETTINGS
from sphereface_plus.mhe import (OBJECTIVES, POWERS, check_objective, default_coefficients, normalize_power,
                                 resolve_settings)

__all__ = ["CifarConfig", "CIFAR_CLASSES", "MODEL_NAMES", "PUBLISHED_CIFAR100", "SWEEP_SETTINGS", "REFERENCE_ITERATIONS",
           "REFERENCE_MILESTONES", "LR_SCHEDULES", "HIDDEN_LAYERS", "OUTPUT_LAYER", "scaled_milestones"]

#: the recipe's datasets and their class counts (the loaders of ``data_prep.cifar`` read the files)
CIFAR_CLASSES: Dict[str, int] = {"cifar100": 100, "cifar10": 10}

RESUMABLE = {"resumable": True}

MODEL_NAMES = ("baseline", "mhe", "half_mhe")

# The reference schedule (docs/theory.md#cifar-setup): 42.5k iterations, lr x0.1 at 20k, 30k and 37.5k.
REFERENCE_ITERATIONS = 42500
REFERENCE_MILESTONES = (20000, 30000, 37500)
# lr_schedule -> (iterations, milestones) of the authors' train.py: wy1iu/MHE, and rmlin/CoMHE with
# wy1iu/Sphere-Uniformity (75k iterations, x0.1 at 30k, 50k, 65k); scaled to a run's length
LR_SCHEDULES: Dict[str, Tuple[int, Tuple[int, ...]]] = {
    "mhe": (REFERENCE_ITERATIONS, REFERENCE_MILESTONES),
    "comhe": (75000, (30000, 50000, 65000)),
}
EVAL_BATCH = 500

# Published CIFAR-100 test accuracy (%) at the final iteration (docs/theory.md#cifar-setup).
PUBLISHED_CIFAR100: Dict[Tuple[str, str], float] = {
    ("baseline", "-"): 69.74,
    ("mhe", "0"): 73.16, ("mhe", "1"): 72.85, ("mhe", "2"): 72.78,
    ("mhe", "a0"): 71.97, ("mhe", "a1"): 72.50, ("mhe", "a2"): 72.76,
    ("half_mhe", "0"): 73.75, ("half_mhe", "1"): 73.60, ("half_mhe", "2"): 73.99,
    ("half_mhe", "a0"): 73.53, ("half_mhe", "a1"): 73.42, ("half_mhe", "a2"): 73.94,
}
# The 13 settings of the published table, in its order.
SWEEP_SETTINGS: List[Tuple[str, str]] = [("baseline", "-")] + [(m, s) for m in ("mhe", "half_mhe") for s in POWERS]

# hidden layers of cifar_cnn9 (the 9 convs and fc6) and its output layer
HIDDEN_LAYERS = tuple(f"features.conv{i}_{j}" for i in (1, 2, 3) for j in (1, 2, 3)) + ("fc6",)
OUTPUT_LAYER = "score"


@dataclass
class CifarConfig:
    """Everything that defines a run (the YAML schema); stored in ``config.json`` and in every checkpoint."""

    model_name: str = "mhe"  # baseline | mhe | half_mhe
    mhe_power: str = "0"  # MHE kernel s: sphereface_plus.mhe.POWERS (the seed's --power_s)
    dataset: str = "cifar100"  # CIFAR_CLASSES
    # folder with the CIFAR python pickles; it may move between machines (resumable)
    data: str = field(default=".", metadata=RESUMABLE)
    iterations: int = REFERENCE_ITERATIONS
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter, BN included (the reference's l2_regularizer)
    lr_gamma: float = 0.1
    # the log and evaluation cadences change what is recorded, not what is computed (resumable)
    eval_every: int = field(default=500, metadata=RESUMABLE)
    log_every: int = field(default=100, metadata=RESUMABLE)
    seed: int = 0
    mhe_scale: float = 1.0
    label_smoothing: float = 0.01
    log_eps: float = 1e-4
    bn_momentum: Optional[float] = None  # None: the network's own (0.001, docs/theory.md#cifar-setup)
    # network precision: sphereface_plus.engine.precision.SETTINGS; auto = bf16 where the CPU/GPU has
    # native bf16, else fp32 (fp32 / off = float32). The loss and the MHE terms are always float32.
    precision: str = "auto"
    # the regulariser: sphereface_plus.mhe.OBJECTIVES (docs/theory.md#mhe-family); null settings take the
    # authors' defaults of the objective (CoMHE pd/pn, inner steps of projections and poles, MHC's gamma)
    mhe_objective: str = "mhe"
    mhe_projection_dim: Optional[int] = None
    mhe_projections: Optional[int] = None
    mhe_inner_steps: Optional[int] = None
    mhe_gamma: Optional[float] = None
    lr_schedule: str = "mhe"  # LR_SCHEDULES: the authors' milestones, scaled to `iterations`

    #: keys of earlier releases, still read (with a warning) from old recipes and checkpoints
    RENAMED_KEYS = {"amp": "precision", "power_s": "mhe_power"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.model_name not in MODEL_NAMES:
            raise ConfigError(f"model_name {self.model_name!r}: choose one of {', '.join(MODEL_NAMES)}")
        try:
            self.mhe_objective = check_objective(self.mhe_objective)
            self.mhe_settings()
        except ValueError as e:
            raise ConfigError(str(e).replace("MHE objective", "mhe_objective")) from None  # names the recipe's keys
        if self.model_name == "half_mhe" and not OBJECTIVES[self.mhe_objective].half_space:
            raise ConfigError(f"mhe_objective {self.mhe_objective} has no half-space form: use model_name mhe")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.model_name == "baseline" or not OBJECTIVES[self.mhe_objective].uses_power:
            self.mhe_power = "-"
        else:
            try:
                self.mhe_power = normalize_power(self.mhe_power)  # parsed once, here
            except ValueError:
                raise ConfigError(f"mhe_power {self.mhe_power!r}: choose one of {', '.join(POWERS)}") from None
        if self.dataset not in CIFAR_CLASSES:
            raise ConfigError(f"dataset {self.dataset!r}: choose one of {', '.join(CIFAR_CLASSES)}")
        for name, lo in (("iterations", 0), ("batch_size", 1), ("eval_every", 1), ("log_every", 1)):
            if int(getattr(self, name)) < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.mhe_scale >= 0:
            raise ConfigError(f"mhe_scale must be >= 0, got {self.mhe_scale}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.log_eps >= 0:
            raise ConfigError(f"log_eps must be >= 0, got {self.log_eps}")
        if self.precision not in PRECISION_SETTINGS:
            raise ConfigError(f"precision {self.precision!r}: choose one of {', '.join(PRECISION_SETTINGS)}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")

    @property
    def setting(self) -> str:
        """``baseline``, ``mhe_0`` .. ``half_mhe_a2`` (the reference's log folder names); another objective:
        its name, its kernel for CoMHE, ``half_`` first for the half-space form (``half_comhe_rp_2``,
        ``half_mhs``, ``r_mhp``)."""
        if self.model_name == "baseline":
            return "baseline"
        if self.mhe_objective == "mhe":
            return f"{self.model_name}_{self.mhe_power}"
        name = self.mhe_objective + ("" if self.mhe_power == "-" else f"_{self.mhe_power}")
        return f"half_{name}" if self.model_name == "half_mhe" else name

    def mhe_settings(self):
        """The objective's settings in force (``sphereface_plus.mhe.resolve_settings``)."""
        return resolve_settings(self.mhe_objective, self.mhe_projection_dim, self.mhe_projections,
                                self.mhe_inner_steps, self.mhe_gamma, self.seed, prefix="mhe_")

    @property
    def num_classes(self) -> int:
        return CIFAR_CLASSES[self.dataset]

    @property
    def milestones(self) -> Tuple[int, ...]:
        return scaled_milestones(self.iterations, self.lr_schedule)

    def coefficients(self) -> Tuple[float, float]:
        """``(λ_h, λ_o)`` actually used: the coefficients of docs/theory.md#mhe-regularizer times
        ``mhe_scale`` (0, 0 for the baseline)."""
        if self.model_name == "baseline":
            return 0.0, 0.0
        # the reference's (hidden, output) coefficients by power (docs/theory.md#mhe-regularizer, owned by mhe.py); the
        # published full-space logs match these x 0.1, the half-space logs exactly; the other objectives' own
        h, o = default_coefficients(self.mhe_objective, None if self.mhe_power == "-" else self.mhe_power)
        return h * self.mhe_scale, o * self.mhe_scale

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def scaled_milestones(iterations: int, schedule: str = "mhe") -> Tuple[int, ...]:
    """The lr milestones for a run of ``iterations`` updates (``schedule``: :data:`LR_SCHEDULES`).

    The reference's 20k/30k/37.5k of 42.5k are kept as fractions of the run, so ``iterations=42500``
    gives exactly (20000, 30000, 37500) and a shorter run keeps the same shape (e.g. 4250 ->
    (2000, 3000, 3750)). Scaling was chosen over truncating because a truncated run would never leave
    lr 0.1, and the last two thirds of the schedule are where the published accuracy is made.
    """
    reference, milestones = LR_SCHEDULES[schedule]
    return tuple(int(round(m * iterations / reference)) for m in milestones)
