"""``train.init_from``: the checkpoint a run starts from, and what it decides about the run.

A run can start from another run's checkpoint (SphereFace -> SphereFace+, the released recipe) or from a
released model brought in by ``sphereface-plus import`` (fine-tuning on your own identities,
docs/train.md#fine-tuning-a-released-model). Either way the weights decide the network, so the recipe's
``model`` section and ``data.template`` follow the checkpoint:

- ``model.backbone``, ``model.embedding_dim``, ``model.kwargs`` and ``data.template`` are the checkpoint's.
  A recipe that leaves them at their defaults gets the checkpoint's values; one that sets another value is
  refused with one line naming both (the weights could not be loaded into another network).
- An imported model carries its input convention (``preprocessing``: channel order, mean, std,
  :mod:`sphereface_plus.importers.preprocessing`). The run trains the backbone behind the same
  :class:`~sphereface_plus.importers.preprocessing.SourceInput` adapter that evaluation puts in front of it,
  so the crops the data pipeline makes (the toolkit's BGR ``(x - 127.5) / 128``) reach the network exactly
  as the source's own pipeline would hand them; the run's checkpoints keep the entry, so ``verify`` /
  ``export`` apply it again.
- The head is the checkpoint's only where it is the same head over the same classes; otherwise the run
  starts a new one (logged): a released model's identities are not yours.

:func:`read_init_source` reads the checkpoint (I/O, once, before the run folder is touched);
:func:`adopt_init_source` is pure; :func:`start_from` does both for a recipe, before
:func:`sphereface_plus.face.resolve.resolve` records what the checkpoint says.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from sphereface_plus.config import ConfigError
from sphereface_plus.face.config import DataConfig, FaceConfig, ModelConfig

__all__ = ["InitSource", "read_init_source", "init_source_of", "adopt_init_source", "start_from"]


@dataclass(frozen=True)
class InitSource:
    """What a ``train.init_from`` checkpoint says about the run. ``preprocessing``: the imported model's input
    convention as a dict, None for the toolkit's own; ``weights``: its ``model`` (backbone) and ``head`` state
    dicts and ``iteration``, read with the rest (the trainer loads them: the file is read once)."""

    path: str
    backbone: str
    embedding_dim: int
    kwargs: Dict[str, Any] = field(default_factory=dict)
    template: str = "112x96"
    preprocessing: Optional[Dict[str, Any]] = None
    head_name: Optional[str] = None
    weights: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def read_init_source(path: str) -> InitSource:
    """The metadata of checkpoint ``path`` (checked by its checksum; a missing file or one without a model
    config is one :class:`~sphereface_plus.errors.ToolkitError` line)."""
    from sphereface_plus.engine.checkpoint import load_checkpoint
    from sphereface_plus.errors import CheckpointError
    from sphereface_plus.importers.preprocessing import PREPROCESSING_KEY, Preprocessing

    state = load_checkpoint(path)
    try:
        model = state["config"]["model"]
        backbone, dim = str(model["backbone"]), int(model.get("embedding_dim", ModelConfig.embedding_dim))
        kwargs = dict(model.get("kwargs") or {})
        template = str((state["config"].get("data") or {}).get("template", DataConfig.template))
        head = state["config"].get("head") or {}
        head_name = head.get("name") if isinstance(head, dict) else None
        weights = {"model": state["model"], "head": state.get("head"), "iteration": state.get("iteration")}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"train.init_from {path}: not a checkpoint of this toolkit (no model config or weights: "
                              f"{e}); give a run's checkpoints/last.pt or a model written by `sphereface-plus import`"
                              ) from None
    pre = None
    if PREPROCESSING_KEY in state:
        pre = Preprocessing.from_dict(state[PREPROCESSING_KEY], f"train.init_from {path}")
        if pre.template != template:
            raise CheckpointError(f"train.init_from {path}: preprocessing template {pre.template} does not match its "
                                  f"data.template {template}; import the model again")
        pre = None if pre.is_toolkit_input() else pre.to_dict()
    return InitSource(path=str(path), backbone=backbone, embedding_dim=dim, kwargs=kwargs, template=template,
                      preprocessing=pre, head_name=head_name, weights=weights)


def init_source_of(config: FaceConfig) -> Optional[InitSource]:
    """:func:`read_init_source` of the recipe's ``train.init_from``, or None when it names none. A missing file
    is one :class:`~sphereface_plus.errors.MissingFileError` line."""
    from pathlib import Path

    from sphereface_plus.errors import MissingFileError

    path = config.train.init_from
    if not path:
        return None
    if not Path(path).is_file():
        raise MissingFileError(f"train.init_from {path}: no such file; give an existing checkpoint (<out_dir>/"
                               "checkpoints/last.pt of a run, or a model written by `sphereface-plus import`)")
    return read_init_source(path)


def adopt_init_source(config: FaceConfig, init: Optional[InitSource]) -> FaceConfig:
    """``config`` with the network settings of ``init`` (module docstring); a new object, ``config`` is left as
    it was. Raises :class:`~sphereface_plus.config.ConfigError` where the recipe names another network."""
    if init is None:
        return config
    defaults_model, defaults_data = ModelConfig(), DataConfig()
    wanted = {
        ("model", "backbone"): init.backbone,
        ("model", "embedding_dim"): init.embedding_dim,
        ("model", "kwargs"): dict(init.kwargs),
        ("data", "template"): init.template,
    }
    out = copy.deepcopy(config)
    for (section, key), value in wanted.items():
        given = getattr(getattr(config, section), key)
        default = getattr(defaults_model if section == "model" else defaults_data, key)
        if given != value and given != default:
            raise ConfigError(f"{section}.{key}={given!r} but train.init_from {init.path} holds a network with "
                              f"{section}.{key}={value!r}; leave {section}.{key} out (it follows train.init_from)")
        setattr(getattr(out, section), key, copy.deepcopy(value))
    return out


def start_from(config: FaceConfig) -> Tuple[FaceConfig, Optional[InitSource]]:
    """``(config with train.init_from's network, what the checkpoint says)``; ``(config, None)`` without one."""
    init = init_source_of(config)
    return adopt_init_source(config, init), init
