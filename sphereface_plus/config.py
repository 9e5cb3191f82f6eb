"""Typed run configurations: defaults < YAML file < ``key=value`` overrides, for any dataclass schema.

The loader is generic: :func:`load_config` takes the schema (a dataclass whose fields are plain types,
lists, ``Optional`` of those, or nested dataclasses) and returns a validated instance; the face
trainer's :class:`Config` is the default schema, CIFAR's ``CifarConfig`` (and the GAN's) use the same
code. Values are parsed as YAML 1.2 (only ``true``/``false`` are booleans, so ``precision: off`` stays the
string ``"off"``) and checked against the declared types.

The face trainer's tree: one dataclass per section (``model``, ``head``, ``mhe``, ``data``, ``optim``, ``train``,
``checkpoint``, ``eval``) plus ``out_dir``. A YAML recipe in ``configs/`` sets any subset of the
fields; command-line overrides use dotted keys (``train.batch_size=64``, ``optim.milestones=[10,20]``)
and are parsed with YAML, then checked against the field's declared type. An unknown key or a value
of the wrong type is an error that names the nearest valid key, so a typo never silently trains the
wrong recipe.

    cfg = load_config("configs/sphereface20_casia.yaml", ["train.batch_size=256", "out_dir=runs/x"])
    cfg.optim.lr            # 0.1
    cfg.to_dict()           # plain nested dicts, as stored in config.yaml and in every checkpoint
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

from sphereface_plus.errors import UsageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "from_dict",
    "apply_overrides",
    "config_to_dict",
    "config_to_yaml",
    "yaml_load",
    "add_field_flags",
    "load_config_from_args",
]


class ConfigError(UsageError):
    """A configuration problem: unknown key, wrong type or invalid value (the message says how to fix it)."""


@dataclass
class ModelConfig:
    backbone: str = "sphere20"  # registered name (sphereface_plus.models.list_backbones())
    # [H, W] of the network input: follows from data.template (the trainer fills it in from the
    # dataset's crop size, and config.yaml records it); set it only to check that it is what you expect
    input_size: Optional[List[int]] = None
    embedding_dim: int = 512  # feature width: the final FC (SphereFace fc5) / features layer, 512 in every reference
    # extra keyword arguments of the backbone's builder (e.g. {dropout: 0.4} for an iresnet, {scale: 1} for
    # mobilefacenet): checked against the options the backbone declares (docs/backbones.md); recorded in
    # config.yaml and checkpoints, so every consumer rebuilds the same network (models.backbone_from_config)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # NHWC memory format; null = auto: on with bf16 on a CPU (measured faster there,
    # bench/results/train_throughput.md), off otherwise; true / false are honoured as given
    channels_last: Optional[bool] = None


#: the metadata that marks a dataclass field as the home of free keys (see :class:`HeadConfig`)
EXTRA_KEYS = "extra_keys"


@dataclass
class HeadConfig:
    """The classifier head: its name, the trainer's layout settings, and the head's own settings.

    ``name``, ``parallel`` and ``sample_rate`` are the trainer's (``trainer.TRAINER_HEAD_SETTINGS``).
    Every other key under ``head`` (``head.m=1.7``, ``head.s: 30``) is a setting of the head itself,
    named as its constructor's keyword argument (``sphereface_plus.heads.head_parameters``), kept in
    ``settings`` and read back as an attribute (``cfg.head.m``); validation checks each one against the
    head's signature (an unknown key names the head's valid keys and the nearest one) and its declared
    type. Settings not given keep the head's own defaults; the run's config.yaml and checkpoints record
    the values in force (the trainer writes them back). A ``null`` value means "not set".
    """

    name: str = "a_softmax"  # registered name (sphereface_plus.heads.list_heads())
    # how the classifier is laid out over the processes (sphereface_plus.parallel.PARALLEL_MODES)
    parallel: str = "replicated"  # replicated: the whole head on every rank; sharded: rows split over ranks
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
    cache_dir: str = ""  # where generated + aligned images go; "" = <out_dir>/synthetic


@dataclass
class DataConfig:
    source: str = "folder"  # data_prep.datasets.DATA_SOURCES (synthetic | folder | list | rec | packed)
    root: str = ""  # the aligned folder / the list file's image root / folder with train.rec / pack
    list_file: str = ""  # for source=list: "relative/path label" per line ("" = <root>/list.txt)
    template: str = "112x96"  # alignment template of the crops (data_prep.geometry.TEMPLATES); sets model.input_size
    flip: bool = True  # random horizontal flip (docs/theory.md#preprocessing)
    num_workers: int = 2
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


@dataclass
class TrainConfig:
    iterations: int = 28000
    batch_size: int = 512  # GLOBAL batch, split evenly across the processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    # backbone precision: sphereface_plus.engine.precision.SETTINGS; auto = bf16 where the CPU/GPU has
    # native bf16, else fp32; fp32 (or off) = float32; fp16 = CUDA only (with a GradScaler). Head, losses
    # and MHE always run in float32. The same knob is `precision` in every command.
    precision: str = "auto"
    # torch.compile the backbone (before DDP): auto | true | false (YAML booleans too); auto compiles where
    # the run is long enough to repay the compilation, never on a CPU (sphereface_plus.engine.compile)
    compile: Any = "auto"
    # float64 everywhere (backbone, head, MHE; train.precision must then be fp32 or off): a reference mode for
    # exact comparisons between process layouts and with the peers' float64 code; slow
    float64: bool = False
    log_every: int = 20
    nan_patience: int = 5  # consecutive non-finite losses before rolling back to the last checkpoint
    max_rollbacks: int = 3  # then give up with an error
    init_from: str = ""  # checkpoint whose model/head weights start the run (SphereFace+ fine-tune)
    tensorboard: bool = True
    # seconds a collective waits for the other ranks before the run fails with a line naming the silent
    # rank (docs/robustness.md); torch's own default, 30 minutes, unless set
    dist_timeout: float = 1800.0

    #: keys of earlier releases, still read (with a warning) from old recipes and checkpoints
    RENAMED_KEYS = {"amp": "precision"}


@dataclass
class CheckpointConfig:
    every: int = 2000  # iterations between checkpoints (last.pt always, plus ckpt_<iter>.pt)
    keep: int = 5  # periodic checkpoints kept (0 = all)


@dataclass
class EvalConfig:
    pairs: str = ""  # LFW-style pairs.txt; "" = no verification; "auto" = the synthetic set's pairs
    root: str = ""  # folder of aligned crops the pairs refer to
    every: int = 0  # iterations between verifications (0 = only at the end when pairs or packs is set)
    batch_size: int = 64
    # standard insightface packs to validate on (e.g. [lfw, cfp_fp, agedb_30]; the names are
    # eval.packs.STANDARD_PACKS, checked by the train runner), read from pack_dir/<name>.bin and scored
    # with insightface's protocol; checkpoints/best.pt keeps the best mean over them. Not with pairs.
    packs: List[str] = field(default_factory=list)
    pack_dir: str = ""  # the folder holding the packs


@dataclass
class Config:
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    mhe: MHEConfig = field(default_factory=MHEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dicts / lists / str / int / float / bool (safe for ``weights_only`` loading)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "Config":
        """Build from nested dicts (e.g. a checkpoint's ``config``); unknown keys are errors."""
        return from_dict(cls, data, source)

    def validate(self) -> None:
        """Checks that a type alone cannot express; the lists of valid names come from their owners.

        Data sources and templates belong to ``data_prep``, which this library does not import: the
        train runner checks them (``data_prep.datasets.check_data_config``) before anything is written.
        """
        from sphereface_plus.engine.optim import SCHEDULES
        from sphereface_plus.heads import list_heads
        from sphereface_plus.mhe import CLASSIFIER_MODES, MHE_VARIANTS, OBJECTIVES, POWERS, normalize_power
        from sphereface_plus.models import check_model_config
        from sphereface_plus.engine.precision import SETTINGS as AMP_SETTINGS
        from sphereface_plus.parallel import PARALLEL_MODES

        choices = {
            "head.name": (self.head.name, list_heads()),
            "head.parallel": (self.head.parallel, PARALLEL_MODES),
            "train.precision": (self.train.precision, AMP_SETTINGS),
            "mhe.power": (self.mhe.power, POWERS),
            "mhe.mode": (self.mhe.mode, CLASSIFIER_MODES),
            "mhe.variant": (self.mhe.variant, MHE_VARIANTS),
            "mhe.objective": (self.mhe.objective, tuple(OBJECTIVES)),
            "optim.schedule": (self.optim.schedule, SCHEDULES),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
        check_head_settings(self.head)
        from sphereface_plus.engine.compile import COMPILE_SETTINGS, normalize_compile

        if not (isinstance(self.train.compile, bool) or str(self.train.compile).lower() in COMPILE_SETTINGS):
            raise ConfigError(f"train.compile={self.train.compile!r} is not valid; choose one of "
                              f"{', '.join(COMPILE_SETTINGS)}")
        self.train.compile = normalize_compile(self.train.compile)
        self.mhe.power = normalize_power(self.mhe.power)  # parsed once, here
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


def check_head_settings(head: HeadConfig) -> None:
    """Each of ``head``'s own settings against the head's constructor (``heads.head_parameters``): an
    unknown key names the head's valid keys and the nearest one; a value is checked against the
    declared type (ints are taken for floats) and then by building a tiny head, so a bad value (an
    unknown ``gradient``, a margin out of range) is reported before anything is written."""
    from sphereface_plus.heads import create_head, head_parameters, list_heads

    if head.name not in list_heads():
        return  # reported by the caller's check of head.name
    params = head_parameters(head.name)
    trainer_keys = [f.name for f in dataclasses.fields(head) if not f.metadata.get(EXTRA_KEYS)]
    for key in list(head.settings):
        value = head.settings[key]
        if value is None:  # "not set" (old checkpoints' configs hold every key of every head)
            del head.settings[key]
            continue
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
            head.settings[key] = _coerce(value, tp, f"head.{key}", source)
    try:
        create_head(head.name, in_features=2, num_classes=2, **head.settings)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"head.name={head.name!r} with {head.settings}: {exc}") from None


# ---------------------------------------------------------------------- merging and type checks
def _extra_field(obj: Any) -> Optional[str]:
    """The field of ``obj`` that takes free keys (metadata :data:`EXTRA_KEYS`), if any."""
    for f in dataclasses.fields(obj):
        if f.metadata.get(EXTRA_KEYS):
            return f.name
    return None


def _field_types(obj: Any) -> Dict[str, Any]:
    """Declared fields and types, without the free-keys field (its keys are not fields)."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj) if not f.metadata.get(EXTRA_KEYS)}


def _all_keys(obj: Any, prefix: str = "") -> List[str]:
    keys = []
    for name, tp in _field_types(obj).items():
        value = getattr(obj, name)
        key = prefix + name
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, key + "."))
        else:
            keys.append(key)
    extra = _extra_field(obj)
    if extra:
        keys.extend(prefix + k for k in getattr(obj, extra))
    return keys


def _set_extra(obj: Any, name: str, value: Any, source: str) -> bool:
    """Store a free key in ``obj``'s free-keys field (checked later by ``validate``, whose messages name
    ``source``, kept beside the fields); False when ``obj`` has no free-keys field."""
    extra = _extra_field(obj)
    if extra is None:
        return False
    obj.__dict__.setdefault("_extra_sources", {})[name] = source
    if value is None:
        getattr(obj, extra).pop(name, None)
    else:
        getattr(obj, extra)[name] = value
    return True


def _unknown_key(key: str, root: Any, source: str) -> ConfigError:
    valid = _all_keys(root)
    sections = sorted({k.rsplit(".", 1)[0] for k in valid if "." in k})
    close = difflib.get_close_matches(key, valid + sections, n=1, cutoff=0.5)
    if not close:  # a typo in the section name: compare the last part alone
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} (in {source}).{hint} Valid keys: {', '.join(valid)}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, nothing else is cast."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if origin in (list, List, Sequence):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list (e.g. {key}=[1,2]), got {value!r} (in {source})")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if origin in (dict, Dict):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} expects a mapping of names to values (e.g. {key}={{dropout: 0.4}} or "
                              f"{key}.dropout=0.4), got {value!r} (in {source})")
        _, item_tp = typing.get_args(tp) or (str, Any)
        return {k: _coerce(v, item_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {value!r} (in {source})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} expects an integer, got {value!r} (in {source})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects true or false, got {value!r} (in {source})")
        return value
    if tp is str:
        # YAML turns `power: 2` or `power: 0` into ints; a str field takes them as written
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} expects a string, got {value!r} (in {source})")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _current_name(obj: Any, name: str, prefix: str, source: str) -> str:
    """``name``, or its new name when the schema renamed it (a ``RENAMED_KEYS`` class attribute mapping old to
    new): old recipes and the configs stored in old checkpoints keep loading, with a warning."""
    new = getattr(type(obj), "RENAMED_KEYS", {}).get(name)
    if new is None:
        return name
    logger.warning("%s%s is now called %s%s (in %s); please update it", prefix, name, prefix, new, source)
    return new


def _merge(obj: Any, data: Dict[str, Any], prefix: str, source: str, root: Any = None) -> None:
    root = obj if root is None else root
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r} (in {source})")
    types = _field_types(obj)
    for name, value in data.items():
        name = _current_name(obj, str(name), prefix, source)
        key = prefix + name
        if name not in types:
            if _set_extra(obj, str(name), value, source):
                continue
            raise _unknown_key(key, root, source)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, key + ".", source, root)
        else:
            setattr(obj, name, _coerce(value, types[name], key, source))


def _set_dotted(cfg: Any, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        part = _current_name(obj, part, ".".join(parts[:i] + [""]), source)
        types = _field_types(obj)
        if part not in types:
            if i == len(parts) - 1 and _set_extra(obj, part, value, source):
                return
            raise _unknown_key(key, cfg, source)
        if typing.get_origin(types[part]) in (dict, Dict) and i == len(parts) - 2:
            # a free-form mapping (model.kwargs): `model.kwargs.dropout=0.4` sets one entry
            entry = parts[-1]
            merged = dict(getattr(obj, part) or {})
            merged[entry] = value
            setattr(obj, part, _coerce(merged, types[part], ".".join(parts[:-1]), source))
            return
        if i == len(parts) - 1:
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current):
                _merge(current, value, key + ".", source, cfg)
            else:
                setattr(obj, part, _coerce(value, types[part], key, source))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise _unknown_key(key, cfg, source)


def _yaml_loader():
    """A SafeLoader with YAML 1.2 booleans and floats.

    Only true/false are booleans, so ``precision: off`` stays "off"; and, as in YAML 1.2, ``2e-4`` or ``1E5``
    (no dot) are floats, which YAML 1.1 would read as strings (``optim.lr=2e-4`` must be a number).
    """
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return Loader


def yaml_load(text_or_stream) -> Any:
    import yaml

    return yaml.load(text_or_stream, Loader=_yaml_loader())  # a SafeLoader subclass: no object tags


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Apply ``key=value`` strings in order (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.batch_size=64)")
        key, text = item.split("=", 1)
        _set_dotted(cfg, key.strip(), _parse_value(text), source=f"override {item!r}")
    return cfg


def _validate(cfg: Any) -> Any:
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def from_dict(schema: Type[T], data: Dict[str, Any], source: str = "config") -> T:
    """An instance of ``schema`` from nested dicts (unknown keys and wrong types are errors), validated."""
    cfg = schema()
    _merge(cfg, data, prefix="", source=source)
    return _validate(cfg)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), schema: Type[T] = None) -> T:
    """Defaults of ``schema`` (default :class:`Config`), then the YAML file at ``path`` (if any), then
    ``overrides``; validated (the schema's ``validate()`` method, when it has one)."""
    import yaml

    cfg = (schema or Config)()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (recipes live in configs/*.yaml)")
        with open(p, "r", encoding="utf-8") as fh:
            try:
                data = yaml_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
        _merge(cfg, data, prefix="", source=str(p))
    apply_overrides(cfg, overrides)
    return _validate(cfg)


def add_field_flags(group, fields: Dict[str, Any], aliases: Optional[Dict[str, List[str]]] = None) -> None:
    """One command-line flag per top-level recipe field (``{name: (type, help)}``), spelled with dashes and,
    for names with an underscore, also with underscores (the original scripts' spelling), plus ``aliases``.
    Every flag defaults to None, so :func:`load_config_from_args` passes on only the flags that were given."""
    for name, (tp, text) in fields.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else []) + (aliases or {}).get(name, [])
        group.add_argument(*flags, dest=name, type=tp, default=None, help=text)


def load_config_from_args(args: Any, flag_names: Sequence[str], schema: Type[T]) -> T:
    """Defaults < ``args.config`` YAML < ``args.overrides`` (``key=value``) < the flags in ``flag_names``
    that were given (not None)."""
    flags = [f"{n}={getattr(args, n)}" for n in flag_names if getattr(args, n, None) is not None]
    return load_config(args.config, list(getattr(args, "overrides", [])) + flags, schema=schema)


def stored_config_as_read(saved: Dict[str, Any], schema: Any = None) -> Dict[str, Any]:
    """A stored config (a checkpoint's ``config``) as this release reads it: keys a schema renamed under their
    new names (``RENAMED_KEYS``) and every declared field the stored config lacks (a setting added since it
    was written) at the schema's default. Comparing the result with today's config (the resume check) then
    names only settings that really differ, not settings an earlier release did not have."""
    obj = (schema or Config)() if schema is None or isinstance(schema, type) else schema
    if not isinstance(saved, dict):
        return saved
    renamed = getattr(type(obj), "RENAMED_KEYS", {})
    out = {renamed.get(k, k) if renamed.get(k) not in saved else k: v for k, v in saved.items()}
    for f in dataclasses.fields(obj):
        if f.metadata.get(EXTRA_KEYS):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = stored_config_as_read(out.get(f.name) or {}, value)
        elif f.name not in out:
            out[f.name] = copy.deepcopy(value)
    return out


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dicts; a free-keys field's entries sit beside the declared fields (``head.m``)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get(EXTRA_KEYS):
            out.update(copy.deepcopy(value))
        elif dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def config_to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
