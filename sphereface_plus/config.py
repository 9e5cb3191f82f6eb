"""Typed run configurations: defaults < YAML file < ``key=value`` overrides, for any dataclass schema.

The loader is generic: :func:`load_config` takes the schema (a dataclass whose fields are plain types,
lists, ``Optional`` of those, or nested dataclasses) and returns a validated instance. Each application
owns its schema in one place: the face trainer's :class:`~sphereface_plus.face.config.FaceConfig`,
CIFAR's :class:`~sphereface_plus.cifar.config.CifarConfig` and the GAN's
:class:`~sphereface_plus.gan.config.GanConfig`. Values are parsed as YAML 1.2 (only ``true``/``false`` are
booleans, so ``precision: off`` stays the string ``"off"``) and checked against the declared types.

Command-line overrides use dotted keys (``train.batch_size=64``, ``optim.milestones=[10,20]``), parsed
with YAML, then checked against the field's declared type. An unknown key or a value of the wrong type
is an error that names the nearest valid key, so a typo never silently trains the wrong recipe. A schema
may declare ``RENAMED_KEYS`` (old name -> new name, still read with a warning) and mark fields that may
change when a run is resumed (``field(metadata={"resumable": True})``, :func:`resumable_keys`).

    cfg = load_config("configs/face/sphereface20_casia.yaml", ["train.batch_size=256"], schema=FaceConfig)
    cfg.to_dict()           # plain nested dicts, as stored in config.yaml and in every checkpoint
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import logging
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

from sphereface_plus.errors import UsageError
from sphereface_plus.errors import short_repr as _short

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "EXTRA_KEYS",
    "coerce_value",
    "resumable_keys",
    "load_config",
    "from_dict",
    "apply_overrides",
    "config_to_dict",
    "config_to_yaml",
    "yaml_load",
    "naming_recipe",
    "stored_config_as_read",
    "recipe_path",
    "RECIPE_GROUPS",
]


class ConfigError(UsageError):
    """A configuration problem: unknown key, wrong type or invalid value (the message says how to fix it)."""


#: the metadata that marks a dataclass field as the home of free keys (``FaceConfig.head.settings``)
EXTRA_KEYS = "extra_keys"


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


def coerce_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, nothing else is cast."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce_value(value, args[0], key, source)
    if origin in (list, List, Sequence):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list (e.g. {key}=[1,2]), got {_short(value)} (in {source})")
        return [coerce_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if origin in (dict, Dict):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} expects a mapping of names to values (e.g. {key}={{dropout: 0.4}} or "
                              f"{key}.dropout=0.4), got {_short(value)} (in {source})")
        _, item_tp = typing.get_args(tp) or (str, Any)
        return {k: coerce_value(v, item_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {_short(value)} (in {source})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} expects an integer, got {_short(value)} (in {source})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects true or false, got {_short(value)} (in {source})")
        return value
    if tp is str:
        # YAML turns `power: 2` or `power: 0` into ints; a str field takes them as written
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} expects a string, got {_short(value)} (in {source})")
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
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {_short(data)} (in {source})")
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
            setattr(obj, name, coerce_value(value, types[name], key, source))


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
            setattr(obj, part, coerce_value(merged, types[part], ".".join(parts[:-1]), source))
            return
        if i == len(parts) - 1:
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current):
                _merge(current, value, key + ".", source, cfg)
            else:
                setattr(obj, part, coerce_value(value, types[part], key, source))
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


#: a recipe is a small tree: this many values per character of its text (plus a constant), this deep at most
YAML_VALUES_PER_CHAR, YAML_MAX_DEPTH = 4, 64


def yaml_load(text_or_stream, source: str = "the YAML text") -> Any:
    """The YAML document (SafeLoader subclass: no object tags) of a text or an open stream.

    A document that nests deeper than :data:`YAML_MAX_DEPTH` or expands, through aliases (``*ref``), to more
    values than its text could hold without them is a :class:`ConfigError`: a few lines of anchors make a
    tree of 10**9 shared leaves ("billion laughs") that every later walk over the config (a repr, a copy, the
    checkpoint's checksum) would take hours to visit.
    """
    import yaml

    text = text_or_stream if isinstance(text_or_stream, (str, bytes)) else text_or_stream.read()
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a recipe") from None
    _check_tree(data, 1000 + YAML_VALUES_PER_CHAR * len(text), source)
    return data


def _check_tree(data: Any, budget: int, source: str) -> None:
    """Refuse a tree of more than ``budget`` values (shared ones counted each time) or deeper than the limit."""
    stack = [(data, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > budget:
            raise ConfigError(f"{source} expands to more than {budget} values (YAML aliases repeating a structure?); "
                              "write the recipe out without anchors and aliases")
        if depth > YAML_MAX_DEPTH:
            raise ConfigError(f"{source} nests more than {YAML_MAX_DEPTH} levels deep; a recipe is a few levels of "
                              "sections and values")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for kv in node.items() for v in kv]
        elif isinstance(node, (list, tuple)):
            stack += [(v, depth + 1) for v in node]


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml_load(text, "an override") if text.strip() else ""
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


#: the folders of ``configs/``, one per application (``configs/face/``, ``configs/cifar/``, ``configs/gan/``)
RECIPE_GROUPS = ("face", "cifar", "gan")


def recipe_path(path) -> Path:
    """``path``, or where an old recipe path now is: the recipes moved from ``configs/<name>.yaml`` into one
    folder per application (:data:`RECIPE_GROUPS`); an old path still works, with a one-line notice."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent.name == "configs":  # configs/<name>.yaml -> configs/<group>/<name>.yaml (cifar_mhe -> cifar/mhe)
        names = [(g, p.name[len(g) + 1:] if p.name.startswith(g + "_") else p.name) for g in RECIPE_GROUPS]
        moved = [p.parent / g / n for g, n in names if (p.parent / g / n).is_file()]
        if len(moved) == 1:
            logger.warning("%s has moved to %s; please use the new path", p, moved[0])
            return moved[0]
    raise ConfigError(f"config file {str(p)!r} does not exist (recipes live in configs/face/, configs/cifar/ and "
                      f"configs/gan/)")


def from_dict(schema: Type[T], data: Dict[str, Any], source: str = "config") -> T:
    """An instance of ``schema`` from nested dicts (unknown keys and wrong types are errors), validated."""
    cfg = schema()
    _merge(cfg, data, prefix="", source=source)
    return _validate(cfg)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), *, schema: Type[T]) -> T:
    """Defaults of ``schema``, then the YAML file at ``path`` (if any), then ``overrides``; validated (the
    schema's ``validate()`` method, when it has one)."""
    import yaml

    from sphereface_plus.utils import read_text

    cfg = schema()
    with naming_recipe(path):
        if path:
            p = recipe_path(path)
            try:
                data = yaml_load(read_text(p, "config file"), str(p)) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
            _merge(cfg, data, prefix="", source=str(p))
        apply_overrides(cfg, overrides)
        return _validate(cfg)


@contextlib.contextmanager
def naming_recipe(path: Optional[str]):
    """A :class:`~sphereface_plus.errors.UsageError` raised inside names the recipe ``path`` (when it does not
    already), so that a bad value is traced to its file: ``checkpoint.every must be positive, got 0 (recipe
    'runs.yaml')``."""
    try:
        yield
    except UsageError as exc:
        if not path or str(path) in str(exc):
            raise
        raise type(exc)(f"{exc} (recipe {str(path)!r} or its overrides)") from None


def resumable_keys(schema: Any, prefix: str = "") -> List[str]:
    """The dotted keys of ``schema`` (a dataclass or an instance) whose fields are marked
    ``metadata={"resumable": True}``: the settings a resumed run may change (where and how fast it runs,
    what it records), never what it computes (:func:`sphereface_plus.engine.checkpoint.check_settings`)."""
    keys: List[str] = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if f.metadata.get("resumable"):
            keys.append(key)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += resumable_keys(default, key + ".")
    return keys


def stored_config_as_read(saved: Dict[str, Any], schema: Any) -> Dict[str, Any]:
    """A stored config (a checkpoint's ``config``) as this release reads it: keys a schema renamed under their
    new names (``RENAMED_KEYS``) and every declared field the stored config lacks (a setting added since it
    was written) at the schema's default. Comparing the result with today's config (the resume check) then
    names only settings that really differ, not settings an earlier release did not have."""
    obj = schema() if isinstance(schema, type) else schema
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
