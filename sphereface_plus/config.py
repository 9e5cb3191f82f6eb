"""Typed run configurations: defaults < YAML file < ``key=value`` overrides, for any dataclass schema.

The loader is generic: :func:`load_config` takes the schema (a dataclass whose fields are plain types,
lists, ``Optional`` of those, or nested dataclasses) and returns a validated instance; the face
trainer's :class:`Config` is the default schema, CIFAR's ``CifarConfig`` (and the GAN's) use the same
code. Values are parsed as YAML 1.2 (only ``true``/``false`` are booleans, so ``amp: off`` stays the
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

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

from sphereface_plus.errors import UsageError

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
    embedding_dim: int = 512  # fc5 width (SPEC section 3: 512)
    # NHWC memory format; null = auto: on with bf16 on a CPU (measured faster there,
    # bench/results/train_throughput.md), off otherwise; true / false are honoured as given
    channels_last: Optional[bool] = None


@dataclass
class HeadConfig:
    """The classifier head and the settings given to it.

    Each setting is named as the head's constructor argument and is passed only when set here; the
    others keep the head's own defaults (A-Softmax m=4, base=1000, gamma=0.12, power=1, lambda_min=5;
    CosFace s=64, m=0.35; ArcFace s=64, m=0.5). The values in force are written back under ``head`` in
    the run's config.yaml and checkpoints. A new optional head setting is one more line here.
    """

    name: str = "a_softmax"  # registered name (sphereface_plus.heads.list_heads())
    m: Optional[float] = None  # margin: A-Softmax's integer m (1..4), CosFace/ArcFace's additive margin
    s: Optional[float] = None  # CosFace / ArcFace scale
    # A-Softmax lambda = max(lambda_min, base * (1 + gamma * t) ** -power) (SPEC section 4)
    base: Optional[float] = None
    gamma: Optional[float] = None
    power: Optional[float] = None
    lambda_min: Optional[float] = None
    easy_margin: Optional[bool] = None  # ArcFace
    # A-Softmax backward: sphereface_plus.heads.A_SOFTMAX_GRADIENTS (exact = autograd, the default;
    # caffe = the released models' margin_inner_product_layer Backward, issue 11)
    gradient: Optional[str] = None
    # how the classifier is laid out over the processes (sphereface_plus.parallel.PARALLEL_MODES): the
    # trainer's settings, not the head's (TRAINER_HEAD_SETTINGS), so they are never passed to the head
    parallel: str = "replicated"  # replicated: the whole head on every rank; sharded: rows split over ranks
    sample_rate: float = 1.0  # sharded only: Partial FC negative-class sampling rate in (0, 1]; 1 is exact


@dataclass
class MHEConfig:
    # SphereFace+ (SPEC section 5): loss = CE + lambda_m * classifier MHE; 0 turns it off
    lambda_m: float = 0.0
    power: str = "2"  # kernel: sphereface_plus.mhe.POWERS (0 | 1 | 2 | a0 | a1 | a2)
    mode: str = "batch_vs_all"  # sphereface_plus.mhe.CLASSIFIER_MODES (see classifier_mhe)


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
    flip: bool = True  # random horizontal flip (SPEC section 3)
    num_workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on weights and PReLU slopes, never on biases (SPEC section 3)
    nesterov: bool = False
    milestones: List[int] = field(default_factory=lambda: [16000, 24000, 28000])  # in iterations
    lr_gamma: float = 0.1
    warmup_iters: int = 0  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.1
    clip_grad_norm: float = 0.0  # 0 = off


@dataclass
class TrainConfig:
    iterations: int = 28000
    batch_size: int = 512  # GLOBAL batch, split evenly across the processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    # backbone precision: sphereface_plus.engine.precision.SETTINGS; auto = bf16 where the CPU/GPU has
    # native bf16, else fp32; fp32 (or off) = float32; fp16 = CUDA only (with a GradScaler). Head, losses
    # and MHE always run in float32.
    amp: str = "auto"
    # torch.compile the backbone (before DDP): auto | true | false (YAML booleans too); auto compiles where
    # the run is long enough to repay the compilation (sphereface_plus.engine.compile, docs/performance.md)
    compile: Any = "auto"
    log_every: int = 20
    nan_patience: int = 5  # consecutive non-finite losses before rolling back to the last checkpoint
    max_rollbacks: int = 3  # then give up with an error
    init_from: str = ""  # checkpoint whose model/head weights start the run (SphereFace+ fine-tune)
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    every: int = 2000  # iterations between checkpoints (last.pt always, plus ckpt_<iter>.pt)
    keep: int = 5  # periodic checkpoints kept (0 = all)


@dataclass
class EvalConfig:
    pairs: str = ""  # LFW-style pairs.txt; "" = no verification; "auto" = the synthetic set's pairs
    root: str = ""  # folder of aligned crops the pairs refer to
    every: int = 0  # iterations between verifications (0 = only at the end when pairs is set)
    batch_size: int = 64


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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "Config":
        """Build from nested dicts (e.g. a checkpoint's ``config``); unknown keys are errors."""
        return from_dict(cls, data, source)

    def validate(self) -> None:
        """Checks that a type alone cannot express; the lists of valid names come from their owners.

        Data sources and templates belong to ``data_prep``, which this library does not import: the
        train runner checks them (``data_prep.datasets.check_data_config``) before anything is written.
        """
        from sphereface_plus.heads import A_SOFTMAX_GRADIENTS, list_heads
        from sphereface_plus.mhe import CLASSIFIER_MODES, POWERS, normalize_power
        from sphereface_plus.models import list_backbones
        from sphereface_plus.engine.precision import SETTINGS as AMP_SETTINGS
        from sphereface_plus.parallel import PARALLEL_MODES

        choices = {
            "model.backbone": (self.model.backbone, list_backbones()),
            "head.name": (self.head.name, list_heads()),
            "head.parallel": (self.head.parallel, PARALLEL_MODES),
            "train.amp": (self.train.amp, AMP_SETTINGS),
            "mhe.power": (self.mhe.power, POWERS),
            "mhe.mode": (self.mhe.mode, CLASSIFIER_MODES),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
        from sphereface_plus.engine.compile import COMPILE_SETTINGS, normalize_compile

        if not (isinstance(self.train.compile, bool) or str(self.train.compile).lower() in COMPILE_SETTINGS):
            raise ConfigError(f"train.compile={self.train.compile!r} is not valid; choose one of "
                              f"{', '.join(COMPILE_SETTINGS)}")
        self.train.compile = normalize_compile(self.train.compile)
        if self.head.gradient is not None:
            if self.head.gradient not in A_SOFTMAX_GRADIENTS:
                raise ConfigError(f"head.gradient={self.head.gradient!r} is not valid; choose one of "
                                  f"{', '.join(A_SOFTMAX_GRADIENTS)}")
            if self.head.name != "a_softmax":
                raise ConfigError(f"head.gradient={self.head.gradient!r} applies to head.name=a_softmax only, not "
                                  f"{self.head.name!r}; remove head.gradient or choose head.name=a_softmax")
        self.mhe.power = normalize_power(self.mhe.power)  # parsed once, here
        if self.model.input_size is not None and len(self.model.input_size) != 2:
            raise ConfigError(f"model.input_size must be [H, W], got {self.model.input_size}")
        positive = {
            "train.iterations": self.train.iterations,
            "train.batch_size": self.train.batch_size,
            "checkpoint.every": self.checkpoint.every,
            "train.nan_patience": self.train.nan_patience,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if not 0.0 < self.head.sample_rate <= 1.0:
            raise ConfigError(f"head.sample_rate={self.head.sample_rate} must be in (0, 1]; 1 disables sampling")
        if self.head.sample_rate < 1.0 and self.head.parallel != "sharded":
            raise ConfigError(f"head.sample_rate={self.head.sample_rate} needs head.parallel=sharded; set "
                              "head.parallel=sharded or head.sample_rate=1")
        if sorted(self.optim.milestones) != list(self.optim.milestones):
            raise ConfigError(f"optim.milestones must be increasing, got {self.optim.milestones}")


# ---------------------------------------------------------------------- merging and type checks
def _field_types(obj: Any) -> Dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _all_keys(obj: Any, prefix: str = "") -> List[str]:
    keys = []
    for name, tp in _field_types(obj).items():
        value = getattr(obj, name)
        key = prefix + name
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, key + "."))
        else:
            keys.append(key)
    return keys


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


def _merge(obj: Any, data: Dict[str, Any], prefix: str, source: str, root: Any = None) -> None:
    root = obj if root is None else root
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r} (in {source})")
    types = _field_types(obj)
    for name, value in data.items():
        key = prefix + str(name)
        if name not in types:
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
        types = _field_types(obj)
        if part not in types:
            raise _unknown_key(key, cfg, source)
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

    Only true/false are booleans, so ``amp: off`` stays "off"; and, as in YAML 1.2, ``2e-4`` or ``1E5``
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


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
