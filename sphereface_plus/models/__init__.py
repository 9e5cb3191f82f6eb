"""Backbone registry: ``create_backbone(name, **kwargs)``, ``list_backbones()``, ``backbone_from_config(model)``.

Each family lives in its own file and registers its sizes with ``@register_backbone(...)``, declaring
what the builder needs to be checked before anything is built:

- ``input_sizes``: the ``(H, W)`` crops the architecture accepts (its final fully-connected layer's
  input follows from them);
- ``output``: ``"embedding"`` (a face feature, ``B x embedding_dim``) or ``"logits"`` (class scores,
  e.g. the CIFAR CNN); only embedding backbones can be trained with a face head;
- ``options``: the keyword arguments the builder takes (``model.kwargs`` in a face config), by default
  the builder's own parameters;
- ``source``: where the architecture comes from (paper / reference code), shown in ``docs/backbones.md``.

Families: ``sphere.py`` (SphereFace ResNets, Liu et al. CVPR 2017), ``iresnet.py`` (insightface
arcface_torch's iResNet), ``sfnet.py`` (OpenSphere's SFNet, with and without BN), ``mobilefacenet.py``
(MobileFaceNet, Chen et al. 2018, as insightface builds it), ``dlib_resnet.py`` (dlib's face-recognition
ResNet, for its released weights) and ``cifar.py`` (the 9-conv CIFAR CNN of the MHE paper).

Every consumer that rebuilds a network from a run's stored config (trainer, verify, export, compare,
IJB, MegaFace) calls :func:`backbone_from_config`, the one owner of that mapping.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from sphereface_plus.errors import UsageError
from sphereface_plus.registry import Registry

__all__ = [
    "BACKBONES", "BackboneSpec", "BackboneOptionError", "OUTPUTS", "register_backbone", "create_backbone",
    "list_backbones", "backbone_spec", "backbone_from_config", "builder_arguments", "check_model_config", "count_parameters",
]

BACKBONES = Registry("backbone")
OUTPUTS = ("embedding", "logits")  # what a backbone's forward returns
# the config fields of ModelConfig that are builder arguments of their own (never in model.kwargs)
_OWN_FIELDS = ("input_size", "embedding_dim")


class BackboneOptionError(UsageError):
    """A backbone argument that does not fit the architecture: unknown keyword, unsupported input size."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered backbone declares about itself (see the module docstring)."""

    name: str
    builder: Callable[..., nn.Module]
    input_sizes: Tuple[Tuple[int, int], ...]
    output: str
    options: Tuple[str, ...]
    source: str = ""

    @property
    def default_input_size(self) -> Tuple[int, int]:
        """The builder's default ``input_size`` (the first declared size when the builder has none)."""
        param = inspect.signature(self.builder).parameters.get("input_size")
        if param is not None and param.default is not inspect.Parameter.empty:
            return tuple(int(v) for v in param.default)
        return self.input_sizes[0]


_SPECS: Dict[str, BackboneSpec] = {}


def _format_size(size: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in size)


def register_backbone(name: Optional[str] = None, *, input_sizes: Sequence[Sequence[int]], output: str = "embedding",
                      options: Optional[Sequence[str]] = None, source: str = ""):
    """Decorator: register a builder with what it declares (see the module docstring).

    ``options`` defaults to the builder's named parameters; a builder that forwards ``**kwargs``
    must list the names it accepts.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    sizes = tuple((int(h), int(w)) for h, w in input_sizes)
    if not sizes:
        raise ValueError("a backbone must declare at least one input size")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        params = inspect.signature(fn).parameters
        names = options if options is not None else [
            p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        BACKBONES.register(key)(fn)
        _SPECS[key] = BackboneSpec(key, fn, sizes, output, tuple(names), source)
        return fn

    return deco


def backbone_spec(name: str) -> BackboneSpec:
    """The declared :class:`BackboneSpec` of ``name``; an unknown name lists the registered ones."""
    BACKBONES.get(name)  # UnknownNameError (a UsageError and a KeyError) with the choices
    return _SPECS[name]


def list_backbones(output: Optional[str] = None) -> List[str]:
    """Registered names, sorted; ``output='embedding'`` keeps only the face backbones."""
    return [n for n in BACKBONES.names() if output is None or _SPECS[n].output == output]


def _check_options(spec: BackboneSpec, kwargs: Mapping[str, Any], in_config: bool = False) -> None:
    unknown = sorted(k for k in kwargs if k not in spec.options)
    if not unknown:
        return
    if in_config:  # input_size and embedding_dim are config keys of their own, not model.kwargs
        valid = ", ".join(o for o in spec.options if o not in _OWN_FIELDS) or "none"
        raise BackboneOptionError(f"model.kwargs: backbone {spec.name!r} has no option "
                                  f"{', '.join(map(repr, unknown))}; its options are: {valid}")
    raise BackboneOptionError(f"backbone {spec.name!r} has no option {', '.join(map(repr, unknown))}; "
                              f"its options are: {', '.join(spec.options) or 'none'}")


def _check_input_size(spec: BackboneSpec, size: Any, key: str = "input_size") -> None:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise BackboneOptionError(f"{key} must be [H, W], e.g. [112, 112]; got {size!r}") from None
    if (h, w) not in spec.input_sizes:
        valid = ", ".join(_format_size(s) for s in spec.input_sizes)
        raise BackboneOptionError(f"{key}: backbone {spec.name!r} does not take {h}x{w} inputs; it supports "
                                  f"{valid} (HxW): choose a data.template of one of these sizes or another backbone")


def _check_arguments(spec: BackboneSpec, kwargs: Mapping[str, Any]) -> None:
    _check_options(spec, kwargs)
    if "input_size" in kwargs:
        _check_input_size(spec, kwargs["input_size"])


def _short_kwargs(kwargs: Mapping[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) <= 200 else text[:200] + "..."


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name``.

    An unknown name lists the registered ones; an unknown keyword or an input size the architecture
    does not support is a :class:`BackboneOptionError` naming the valid ones, and so is a value the builder
    refuses (a negative width, an infinite block count: a damaged checkpoint's config).
    """
    spec = backbone_spec(name)
    _check_arguments(spec, kwargs)
    if "input_size" in kwargs:
        kwargs["input_size"] = tuple(int(v) for v in kwargs["input_size"])
    try:
        return spec.builder(**kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:  # e.g. embedding_dim=-1, blocks=[inf]
        raise BackboneOptionError(f"backbone {name!r} cannot be built with {_short_kwargs(kwargs)}: "
                                  f"{str(e).splitlines()[0][:200]}") from None


def _as_mapping(model: Any) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        return dataclasses.asdict(model)
    if not isinstance(model, Mapping):
        raise TypeError(f"expected the model config (a mapping or ModelConfig), got {type(model).__name__}")
    return model


def builder_arguments(model: Any) -> Tuple[str, Dict[str, Any]]:
    """``(name, kwargs)`` that :func:`backbone_from_config` passes to :func:`create_backbone`.

    ``model`` is a face config's ``model`` section (``ModelConfig`` or the plain dict stored in
    ``config.yaml`` and every checkpoint): ``backbone``, ``input_size``, ``embedding_dim`` and
    ``kwargs`` (extra builder arguments). Keys a checkpoint of an older toolkit lacks keep the builder's
    defaults.
    """
    model = _as_mapping(model)
    name = model["backbone"]
    spec = backbone_spec(name)
    extra = dict(model.get("kwargs") or {})
    own = [k for k in _OWN_FIELDS if k in extra]
    if own:
        raise BackboneOptionError(f"model.kwargs must not set {', '.join(own)}: use model.{own[0]} (its own "
                                  "config key) instead")
    kwargs = dict(extra)
    if model.get("input_size") is not None:
        kwargs["input_size"] = tuple(int(v) for v in model["input_size"])
    if model.get("embedding_dim") is not None and spec.output == "embedding" and "embedding_dim" in spec.options:
        kwargs["embedding_dim"] = int(model["embedding_dim"])
    return name, kwargs


def backbone_from_config(model: Any) -> nn.Module:
    """The backbone a face config's ``model`` section describes: the one place a run's network is rebuilt.

    ``model``: a ``ModelConfig`` or the plain ``config["model"]`` dict of a checkpoint / config.yaml.
    The trainer builds its network with it, and ``verify``, ``export``, ``compare``, IJB and MegaFace
    rebuild a checkpoint's network with it, so every registered backbone, with its ``kwargs`` and input
    size, loads everywhere.
    """
    name, kwargs = builder_arguments(model)
    return create_backbone(name, **kwargs)


def check_model_config(model: Any, for_training: bool = True) -> None:
    """Config-time checks of a ``model`` section, before anything is built or written.

    The name must be registered; for face training its output must be an embedding (a classifier such
    as ``cifar_cnn9`` is refused with the list of face backbones); ``model.kwargs`` must name options of
    the builder; a given ``input_size`` must be one the architecture supports.
    """
    name = _as_mapping(model)["backbone"]
    if name not in BACKBONES:
        import difflib

        choices = list_backbones("embedding" if for_training else None)
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BackboneOptionError(f"model.backbone={name!r} is not a registered backbone.{hint} Choose one of "
                                  f"{', '.join(choices)}")
    spec = backbone_spec(name)
    if for_training and spec.output != "embedding":
        raise BackboneOptionError(
            f"model.backbone={name!r} returns class {spec.output}, not face embeddings (it is the CIFAR runner's "
            f"network: sphereface-plus cifar); choose a face backbone: {', '.join(list_backbones('embedding'))}")
    _check_options(spec, _as_mapping(model).get("kwargs") or {}, in_config=True)
    name, kwargs = builder_arguments(model)
    if "input_size" in kwargs:
        _check_input_size(spec, kwargs["input_size"], key="model.input_size")
    key = (name, repr(sorted(kwargs.items())))
    if key in _BUILDS_CHECKED:
        return
    import torch

    try:  # the values too: build it on the meta device (nothing allocated or initialised)
        with torch.device("meta"):
            spec.builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise BackboneOptionError(f"model.kwargs={dict(_as_mapping(model).get('kwargs') or {})} does not build "
                                  f"backbone {name!r}: {exc}") from None
    _BUILDS_CHECKED.add(key)  # configs are validated often (every load): each setting is built once


_BUILDS_CHECKED: set = set()


def count_parameters(name: str, **kwargs: Any) -> int:
    """Parameters of backbone ``name`` (frozen ones included), counted on the meta device: nothing is
    allocated or initialised, so the largest networks cost nothing."""
    import torch

    with torch.device("meta"):
        net = create_backbone(name, **kwargs)
    return sum(p.numel() for p in net.parameters())


# importing the family modules registers their builders
from sphereface_plus.models import cifar as _cifar  # noqa: E402,F401
from sphereface_plus.models import dlib_resnet as _dlib_resnet  # noqa: E402,F401
from sphereface_plus.models import iresnet as _iresnet  # noqa: E402,F401
from sphereface_plus.models import mobilefacenet as _mobilefacenet  # noqa: E402,F401
from sphereface_plus.models import sfnet as _sfnet  # noqa: E402,F401
from sphereface_plus.models import sphere as _sphere  # noqa: E402,F401
