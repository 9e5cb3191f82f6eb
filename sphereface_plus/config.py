"""The typed configuration tree of a training run: defaults < YAML file < ``key=value`` overrides.

One dataclass per section (``model``, ``head``, ``mhe``, ``data``, ``optim``, ``train``,
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
from typing import Any, Dict, List, Optional, Sequence, Union

from sphereface_plus.errors import UsageError

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_to_yaml",
]


class ConfigError(UsageError):  # a ToolkitError and a ValueError
    """A configuration problem: unknown key, wrong type or invalid value (the message says how to fix it)."""


@dataclass
class ModelConfig:
    backbone: str = "sphere20"  # registered name (sphereface_plus.create_backbone)
    input_size: List[int] = field(default_factory=lambda: [112, 96])  # [H, W] of the aligned crops
    embedding_dim: int = 512  # fc5 width (SPEC section 3: 512)
    channels_last: bool = False  # NHWC memory format (helps oneDNN / tensor cores on some machines)


@dataclass
class HeadConfig:
    name: str = "a_softmax"  # a_softmax | softmax | cosface | arcface
    # A-Softmax (SPEC section 4): margin m and lambda = max(lambda_min, base * (1 + gamma * t) ** -power)
    m: int = 4
    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0
    # CosFace / ArcFace: scale s and additive margin
    scale: float = 30.0
    margin: float = 0.35


@dataclass
class MHEConfig:
    # SphereFace+ (SPEC section 5): loss = CE + lambda_m * classifier MHE; 0 turns it off
    lambda_m: float = 0.0
    power: str = "2"  # kernel: 0 | 1 | 2 | a0 | a1 | a2
    mode: str = "batch_vs_all"  # see sphereface_plus.mhe.classifier_mhe


@dataclass
class SyntheticConfig:
    num_identities: int = 40
    images_per_identity: int = 12
    seed: int = 0
    pairs_per_fold: int = 60  # verification pairs per fold in the generated pairs.txt (10 folds)
    cache_dir: str = ""  # where generated + aligned images go; "" = <out_dir>/synthetic


@dataclass
class DataConfig:
    source: str = "folder"  # synthetic | folder | list | rec | packed
    root: str = ""  # the aligned folder / the list file's image root / folder with train.rec / pack
    list_file: str = ""  # for source=list: "relative/path label" per line ("" = <root>/list.txt)
    template: str = "112x96"  # alignment template of the crops ('112x96' or '112x112')
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
    amp: str = "bf16"  # off | bf16 | fp16 (CUDA only; CPU always trains in float32)
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
        cfg = cls()
        _merge(cfg, data, prefix="", source=source)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cross-field checks that a type alone cannot express."""
        choices = {
            "data.source": (self.data.source, ("synthetic", "folder", "list", "rec", "packed")),
            "data.template": (self.data.template, ("112x96", "112x112")),
            "train.amp": (self.train.amp, ("off", "bf16", "fp16")),
            "mhe.power": (self.mhe.power, ("0", "1", "2", "a0", "a1", "a2")),
            "mhe.mode": (self.mhe.mode, ("batch_vs_all", "batch_unique", "full")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
        if len(self.model.input_size) != 2:
            raise ConfigError(f"model.input_size must be [H, W], got {self.model.input_size}")
        expected = {"112x96": [112, 96], "112x112": [112, 112]}[self.data.template]
        if list(self.model.input_size) != expected:
            raise ConfigError(
                f"model.input_size={self.model.input_size} does not match data.template={self.data.template!r} "
                f"(crops of that template are {expected}); set both consistently"
            )
        positive = {
            "train.iterations": self.train.iterations,
            "train.batch_size": self.train.batch_size,
            "checkpoint.every": self.checkpoint.every,
            "train.nan_patience": self.train.nan_patience,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if sorted(self.optim.milestones) != list(self.optim.milestones):
            raise ConfigError(f"optim.milestones must be increasing, got {self.optim.milestones}")
        if self.data.source != "synthetic" and not self.data.root:
            raise ConfigError(
                f"data.source={self.data.source!r} needs data.root=<folder>; "
                "or use data.source=synthetic for the generated demo identities"
            )


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


def _set_dotted(cfg: Config, key: str, value: Any, source: str) -> None:
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
    """A SafeLoader with YAML 1.2 booleans: only true/false are booleans, so ``amp: off`` stays "off"."""
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
    return Loader


def _yaml_load(text_or_stream) -> Any:
    import yaml

    return yaml.load(text_or_stream, Loader=_yaml_loader())  # a SafeLoader subclass: no object tags


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return _yaml_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``key=value`` strings in order (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.batch_size=64)")
        key, text = item.split("=", 1)
        _set_dotted(cfg, key.strip(), _parse_value(text), source=f"override {item!r}")
    return cfg


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated."""
    import yaml

    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (recipes live in configs/*.yaml)")
        with open(p, "r", encoding="utf-8") as fh:
            try:
                data = _yaml_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        _merge(cfg, data, prefix="", source=str(p))
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def config_to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
