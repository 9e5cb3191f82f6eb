"""Importers of released weights: SphereFace / SphereFace+ Caffe models, insightface and OpenSphere PyTorch
state dicts, any PyTorch state dict of a network the toolkit has, ONNX face models and the MHE-GAN
TensorFlow 1 checkpoints (``sphereface-plus import``).

Each face importer returns a checkpoint dict of this toolkit (docs/interfaces.md, "Checkpoints"): ``model``
(the backbone's state dict), ``config`` (``model.backbone``, ``model.input_size``, ``model.embedding_dim``,
``data.template``, ``head``), ``iteration`` 0, optionally ``head`` (the classifier, so that
``train.init_from`` can fine-tune it), plus ``preprocessing`` (:class:`~sphereface_plus.importers.
preprocessing.Preprocessing`: the input convention the weights were trained with, which ``eval`` applies)
and ``imported_from`` (the source files and their sha256). The MHE-GAN importer returns the ``generator``
/ ``discriminator`` state dicts in the layout of the GAN runner's checkpoints.

Modules: :mod:`.caffe` (``.caffemodel`` + ``.prototxt``), :mod:`.torch_state` (insightface ``backbone.pth``
and OpenSphere ``backbone_<iter>.pth`` / ``head_<iter>.pth``), :mod:`.by_structure` (a state dict with
its own key names, matched to a toolkit backbone in order and by shape), :mod:`.foreign_onnx` (foreign ONNX files
to a toolkit ``.onnx``), :mod:`.tf_bundle` and :mod:`.mhe_gan` (TensorFlow checkpoints without
TensorFlow), :mod:`.preprocessing` (the metadata and the input adapter).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from sphereface_plus.importers.preprocessing import PREPROCESSING_KEY, Preprocessing
from sphereface_plus.utils import sha256_file

__all__ = ["SOURCES", "face_checkpoint", "check_state_dict"]

#: the ``--from`` choices of ``sphereface-plus import`` (the one list of them)
SOURCES = ("caffe", "opensphere", "insightface", "pytorch", "onnx", "mhe-gan")


def face_checkpoint(backbone: str, state: Mapping[str, torch.Tensor], pre: Preprocessing,
                    sources: Sequence[Path], source: str, embedding_dim: int,
                    head: Optional[Mapping[str, torch.Tensor]] = None,
                    head_config: Optional[Dict[str, Any]] = None,
                    backbone_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The toolkit checkpoint of an imported face model (see the module docstring); ``backbone_options``:
    the builder's other arguments (``model.kwargs``, which every consumer passes on)."""
    h, w = pre.input_size
    model_cfg: Dict[str, Any] = {"backbone": backbone, "input_size": [h, w], "embedding_dim": int(embedding_dim)}
    if backbone_options:
        model_cfg["kwargs"] = dict(backbone_options)
    ckpt: Dict[str, Any] = {
        "model": {k: v.detach().clone().contiguous() for k, v in state.items()},
        "config": {"model": model_cfg, "data": {"template": pre.template}, "head": dict(head_config or {})},
        "iteration": 0,
        PREPROCESSING_KEY: pre.to_dict(),
        "imported_from": {"format": source, "files": [Path(p).name for p in sources],
                          "sha256": [sha256_file(p) for p in sources]},
    }
    if head is not None:
        ckpt["head"] = {k: v.detach().clone().contiguous() for k, v in head.items()}
    return ckpt


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str, what: str) -> None:
    """Load ``state`` into ``module`` strictly; a missing / unexpected key or a shape mismatch is one
    :class:`~sphereface_plus.errors.CheckpointError` line naming the first offender."""
    from sphereface_plus.errors import CheckpointError

    own = module.state_dict()
    state = dict(state)
    for k, v in own.items():  # a BatchNorm counter other frameworks do not keep (used only with momentum=None)
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} weights of the {what} are missing, e.g. {missing[0]!r} "
                              f"(is it a {what}? check --arch / the file)")
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} entries do not belong to the {what}, e.g. "
                              f"{unexpected[0]!r} (is it a {what}? check --arch / the file)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: {k!r} has shape {tuple(state[k].shape)}, the {what} needs "
                                  f"{tuple(v.shape)} (another architecture or input size?)")
    module.load_state_dict({k: torch.as_tensor(v).to(own[k].dtype) for k, v in state.items()})
