"""The MHE-GAN recipe (wy1iu/MHE ``MHE-GAN/{sn,non-sn}-model/train.py``): its schema and published numbers.

:class:`GanConfig` is the schema of ``configs/gan/*.yaml`` (``key=value`` and the command's flags override
it); the trainer is :mod:`sphereface_plus.gan.trainer`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from sphereface_plus.config import ConfigError
from sphereface_plus.engine.precision import SETTINGS as PRECISIONS
from sphereface_plus.gan import losses as gan_losses
from sphereface_plus.gan import steps
from sphereface_plus.mhe import OBJECTIVES, check_objective, resolve_settings
from sphereface_plus.utils import CACHE_DIR

__all__ = ["GanConfig", "REAL_SPLITS", "DEFAULT_STATS_CACHE", "PUBLISHED_IS"]

RESUMABLE = {"resumable": True}

REAL_SPLITS = ("test", "train")
DEFAULT_STATS_CACHE = str(CACHE_DIR / "gan-stats")

# Inception Score of the paper's table (wy1iu/MHE README, CIFAR-10, 200k iterations); not computable here
PUBLISHED_IS = {"baseline": 6.64, "sn": 7.40, "mhe": 7.48, "sn_mhe": 7.68}


@dataclass
class GanConfig:
    """The recipe (YAML schema); stored in ``config.yaml`` and in every checkpoint."""

    sn: bool = True  # spectral norm in D (sn-model) or not (non-sn-model)
    mhe: float = gan_losses.MHE_MAGNITUDE["sn"]  # MHE magnitude on D's loss; 0 = off
    mhe_power: str = "original"  # ops.py's term, or a toolkit kernel: 0 1 2 a0 a1 a2
    mhe_half_space: bool = False  # toolkit kernels only
    # another objective of the MHE family on D (sphereface_plus.mhe.OBJECTIVES, docs/gan.md#gan-family), with
    # mhe as its magnitude; null settings take the objective's defaults
    mhe_objective: str = "mhe"
    mhe_projection_dim: Optional[int] = None
    mhe_projections: Optional[int] = None
    mhe_inner_steps: Optional[int] = None
    mhe_gamma: Optional[float] = None
    loss: str = "nonsaturating"  # sphereface_plus.gan.losses.LOSSES
    # the settings a resumed run may change: paths that move, the run length, what is recorded
    data: str = field(default=".", metadata=RESUMABLE)  # CIFAR-10 python folder (cifar-10-batches-py or its parent)
    iterations: int = field(default=steps.ITERATIONS, metadata=RESUMABLE)
    batch_size: int = steps.BATCH_SIZE
    lr: float = steps.LR
    beta1: float = steps.BETAS[0]
    beta2: float = steps.BETAS[1]
    seed: int = 0
    eval_every: int = field(default=steps.EVAL_EVERY, metadata=RESUMABLE)
    eval_samples: int = 5000  # the original: 50000 (see --help: CPU cost)
    real_stats: str = "test"  # CIFAR split(s) FID/KID compare against: test, train, or test,train
    real_limit: int = 0  # use the first N images of each split (0: all)
    stats_cache: str = field(default=DEFAULT_STATS_CACHE, metadata=RESUMABLE)
    precision: str = "fp32"  # engine precision setting; fp32 is the original's

    #: keys of earlier releases, still read (with a warning) from old recipes and checkpoints
    RENAMED_KEYS = {"mhe_kernel": "mhe_power"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, lo in (("iterations", 0), ("batch_size", 1), ("eval_every", 1), ("eval_samples", 0),
                         ("real_limit", 0)):
            if int(getattr(self, name)) < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.eval_samples == 1:
            raise ConfigError("eval_samples must be 0 (no FID/KID) or >= 2 (KID needs two images), got 1")
        if not self.mhe >= 0:
            raise ConfigError(f"mhe (the MHE magnitude) must be >= 0 (0 = off), got {self.mhe}")
        if self.loss not in gan_losses.LOSSES:
            raise ConfigError(f"loss {self.loss!r}: choose one of {', '.join(gan_losses.LOSSES)}")
        kernels = gan_losses.MHE_KERNELS
        if str(self.mhe_power) not in kernels:
            raise ConfigError(f"mhe_power {self.mhe_power!r}: choose one of {', '.join(kernels)}")
        try:
            spec = OBJECTIVES[check_objective(self.mhe_objective)]
            self.mhe_settings()
        except ValueError as e:
            raise ConfigError(str(e).replace("MHE objective", "mhe_objective")) from None
        if self.mhe_half_space and self.mhe_power == "original" and spec.uses_power:
            raise ConfigError("mhe_half_space needs a toolkit kernel (mhe_power=0|1|2|a0|a1|a2); "
                              "the original formula is full-space")
        if self.mhe_objective != "mhe" and spec.uses_power and self.mhe_power == "original":
            raise ConfigError(f"mhe_objective={self.mhe_objective} needs a toolkit kernel: mhe_power=2 (the authors') "
                              f"or 0|1|a0|a1|a2")
        if self.mhe_objective != "mhe" and not spec.uses_power and self.mhe_power != "original":
            raise ConfigError(f"mhe_objective={self.mhe_objective} has no kernel: leave mhe_power unset")
        if self.mhe_half_space and not spec.half_space:
            raise ConfigError(f"mhe_objective={self.mhe_objective} has no half-space form: mhe_half_space=false")
        splits = self.real_splits
        if not splits or any(s not in REAL_SPLITS for s in splits) or len(set(splits)) < len(splits):
            raise ConfigError(f"real_stats {self.real_stats!r}: one of {', '.join(REAL_SPLITS)}, or both comma-separated "
                              f"({','.join(REAL_SPLITS)}: FID/KID against each, the first as fid/kid)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    @property
    def real_splits(self) -> Tuple[str, ...]:
        """The CIFAR splits of ``real_stats``, in order (the first one's scores are ``fid``/``kid``)."""
        return tuple(s.strip() for s in str(self.real_stats).split(",") if s.strip())

    @property
    def variant(self) -> str:
        """``baseline``, ``sn``, ``mhe`` or ``sn_mhe``: the published row (and recipe name) of these settings."""
        parts = [p for p, on in (("sn", self.sn), ("mhe", self.mhe > 0)) if on]
        return "_".join(parts) or "baseline"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def mhe_settings(self):
        """The MHE objective's settings in force (``sphereface_plus.mhe.resolve_settings``)."""
        return resolve_settings(self.mhe_objective, self.mhe_projection_dim, self.mhe_projections,
                                self.mhe_inner_steps, self.mhe_gamma, self.seed, prefix="mhe_")

    def mhe_regularizer(self, D):
        """The family objective's regulariser on ``D``, or None for MHE's own term."""
        if self.mhe_objective == "mhe" or self.mhe == 0:
            return None
        return gan_losses.discriminator_regularizer(D, self.mhe_objective, self.mhe_power, self.mhe_half_space,
                                                    self.mhe_settings())
