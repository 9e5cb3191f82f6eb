"""The face trainer's recipe: one typed dataclass tree, the schema of ``configs/face/*.yaml``.

One dataclass per section (``model``, ``head``, ``mhe``, ``data``, ``optim``, ``train``, ``checkpoint``,
``eval``) plus ``out_dir``. A YAML recipe sets any subset of the fields; command-line overrides use dotted
keys (``train.batch_size=64``, ``optim.milestones=[10,20]``, ``head.m=1.7``), parsed and type-checked by
the generic loader (:mod:`sphereface_plus.config`); an unknown key names the nearest valid one.

:meth:`FaceConfig.validate` only checks (it never changes a value); the values in force (the head's
defaults filled in, the input size of the data, the MHE kernel's canonical name) are computed once by
:func:`sphereface_plus.face.resolve.resolve`, which returns a new config and leaves this one as it was.

    cfg = load_config("configs/face/sphereface20_casia.yaml", ["train.batch_size=256", "out_dir=runs/x"])
    cfg.optim.lr            # 0.1
    cfg.head.m              # the recipe's head setting (None: the head's own default)
    cfg.to_dict()           # plain nested dicts, as stored in config.yaml and in every checkpoint

A field whose metadata has ``resumable=True`` may differ when a run is resumed (where and how fast the
run goes, what it records): :func:`sphereface_plus.config.resumable_keys` lists them.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from sphereface_plus.config import EXTRA_KEYS, ConfigError, coerce_value
from sphereface_plus.config import from_dict as _from_dict
from sphereface_plus.config import load_config as _load_config
from sphereface_plus.errors import UsageError

__all__ = ["FaceConfig", "ModelConfig", "HeadConfig", "MHEConfig", "SyntheticConfig", "DataConfig", "OptimConfig",
           "TrainConfig", "CheckpointConfig", "EvalConfig", "TRAINER_HEAD_SETTINGS", "load_config",
           "check_head_keys"]

#: metadata of a field that may change on resume (``resumable_keys``)
RESUMABLE = {"resumable": True}


def _resumable(default: Any = dataclasses.MISSING, **kw: Any):
    return field(default=default, metadata=RESUMABLE, **kw)


@dataclass
class ModelConfig:
    backbone: str = "sphere20"  # registered name (sphereface_plus.models.list_backbones())
    # [H, W] of the network input: follows from data.template (the run's config.yaml records it); set it
    # only to check that it is what you expect
    input_size: Optional[List[int]] = None
    embedding_dim: int = 512  # feature width: the final FC (SphereFace fc5) / features layer, 512 in every reference
    # extra keyword arguments of the backbone's builder (e.g. {dropout: 0.4} for an iresnet, {scale: 1} for
    # mobilefacenet): checked against the options the backbone declares (docs/backbones.md); recorded in
    # config.yaml and checkpoints, so every consumer rebuilds the same network (models.backbone_from_config)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # NHWC memory format; null = auto: on with bf16 on a CPU (measured faster there,
    # bench/results/train_throughput.md), off otherwise; true / false are honoured as given
    channels_last: Optional[bool] = None


#: ``head`` keys that belong to the trainer (the classifier's layout), never passed to the head
TRAINER_HEAD_SETTINGS = ("name", "parallel", "sample_rate")


@dataclass
class HeadConfig:
    """The classifier head: its name, its layout over the processes, and the head's own settings.

    ``name``, ``parallel`` and ``sample_rate`` are the trainer's (:data:`TRAINER_HEAD_SETTINGS`). Every
    other key under ``head`` (``head.m=1.7``, ``head.s: 30``) is a setting of the head itself, named as its
    constructor's keyword argument (``sphereface_plus.heads.head_parameters``), kept in ``settings`` and
    read back as an attribute (``cfg.head.m``). :meth:`FaceConfig.validate` checks each key against the
    head's constructor signature (an unknown key names the head's valid keys and the nearest one) and its
    declared type. Settings not given keep the head's own defaults, which the resolved config (and so
    config.yaml and checkpoints) records. A ``null`` value means "not set".
    """

    name: str = "a_softmax"  # registered name (sphereface_plus.heads.list_heads())
    # how the classifier is laid out over the processes (sphereface_plus.parallel.PARALLEL_MODES); may change on
    # resume (checkpoints hold the whole head whatever the layout)
    parallel: str = _resumable("replicated")  # replicated: the whole head on every rank; sharded: rows split
    sample_rate: float = 1.0  # sharded only: Partial FC negative-class sampling rate in (0, 1]; 1 is exact
    settings: Dict[str, Any] = field(default_factory=dict, metadata={EXTRA_KEYS: True})

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the head's settings
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings:
            return settings[name]
        if not name.startswith("_") and "name" in self.__dict__:
            from sphereface_plus.heads import head_parameters

            try:
                if name in head_parameters(self.name):
                    return None  # a setting of this head that was not given: the head's own default
            except KeyError:  # an unknown head name (validation reports it)
                pass
        raise AttributeError(f"head {self.__dict__.get('name')!r} has no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in {f.name for f in dataclasses.fields(self)}:
            object.__setattr__(self, name, value)
        elif value is None:
            self.settings.pop(name, None)
        else:
            self.settings[name] = value

    def given(self) -> Dict[str, Any]:
        """The head's own settings that were given (``None`` entries are "not set")."""
        return {k: v for k, v in self.settings.items() if v is not None}


@dataclass
class MHEConfig:
    # SphereFace+ (docs/theory.md#sphereface-plus): loss = CE + lambda_m * classifier MHE; 0 turns it off
    lambda_m: float = 0.0
    power: str = "2"  # kernel: sphereface_plus.mhe.POWERS (0 | 1 | 2 | a0 | a1 | a2)
    mode: str = "batch_vs_all"  # sphereface_plus.mhe.CLASSIFIER_MODES (see classifier_mhe)
    # how the kernel reads the rows: sphereface_plus.mhe.MHE_VARIANTS; mhe = the MHE paper's code (default),
    # opensphere_v0 = OpenSphere_v0's SphereFace+ (unit rows, cosine clamp 1e-5, kernel on theta itself)
    variant: str = "mhe"
    # the objective on the classifier rows: sphereface_plus.mhe.OBJECTIVES (docs/theory.md#classifier-family);
    # null settings take the objective's defaults (CoMHE pd / pn, inner steps, MHC's gamma)
    objective: str = "mhe"
    projection_dim: Optional[int] = None
    projections: Optional[int] = None
    inner_steps: Optional[int] = None
    gamma: Optional[float] = None

    def settings(self, seed: int = 0):
        """The objective's settings in force (``sphereface_plus.mhe.resolve_settings``)."""
        from sphereface_plus.mhe import resolve_settings

        return resolve_settings(self.objective, self.projection_dim, self.projections, self.inner_steps, self.gamma,
                                seed, prefix="mhe.")


@dataclass
class SyntheticConfig:
    num_identities: int = 40
    images_per_identity: int = 12
    seed: int = 0
    pairs_per_fold: int = 60  # verification pairs per fold in the generated pairs.txt (10 folds)
    cache_dir: str = _resumable("")  # where generated + aligned images go; "" = <out_dir>/synthetic


@dataclass
class DataConfig:
    source: str = "folder"  # data_prep.training_set.DATA_SOURCES (synthetic | folder | list | rec | packed)
    root: str = _resumable("")  # the aligned folder / the list file's image root / folder with train.rec / pack
    list_file: str = _resumable("")  # for source=list: "relative/path label" per line ("" = <root>/list.txt)
    template: str = "112x96"  # alignment template of the crops (sphereface_plus.templates.TEMPLATES)
    flip: bool = True  # random horizontal flip (docs/theory.md#preprocessing)
    num_workers: int = _resumable(2)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on weights and PReLU slopes, never on biases (docs/theory.md#sphere-backbones)
    nesterov: bool = False
    milestones: List[int] = field(default_factory=lambda: [16000, 24000, 28000])  # in iterations
    lr_gamma: float = 0.1
    warmup_iters: int = 0  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.1
    clip_grad_norm: float = 0.0  # 0 = off
    # lr schedule: sphereface_plus.engine.optim.SCHEDULES; multistep = milestones / lr_gamma (default);
    # poly = insightface arcface_torch's (1 - t / train.iterations) ** poly_power after the warm-up
    schedule: str = "multistep"
    poly_power: float = 2.0
    # the backbone's lr as a fraction of optim.lr (the head and the MHE term keep optim.lr): below 1 when
    # fine-tuning a trained network under a new head (train.init_from, docs/train.md#fine-tuning-a-released-model);
    # 0 freezes the backbone
    backbone_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    iterations: int = _resumable(28000)
    batch_size: int = 512  # GLOBAL batch, split evenly across the processes
    seed: int = 0
    device: str = _resumable("auto")  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    # backbone precision: sphereface_plus.engine.precision.SETTINGS; auto = bf16 where the CPU/GPU has
    # native bf16, else fp32; fp32 (or off) = float32; fp16 = CUDA only (with a GradScaler). Head, losses
    # and MHE always run in float32. The same knob is `precision` in every command.
    precision: str = "auto"
    # torch.compile the backbone (before DDP): auto | true | false (YAML booleans too); auto compiles where
    # the run is long enough to repay the compilation, never on a CPU (sphereface_plus.engine.compile)
    compile: Any = _resumable("auto")
    # float64 everywhere (backbone, head, MHE; train.precision must then be fp32 or off): a reference mode for
    # exact comparisons between process layouts and with the peers' float64 code; slow
    float64: bool = False
    log_every: int = _resumable(20)
    nan_patience: int = 5  # consecutive non-finite losses before rolling back to the last checkpoint
    max_rollbacks: int = 3  # then give up with an error
    init_from: str = ""  # checkpoint whose model/head weights start the run (SphereFace+ fine-tune)
    tensorboard: bool = _resumable(True)
    # seconds a collective waits for the other ranks before the run fails with a line naming the silent
    # rank (docs/robustness.md); torch's own default, 30 minutes, unless set
    dist_timeout: float = _resumable(1800.0)

    #: keys of earlier releases, still read (with a warning) from old recipes and checkpoints
    RENAMED_KEYS = {"amp": "precision"}


@dataclass
class CheckpointConfig:
    every: int = _resumable(2000)  # iterations between checkpoints (last.pt always, plus ckpt_<iter>.pt)
    keep: int = _resumable(5)  # periodic checkpoints kept (0 = all)


@dataclass
class EvalConfig:
    pairs: str = ""  # LFW-style pairs.txt; "" = no verification; "auto" = the synthetic set's pairs
    root: str = ""  # folder of aligned crops the pairs refer to
    every: int = 0  # iterations between verifications (0 = only at the end when pairs or packs is set)
    batch_size: int = 64
    # standard insightface packs to validate on (e.g. [lfw, cfp_fp, agedb_30]; the names are
    # eval.packs.STANDARD_PACKS, checked by the train command), read from pack_dir/<name>.bin and scored
    # with insightface's protocol; checkpoints/best.pt keeps the best mean over them. Not with pairs.
    packs: List[str] = field(default_factory=list)
    pack_dir: str = ""  # the folder holding the packs


@dataclass
class FaceConfig:
    out_dir: str = _resumable("runs/default")
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    mhe: MHEConfig = field(default_factory=MHEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # what is verified and how often changes what is recorded, not what is trained
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=RESUMABLE)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dicts / lists / str / int / float / bool (safe for ``weights_only`` loading)."""
        from sphereface_plus.config import config_to_dict

        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "FaceConfig":
        """Build from nested dicts (e.g. a checkpoint's ``config``); unknown keys are errors."""
        return _from_dict(cls, data, source)

    def validate(self) -> None:
        """Checks that a type alone cannot express; never changes a value. The lists of valid names come
        from their owners. Data sources and pack names belong to ``data_prep`` and ``eval``, which this
        library does not import: the train command checks them before anything is written."""
        from sphereface_plus.engine.compile import COMPILE_SETTINGS
        from sphereface_plus.engine.optim import SCHEDULES
        from sphereface_plus.engine.precision import SETTINGS as PRECISION_SETTINGS
        from sphereface_plus.heads import list_heads
        from sphereface_plus.mhe import CLASSIFIER_MODES, MHE_VARIANTS, OBJECTIVES, POWERS, normalize_power
        from sphereface_plus.models import check_model_config
        from sphereface_plus.parallel import PARALLEL_MODES
        from sphereface_plus.templates import TEMPLATES

        choices = {
            "head.name": (self.head.name, list_heads()),
            "head.parallel": (self.head.parallel, PARALLEL_MODES),
            "train.precision": (self.train.precision, PRECISION_SETTINGS),
            "mhe.mode": (self.mhe.mode, CLASSIFIER_MODES),
            "mhe.variant": (self.mhe.variant, MHE_VARIANTS),
            "mhe.objective": (self.mhe.objective, tuple(OBJECTIVES)),
            "optim.schedule": (self.optim.schedule, SCHEDULES),
            "data.template": (self.data.template, sorted(TEMPLATES)),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
        try:
            normalize_power(self.mhe.power)
        except ValueError:
            raise ConfigError(f"mhe.power={self.mhe.power!r} is not valid; choose one of {', '.join(POWERS)}") from None
        check_head_keys(self.head)
        if not (isinstance(self.train.compile, bool) or str(self.train.compile).lower() in COMPILE_SETTINGS):
            raise ConfigError(f"train.compile={self.train.compile!r} is not valid; choose one of "
                              f"{', '.join(COMPILE_SETTINGS)}")
        if self.mhe.variant == "opensphere_v0" and self.mhe.mode not in ("batch_unique", "batch_vs_all"):
            raise ConfigError(f"mhe.variant=opensphere_v0 needs mhe.mode=batch_unique (OpenSphere_v0's) or "
                              f"batch_vs_all, not {self.mhe.mode!r}")
        if self.mhe.objective != "mhe":
            modes = OBJECTIVES[self.mhe.objective].classifier_modes
            if self.mhe.mode not in modes:
                raise ConfigError(f"mhe.objective={self.mhe.objective} offers mhe.mode {', '.join(modes)}, not "
                                  f"{self.mhe.mode!r}")
            if self.mhe.variant != "mhe":
                raise ConfigError(f"mhe.variant={self.mhe.variant} is only for mhe.objective=mhe")
            if self.head.parallel == "sharded" and self.mhe.lambda_m > 0:
                raise ConfigError(f"mhe.objective={self.mhe.objective} is not offered with head.parallel=sharded "
                                  f"(the sharded classifier term is MHE's); use mhe.objective=mhe or a replicated head")
        if not 0.0 <= self.optim.backbone_lr_scale <= 1.0:
            raise ConfigError(f"optim.backbone_lr_scale={self.optim.backbone_lr_scale} must be in [0, 1] (a fraction "
                              "of optim.lr; 0 freezes the backbone)")
        if self.optim.backbone_lr_scale != 1.0 and self.head.parallel == "sharded":
            raise ConfigError("optim.backbone_lr_scale is offered with a replicated head only (head.parallel="
                              "replicated); a sharded head's optimiser state is gathered as two parameter groups")
        try:
            self.mhe.settings()
        except ValueError as exc:
            raise ConfigError(str(exc).replace("MHE objective", "mhe.objective")) from None
        if self.model.input_size is not None and len(self.model.input_size) != 2:
            raise ConfigError(f"model.input_size must be [H, W], got {self.model.input_size}")
        try:  # a registered face backbone, its model.kwargs and input size (the registry's declarations)
            check_model_config(self.model)
        except UsageError as exc:
            raise ConfigError(str(exc)) from None
        positive = {
            "train.iterations": self.train.iterations,
            "train.batch_size": self.train.batch_size,
            "checkpoint.every": self.checkpoint.every,
            "train.nan_patience": self.train.nan_patience,
            "train.dist_timeout": self.train.dist_timeout,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if not 0.0 < self.head.sample_rate <= 1.0:
            raise ConfigError(f"head.sample_rate={self.head.sample_rate} must be in (0, 1]; 1 disables sampling")
        if self.head.sample_rate < 1.0 and self.head.parallel != "sharded":
            raise ConfigError(f"head.sample_rate={self.head.sample_rate} needs head.parallel=sharded; set "
                              "head.parallel=sharded or head.sample_rate=1")
        if self.eval.packs and not self.eval.pack_dir:
            raise ConfigError(f"eval.packs={self.eval.packs} needs eval.pack_dir, the folder holding "
                              f"{', '.join(n + '.bin' for n in self.eval.packs)}")
        if self.eval.packs and self.eval.pairs:
            raise ConfigError("eval.pairs and eval.packs are both set; validate on one (lfw is also a pack: "
                              "eval.packs=[lfw,...] scores it with insightface's protocol), set the other to []/''")
        if self.train.float64 and self.train.precision not in ("fp32", "off"):
            raise ConfigError(f"train.float64=true trains in float64 throughout: set train.precision=fp32 (got "
                              f"train.precision={self.train.precision!r})")
        if sorted(self.optim.milestones) != list(self.optim.milestones):
            raise ConfigError(f"optim.milestones must be increasing, got {self.optim.milestones}")


def check_head_keys(head: HeadConfig) -> None:
    """Each of ``head``'s own settings against the head's constructor signature
    (``heads.head_parameters``): an unknown key names the head's valid keys and the nearest one; a value
    must fit the declared type (ints are taken for floats). The values themselves (a margin out of range,
    an unknown ``gradient``) are the head's to judge, when it is built (once, by the trainer)."""
    from sphereface_plus.heads import head_parameters, list_heads

    if head.name not in list_heads():
        return  # reported by the caller's check of head.name
    params = head_parameters(head.name)
    trainer_keys = [f.name for f in dataclasses.fields(head) if not f.metadata.get(EXTRA_KEYS)]
    for key, value in head.given().items():
        source = head.__dict__.get("_extra_sources", {}).get(key, "config")
        if key not in params:
            valid = sorted(params)
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" Did you mean 'head.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key 'head.{key}' (in {source}): head.name={head.name!r} does not take "
                              f"it.{hint} Its settings: {', '.join(valid) or '(none)'}; the trainer's: "
                              f"{', '.join(trainer_keys)}")
        tp = params[key].annotation
        if tp is not inspect.Parameter.empty and tp in (int, float, bool, str):
            coerce_value(value, tp, f"head.{key}", source)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> FaceConfig:
    """The face recipe: defaults < the YAML file at ``path`` < ``overrides`` (``key=value``), validated."""
    return _load_config(path, overrides, schema=FaceConfig)
