"""insightface and OpenSphere PyTorch checkpoints to the toolkit's ``iresnet*`` / ``sfnet*`` backbones.

insightface (``recognition/arcface_torch``): ``backbone.pth`` is the backbone's plain state dict
(``torch.save(backbone.module.state_dict(), ...)``) with the key names of ``backbones/iresnet.py``
(``conv1``, ``bn1``, ``prelu``, ``layer{1-4}.{j}.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0/1}``, ``bn2``,
``fc``, ``features``), which :mod:`sphereface_plus.models.iresnet` keeps. The depth is read from the
keys (blocks per stage: iResNet-18 2,2,2,2 ... iResNet-200 6,26,60,6), the input size from ``fc``'s
width (512 x 7 x 7: 112x112). Preprocessing: RGB, ``(x - 127.5) / 127.5``, 112x112 (arcface_torch's
``eval_ijbc.py`` / ``verification.py``), mirror summed with the crop (``verification.py``).

OpenSphere (ydwen/opensphere): ``models/backbone_<iter>.pth`` and ``models/head_<iter>.pth`` (plain
state dicts, ``OpenSphere_v0``), or one file holding ``{'backbone': ..., 'head': ...}`` (``main``'s
``model_<step>.pth``, ``SphereFace2_ICLR21``'s checkpoints), or ``main``'s training ``ckpt_<step>.pth``
(the same under ``'model'``, beside the optimiser state). Backbones: ``iresnet`` (the same keys as insightface's) and SFNet (``layer{i}.0.
conv1`` the stage convolution, ``layer{i}.{k}.conv1/conv2`` the residual units, ``bn*`` and ``features``
in the BN variant, ``fc``; the ``SphereFace2_ICLR21`` branch's ``layer{i}.0.conv`` is renamed). SFNet
without BN comes in two variants with identical keys (ReLU after or before the residual sum,
:mod:`sphereface_plus.models.sfnet`): the default is ``sfnet*_deprecated``, the network of OpenSphere's
released SFNet-20 models; ``--arch sfnet20`` picks the other. The head's ``w`` becomes the toolkit head's
``weight`` (``classes x feat_dim``). The branches store it in two orientations: ``main``
(``module/head/*.py``) ``classes x feat_dim``, ``OpenSphere_v0`` and ``SphereFace2_ICLR21``
(``model/head/*.py``) ``feat_dim x classes``; :func:`head_layout` reads which from the shape (the side
equal to the backbone's embedding width) and, for a square ``w``, from the file's layout
(docs/import.md#opensphere-head). Preprocessing: RGB, ``(x - 127.5) / 127.5``, 112x112
(``dataset/utils.py``), crop and mirror features concatenated.

Only ``torch.load(weights_only=True)`` is used: a file that needs arbitrary unpickling is refused.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from sphereface_plus.errors import CheckpointError, InputFileError, MissingFileError

logger = logging.getLogger(__name__)

__all__ = ["import_insightface", "import_opensphere", "detect_iresnet", "detect_sfnet", "load_state_file",
           "HEAD_LAYOUTS", "head_layout", "read_opensphere", "strip_state"]

#: how an OpenSphere head stores its ``w`` (``import --head-layout``): ``classes-by-dim`` in OpenSphere
#: ``main`` (``torch.Tensor(subj_num, feat_dim)``), ``dim-by-classes`` in ``OpenSphere_v0`` and
#: ``SphereFace2_ICLR21`` (``torch.Tensor(feat_dim, num_class)``)
HEAD_LAYOUTS = ("classes-by-dim", "dim-by-classes")

_FEATURE_MAPS = {7 * 7: "112x112", 7 * 6: "112x96"}


def load_state_file(path, what: str) -> Dict[str, Any]:
    """A ``torch.save``d dict of tensors (``weights_only``), ``module.`` prefixes (DDP) dropped."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of every kind
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it must load with "
                              f"torch.load(weights_only=True)") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    return obj


def strip_state(state: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of ``state``, a ``module.`` prefix (DataParallel / DDP) dropped from each key."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _fc_geometry(state: Mapping[str, torch.Tensor], where: str, channels: int = 512) -> Tuple[str, int]:
    if "fc.weight" not in state:
        raise CheckpointError(f"{where}: no 'fc.weight' (the embedding layer): not an iResNet / SFNet state dict")
    w = state["fc.weight"]
    cells, rem = divmod(int(w.shape[1]), channels)
    template = _FEATURE_MAPS.get(cells) if rem == 0 else None
    if template is None:
        raise CheckpointError(f"{where}: fc.weight takes {w.shape[1]} inputs, not 512 x 7 x 7 (112x112) or 512 x 7 x 6 "
                              f"(112x96)")
    return template, int(w.shape[0])


def _blocks(state: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    """Per stage, the number of ``layer{i}.{j}`` entries having ``key`` (``conv1.weight``...)."""
    counts = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"layer{i}\.(\d+)\.{re.escape(key)}$", k)] if m}
        counts.append(len(idx))
    return tuple(counts)


def detect_iresnet(state: Mapping[str, torch.Tensor], where: str) -> str:
    from sphereface_plus.models.iresnet import LAYERS

    layers = _blocks(state, "conv1.weight")
    for name, want in LAYERS.items():
        if tuple(want) == layers:
            return name
    raise CheckpointError(f"{where}: blocks per stage {layers} match no iResNet ("
                          + ", ".join(f"{n} {v}" for n, v in LAYERS.items()) + ")")


def detect_sfnet(state: Mapping[str, torch.Tensor], where: str) -> str:
    from sphereface_plus.models.sfnet import UNITS

    units = tuple(n - 1 for n in _blocks(state, "conv1.weight"))
    bn = "layer1.0.bn1.weight" in state
    for depth, want in UNITS.items():
        if tuple(want) == units:
            return f"sfnet{depth}_bn" if bn else f"sfnet{depth}_deprecated"
    raise CheckpointError(f"{where}: residual units per stage {units} match no SFNet ("
                          + ", ".join(f"sfnet{d} {u}" for d, u in UNITS.items()) + ")")


def _build(arch: str, state: Dict[str, torch.Tensor], where: str, family: str):
    from sphereface_plus.importers import check_state_dict
    from sphereface_plus.models import create_backbone

    template, dim = _fc_geometry(state, where)
    size = tuple(int(v) for v in template.split("x"))
    try:
        net = create_backbone(arch, input_size=size, embedding_dim=dim)
    except (KeyError, ValueError) as e:
        raise InputFileError(f"--arch {arch}: {str(e).splitlines()[0]}") from None
    check_state_dict(net, state, where, f"{arch} backbone")
    return net, template, dim


def _check_arch(arch: Optional[str], found: str, family: str, where: str) -> str:
    if arch is None:
        return found
    if not arch.startswith(family):
        raise InputFileError(f"--arch {arch}: {where} is an {family} state dict (found {found})")
    base = found.split("_")[0]
    if arch.split("_")[0] != base or ("_bn" in found) != ("_bn" in arch):
        raise InputFileError(f"{where} holds a {found} backbone, not --arch {arch}")
    return arch


def import_insightface(path, arch: Optional[str] = None) -> Dict[str, Any]:
    """The toolkit checkpoint of an arcface_torch ``backbone.pth`` (module docstring)."""
    from sphereface_plus.importers import face_checkpoint
    from sphereface_plus.importers.preprocessing import INSIGHTFACE, Preprocessing

    where = str(path)
    state = strip_state(load_state_file(path, "insightface backbone"))
    if "conv1.weight" not in state or "prelu.weight" not in state:
        raise CheckpointError(f"{where}: no 'conv1.weight' / 'prelu.weight': not an arcface_torch iResNet backbone.pth "
                              f"(an MXNet / ONNX model? use --from onnx for .onnx files)")
    name = _check_arch(arch, detect_iresnet(state, where), "iresnet", where)
    net, template, dim = _build(name, state, where, "iresnet")
    pre = Preprocessing(**{**INSIGHTFACE.to_dict(), "template": template})
    return face_checkpoint(name, net.state_dict(), pre, [Path(path)], "insightface", dim)


#: OpenSphere head entries under the toolkit's names: SphereFace2's logit bias ``b`` (docs/theory.md#sphereface2)
_HEAD_NAMES = {"b": "bias"}


def head_layout(shape, dim: int, branch_layout: str, where: str, override: Optional[str] = None) -> str:
    """The orientation (:data:`HEAD_LAYOUTS`) of an OpenSphere head's ``w`` of ``shape``, for a ``dim``-d
    backbone: the side equal to ``dim`` says it; a square ``w`` (as many classes as dimensions) says
    nothing, and then the layout of the file decides (``branch_layout``: what the branch that writes
    files like this one stores). ``override`` (``--head-layout``) replaces both, but must fit the shape."""
    rows, cols = (int(v) for v in shape)
    fits = [layout for layout, side in zip(HEAD_LAYOUTS, (cols, rows)) if side == dim]
    if not fits:
        raise CheckpointError(f"{where}: head 'w' has shape {tuple(shape)}; neither side is the backbone's "
                              f"{dim}-d embedding (is it the head of another backbone?)")
    if override is not None:
        if override not in fits:
            raise InputFileError(f"{where}: --head-layout {override} does not fit head 'w' of shape {tuple(shape)} "
                                 f"for a {dim}-d backbone (it is {fits[0]})")
        return override
    if len(fits) == 1:
        return fits[0]
    logger.info("%s: head 'w' is %d x %d with a %d-d embedding: read as %s, the layout of files like this one "
                "(--head-layout to choose)", where, rows, cols, dim, branch_layout)
    return branch_layout


def _opensphere_head(head_state: Mapping[str, torch.Tensor], dim: int, head_name: str, where: str, layout: str,
                     override: Optional[str]):
    from sphereface_plus.heads import create_head

    if "w" not in head_state:
        raise CheckpointError(f"{where}: no 'w' (the classifier weight): not an OpenSphere head state dict (keys: "
                              f"{', '.join(list(head_state)[:5])})")
    w = head_state["w"]
    if w.ndim != 2:
        raise CheckpointError(f"{where}: head 'w' has shape {tuple(w.shape)}; a classifier weight is 2-d")
    weight = w if head_layout(w.shape, dim, layout, where, override) == "classes-by-dim" else w.t()
    extra = {_HEAD_NAMES.get(k, k): v for k, v in head_state.items() if k != "w"}
    module = create_head(head_name, in_features=dim, num_classes=int(weight.shape[0]))
    own = module.state_dict()
    unknown = sorted(k for k, v in extra.items() if k not in own or tuple(own[k].shape) != tuple(v.shape))
    if unknown:
        hint = " (a SphereFace2 head: --head sphereface2)" if "bias" in unknown and head_name != "sphereface2" else ""
        raise CheckpointError(f"{where}: head entries {unknown} have no place in the toolkit's {head_name!r} head"
                              f"{hint}; pick the --head the checkpoint was trained with")
    new = dict(own)
    new.update(extra)
    new["weight"] = weight.contiguous()
    module.load_state_dict(new)
    return module.state_dict(), {"name": head_name}


def read_opensphere(path, head_path=None):
    """``(backbone state, head state or None, files, head layout of the branch)`` of OpenSphere files
    (module docstring). The branch layout is what the branch that writes files like these stores (used for
    a square ``w`` only, :func:`head_layout`): ``main`` writes one ``{'backbone', 'head'}`` file with
    ``classes x feat_dim``; ``SphereFace2_ICLR21`` the same container (its backbone's stage convolution is
    ``layer{i}.0.conv``) and ``OpenSphere_v0`` two files, both ``feat_dim x classes``. Keys come back in
    the toolkit's names (``layer{i}.0.conv1``)."""
    raw = load_state_file(path, "OpenSphere checkpoint")
    head_state = None
    files = [Path(path)]
    if isinstance(raw.get("model"), Mapping) and isinstance(raw["model"].get("backbone"), Mapping):
        raw = raw["model"]  # main: a training checkpoint ckpt_<step>.pth
    combined = isinstance(raw.get("backbone"), Mapping)
    if combined:  # main: model_<step>.pth; SphereFace2_ICLR21: its checkpoints
        head_state = raw.get("head") if isinstance(raw.get("head"), Mapping) else None
        raw = raw["backbone"]
    if head_path is not None:
        if head_state is not None:
            raise InputFileError(f"{path} already holds the head; give it alone")
        head_state = load_state_file(head_path, "OpenSphere head")
        files.append(Path(head_path))
    state = strip_state(raw)
    iclr21 = any(re.match(r"layer\d\.0\.conv\.", k) for k in state)
    branch_layout = HEAD_LAYOUTS[0] if combined and not iclr21 else HEAD_LAYOUTS[1]
    state = {re.sub(r"^(layer\d\.0)\.conv\.", r"\1.conv1.", k): v for k, v in state.items()}
    return state, None if head_state is None else strip_state(head_state), files, branch_layout


def import_opensphere(path, head_path=None, arch: Optional[str] = None, head_name: str = "a_softmax",
                      head_layout: Optional[str] = None) -> Dict[str, Any]:
    """The toolkit checkpoint of an OpenSphere backbone (+ head) (module docstring); ``head_layout``
    (:data:`HEAD_LAYOUTS`) overrides the orientation of the head's ``w`` read from the file."""
    from sphereface_plus.importers import face_checkpoint
    from sphereface_plus.importers.preprocessing import OPENSPHERE, Preprocessing

    where = str(path)
    state, head_state, files, branch_layout = read_opensphere(path, head_path)
    if "prelu.weight" in state and "conv1.weight" in state:
        found, family = detect_iresnet(state, where), "iresnet"
    elif "layer1.0.conv1.weight" in state:
        found, family = detect_sfnet(state, where), "sfnet"
    else:
        raise CheckpointError(f"{where}: neither an iResNet nor an SFNet state dict (no 'conv1.weight' + 'prelu.weight', "
                              f"no 'layer1.0.conv1.weight')")
    name = found if arch is None else arch
    if arch is not None and (not arch.startswith(family) or arch.split("_")[0] != found.split("_")[0]
                             or ("_bn" in arch) != ("_bn" in found)):
        raise InputFileError(f"{where} holds a {found} backbone (or its other no-BN variant), not --arch {arch}")
    net, template, dim = _build(name, state, where, family)
    head = head_config = None
    if head_state is not None:
        head, head_config = _opensphere_head(head_state, dim, head_name, str(head_path or path), branch_layout,
                                             head_layout)
    pre = Preprocessing(**{**OPENSPHERE.to_dict(), "template": template})
    return face_checkpoint(name, net.state_dict(), pre, files, "opensphere", dim, head=head, head_config=head_config)
