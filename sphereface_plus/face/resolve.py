"""A face recipe resolved once, before anything is built: :func:`resolve` ``(config, data) -> Resolved``.

Pure: it reads the validated :class:`~sphereface_plus.face.config.FaceConfig` and what the data say (the
crops' size: the template's, known before a file is read), checks that they agree, and returns the values
in force in a new object; the config it was given is left as it was. Everything downstream (the layout that builds the
head, the model, the trainer, config.yaml and every checkpoint) reads the :class:`Resolved`, never the
raw config, so a setting travels one way: recipe -> config -> resolve -> the module that uses it.

The values in force:

- ``input_size``: the data's crop size (``model.input_size``, when given, must equal it);
- the head: its name, layout (``replicated`` | ``sharded``, Partial FC ``sample_rate``) and every one of its
  settings, the given ones cast to the constructor's declared types and the others at the constructor's
  defaults (``sphereface_plus.heads.head_parameters``): a run's config.yaml shows the margin it trained with
  even when the recipe left it to the head;
- the MHE kernel's canonical name (``mhe.power: 2`` -> ``"2"``) and ``train.compile`` as ``auto|true|false``;
- with ``train.init_from``, the network its checkpoint holds (``model.backbone``, ``embedding_dim``, ``kwargs``,
  ``data.template``) and, for an imported model, its input convention (``preprocessing``):
  :mod:`sphereface_plus.face.init_source`.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from sphereface_plus.config import ConfigError
from sphereface_plus.face.config import FaceConfig
from sphereface_plus.face.init_source import InitSource
from sphereface_plus.face.layout import HeadSpec, Replicated, create_layout

__all__ = ["DataFacts", "Resolved", "resolve", "head_settings_in_force"]


@dataclass(frozen=True)
class DataFacts:
    """What the data say before they are read: the crops' ``(H, W)`` (``data.template``'s size). The
    training set itself has ``input_size`` too and may be passed instead."""

    input_size: Tuple[int, int]


@dataclass(frozen=True)
class Resolved:
    """A face run's settings in force (see the module docstring). ``config`` is the resolved copy that
    config.yaml and every checkpoint record."""

    config: FaceConfig
    input_size: Tuple[int, int]
    head: HeadSpec
    layout: Replicated  # how the head is laid out over the processes: what builds it (face.layout)
    # what train.init_from's checkpoint says, and its weights (face/init_source.py); None without one
    init: Optional[InitSource] = None

    @property
    def preprocessing(self) -> Optional[Dict[str, Any]]:
        """The input convention of an imported model the run starts from, None for the toolkit's own."""
        return None if self.init is None else self.init.preprocessing


def head_settings_in_force(name: str, given: Dict[str, Any]) -> Dict[str, Any]:
    """Every setting of head ``name``: the given ones (as given: the config's validation checked their types), for
    the others the constructor's default where it is a plain value, and those the head derives from others
    (a ``None`` default: ``ClassifierHead.settings_in_force``)."""
    from sphereface_plus.heads import HEADS, head_parameters

    out: Dict[str, Any] = {}
    for key, p in head_parameters(name).items():
        if key in given:  # as given (an int stands for a float as it is; the type was checked by validate)
            out[key] = given[key]
        elif p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, float, str)):
            out[key] = p.default
    return HEADS.get(name).settings_in_force(out)


def resolve(config: FaceConfig, data: Any, init: Optional[InitSource] = None) -> Resolved:
    """The run's values in force. ``data``: :class:`DataFacts` or the training set (anything with
    ``input_size`` ``(H, W)``); ``init``: what ``train.init_from``'s checkpoint says, with ``config`` already
    holding its network (both from :func:`~sphereface_plus.face.init_source.start_from`), or None. Raises
    :class:`~sphereface_plus.config.ConfigError` when the config and the data disagree."""
    from sphereface_plus.engine.compile import normalize_compile
    from sphereface_plus.mhe import normalize_power

    input_size = (int(data.input_size[0]), int(data.input_size[1]))
    given = config.model.input_size
    if given is not None and tuple(int(v) for v in given) != input_size:
        raise ConfigError(f"model.input_size={list(given)} does not match data.template={config.data.template!r} "
                          f"(its crops are {list(input_size)}); leave model.input_size unset, it follows from the "
                          "template")
    head = config.head
    settings = head_settings_in_force(head.name, {k: v for k, v in head.settings.items() if v is not None})
    resolved = copy.deepcopy(config)
    resolved.model.input_size = list(input_size)
    resolved.head.settings = dict(settings)
    resolved.mhe.power = normalize_power(config.mhe.power)
    resolved.train.compile = normalize_compile(config.train.compile)
    spec = HeadSpec(head.name, head.parallel, float(head.sample_rate), dict(settings))
    return Resolved(config=resolved, input_size=input_size, head=spec, layout=create_layout(spec),
                    init=init)
