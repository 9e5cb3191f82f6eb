"""Any PyTorch state dict of a face network the toolkit has, matched to its backbone by structure
(``sphereface-plus import --from pytorch SRC --backbone NAME``; docs/import.md#from-pytorch).

Ports of the standard face networks (SphereFace-20, MobileFaceNet, iResNet, SFNet...) each name their
modules their own way (``conv1_2``/``relu1_2``, ``conv1.conv``/``dw_conv1.bn``, ``body.3.res_layer``...),
so their keys say nothing the toolkit can use. What they share with the toolkit's network is the
computation and, because PyTorch registers parameters as the modules are built, the ORDER of the
tensors: a state dict lists each module's parameters, then its buffers, then its children, in the
order they were assigned. So the source's tensors are read in state-dict order and matched module by
module (a convolution, a BatchNorm, a PReLU...) to the toolkit network's, by shape:

- BatchNorm ``num_batches_tracked`` counters are skipped on both sides (they count training steps and
  change no output; the toolkit's keep their value), running means and variances are matched like
  parameters (they follow ``weight`` and ``bias`` in every BatchNorm's state);
- a linear layer's ``O x I`` weight and a 1x1 convolution's ``O x I x 1 x 1`` are the same map and are
  reshaped into each other (a 1x1 convolution on the 1x1 map after a global depthwise convolution, as
  in MobileFaceNet ports, is the toolkit's ``nn.Linear``);
- a PReLU with one shared slope (``nn.PReLU()``) becomes the per-channel slopes of the toolkit's
  PReLU, all equal (the same function);
- the last name component of a key (``weight``, ``bias``, ``running_mean``, ``running_var``) is
  PyTorch's, not the author's: where both sides have one of these, they must agree, so a convolution
  bias the toolkit's network lacks is named as such instead of being matched to the next vector of the
  same length;
- the parts of one block may be registered in another order than they run (a block that creates its
  PReLU before its convolution): when the next source module does not fit, it and its siblings (the
  source modules with the same parent, up to 8) are paired with the network's next modules if each of
  those fits exactly one of them; parts alike in kind and shape (two 3x3 convolutions of one width, a
  block's BatchNorms) can never be told apart, so they must come in the order they run.

The first source tensor that does not fit ends the import with one line naming it (its key and shape)
and the toolkit parameter expected there (its key and shape). Tensors left over once the network is
filled (a classifier saved with the backbone, e.g. ``fc6.weight`` of a SphereFace port) are ignored
and listed.

Matching by order is exact only if the port registers its modules in the order it runs them (but for
the sibling rule above), which is the rule in the ports listed in docs/import.md; a port that creates a
module ahead of modules of other blocks fails with the misfit line. What no state dict can show is
computation without weights (ReLU or PReLU, where a residual sum sits, strides, paddings, how the map
is flattened): that is the ``--backbone`` and its options, checked against each port's code
(docs/import.md#from-pytorch). The crop size and the embedding width follow from the tensors: the
builder's defaults (or ``--template`` / ``embedding_dim=``) first, then, unless those were given, every
declared input size and the usual widths, as dry runs on the meta device (nothing is allocated).
"""
from __future__ import annotations

import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from sphereface_plus.errors import CheckpointError, UsageError
from sphereface_plus.importers.torch_state import strip_state

logger = logging.getLogger(__name__)

__all__ = ["WRAPPER_KEYS", "find_state_dict", "match_state_dict", "StructureMatch", "import_pytorch"]

#: the keys under which checkpoints keep a network's state dict, tried in this order at each level
WRAPPER_KEYS = ("state_dict", "net_state_dict", "model_state_dict", "model", "backbone", "net", "network")
#: PyTorch's own attribute names: where both sides end in one of these, they must agree
_ROLES = ("weight", "bias", "running_mean", "running_var")
#: embedding widths tried when the builder's default does not fit (the released face models use these)
_WIDTHS = (512, 128, 256, 1024)
_MAX_DEPTH = 4
#: the most sibling modules paired regardless of their order (a block's convolution, BN and activation)
_MAX_SIBLINGS = 8


def _is_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(obj: Any, where: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The state dict inside a loaded checkpoint: ``obj`` itself, or the first of :data:`WRAPPER_KEYS`
    holding one, level by level (``{'net_state_dict': ...}``, ``{'model': {'backbone': ...}}``).
    Returns it (``module.`` prefixes dropped) and the keys followed."""
    path: List[str] = []
    for _ in range(_MAX_DEPTH):
        if _is_state(obj):
            return strip_state(obj), path
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        path.append(key)
        obj = obj[key]
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        inside = "".join(f"[{k!r}]" for k in path)
        raise CheckpointError(f"{where}{inside} holds no state dict (a dict of tensors); its keys are {keys} and none "
                              f"of {', '.join(WRAPPER_KEYS)} leads to one")
    raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict (name -> tensor)")


def load_source(path) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Read ``path`` with ``weights_only`` and find its state dict (a TorchScript archive is refused
    with the way out: its own state dict, saved from a trusted session)."""
    from sphereface_plus.utils import safe_torch_load

    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any("/code/__torch__" in n for n in zf.namelist()):
                raise CheckpointError(
                    f"{path} is a TorchScript archive (torch.jit.save), which runs code when loaded; import its "
                    f"state dict instead: in a Python session you trust, torch.save(torch.jit.load(path)"
                    f".state_dict(), 'state.pth')")
    return find_state_dict(safe_torch_load(path), str(path))


@dataclass
class _Part:
    """One module's tensors in state-dict order (a convolution, a BatchNorm, a PReLU...): ``scope`` is
    its parent module's name, ``shapes`` and ``keys`` its tensors', ``prelu`` whether it is one (toolkit
    side: a one-slope source PReLU may fill it)."""

    name: str
    scope: str
    keys: List[str]
    shapes: List[Tuple[int, ...]]
    prelu: bool = False


def _parts(keys_shapes: Sequence[Tuple[str, Tuple[int, ...]]], prelus=frozenset()) -> List[_Part]:
    parts: List[_Part] = []
    for key, shape in keys_shapes:
        if key.endswith("num_batches_tracked"):
            continue
        name = key.rsplit(".", 1)[0] if "." in key else ""
        if not parts or parts[-1].name != name:
            parts.append(_Part(name, name.rsplit(".", 1)[0] if "." in name else "", [], [], name in prelus))
        parts[-1].keys.append(key)
        parts[-1].shapes.append(tuple(int(s) for s in shape))
    return parts


def _role(key: str) -> Optional[str]:
    last = key.rsplit(".", 1)[-1]
    return last if last in _ROLES else None


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _fits(shape: Tuple[int, ...], key: str, want: Tuple[int, ...], want_key: str, prelu: bool) -> bool:
    """Whether a source tensor of ``shape`` can be the toolkit tensor ``want_key`` (module docstring)."""
    got_role, want_role = _role(key), _role(want_key)
    if got_role and want_role and got_role != want_role:
        return False
    if shape == want:
        return True
    if prelu and len(want) == 1 and math.prod(shape) == 1:  # one shared PReLU slope
        return True
    conv, linear = (shape, want) if len(shape) == 4 else (want, shape)
    return len(conv) == 4 and len(linear) == 2 and conv[2:] == (1, 1) and conv[:2] == linear  # 1x1 conv <-> linear


def _part_misfit(src: _Part, own: _Part) -> Optional[int]:
    """The index of the first tensor of ``src`` that cannot be ``own``'s, or None when the part fits."""
    for k, (key, shape) in enumerate(zip(src.keys, src.shapes)):
        if k >= len(own.keys) or not _fits(shape, key, own.shapes[k], own.keys[k], own.prelu):
            return k
    return None if len(src.keys) == len(own.keys) else len(src.keys)


def _as_own(t: torch.Tensor, want: Tuple[int, ...]) -> torch.Tensor:
    return t if tuple(t.shape) == want else (t.reshape(1).expand(want) if t.numel() == 1 else t.reshape(want))


@dataclass
class StructureMatch:
    """The outcome of matching a source state dict to one network: ``state`` (the network's state dict,
    BN counters aside) when it fits, else ``misfit`` (one line) and ``matched`` (tensors placed before it)."""

    state: Optional[Dict[str, torch.Tensor]]
    matched: int
    total: int
    misfit: str = ""
    ignored: Tuple[str, ...] = ()
    converted: int = 0


def _scope_run(parts: List[_Part], j: int) -> int:
    """How many parts from ``j`` on share ``parts[j]``'s parent module."""
    n = 1
    while j + n < len(parts) and parts[j + n].scope == parts[j].scope:
        n += 1
    return n


def _unique_pairing(src: List[_Part], own: List[_Part]) -> Optional[List[int]]:
    """``own[k]`` <- ``src[pairing[k]]`` when every part of ``own`` fits exactly one part of ``src`` and no two
    share one (then the order they were registered in does not matter), else None."""
    pairing = []
    for o in own:
        fits = [k for k, s in enumerate(src) if _part_misfit(s, o) is None]
        if len(fits) != 1 or fits[0] in pairing:
            return None
        pairing.append(fits[0])
    return pairing


def match_state_dict(net: nn.Module, source: Mapping[str, torch.Tensor], what: str) -> StructureMatch:
    """Match ``source`` to ``net`` in order and by shape (module docstring), module by module: each of the
    network's modules takes the source's next one; where they differ, the source module's remaining
    siblings may stand in another order if each of the network's next modules fits exactly one of them.
    ``net`` may live on the meta device (a dry run: shapes only)."""
    prelus = frozenset(name for name, m in net.named_modules() if isinstance(m, nn.PReLU))
    own = _parts([(k, tuple(v.shape)) for k, v in net.state_dict().items()], prelus)
    src = _parts([(k, tuple(v.shape)) for k, v in source.items()])
    total = sum(len(o.keys) for o in own)
    state: Dict[str, torch.Tensor] = {}
    converted = placed = i = j = 0

    def take(s: _Part, o: _Part) -> None:
        nonlocal converted, placed
        for key, want_key, want in zip(s.keys, o.keys, o.shapes):
            t = source[key]
            state[want_key] = _as_own(t, want)
            converted += tuple(t.shape) != want
        placed += len(o.keys)

    while i < len(own):
        if j >= len(src):
            o = own[i]
            return StructureMatch(None, placed, total, f"the source ends ({placed} of {total} tensors placed): nothing "
                                  f"is left for {what}'s {o.keys[0]!r} {_shape(o.shapes[0])}")
        if _part_misfit(src[j], own[i]) is None:
            take(src[j], own[i])
            i, j = i + 1, j + 1
            continue
        n = _scope_run(src, j)
        pairing = _unique_pairing(src[j:j + n], own[i:i + n]) if 1 < n <= _MAX_SIBLINGS and i + n <= len(own) else None
        if pairing is None:
            s, o = src[j], own[i]
            k = _part_misfit(s, o)
            if k < len(s.keys):
                key, shape = s.keys[k], s.shapes[k]
                want = (f": {o.keys[k]!r} {_shape(o.shapes[k])} is expected there" if k < len(o.keys) else
                        f", whose {o.name!r} holds no more tensors")
                return StructureMatch(None, placed, total, f"source tensor {key!r} {_shape(shape)} does not fit "
                                      f"{what}{want}")
            return StructureMatch(None, placed, total, f"source module {s.name!r} ends after {len(s.keys)} tensors "
                                  f"where {what} expects {o.keys[k]!r} {_shape(o.shapes[k])}")
        for o, k in zip(own[i:i + n], pairing):
            take(src[j + k], o)
        i, j = i + n, j + n
    ignored = tuple(f"{key} {_shape(shape)}" for s in src[j:] for key, shape in zip(s.keys, s.shapes))
    return StructureMatch(state, placed, total, ignored=ignored, converted=converted)


def _geometries(spec, template: Optional[str],
                embedding_dim: Optional[int]) -> List[Tuple[Tuple[int, int], Optional[int]]]:
    """(input size, embedding width) pairs to try, the builder's defaults first."""
    import inspect

    from sphereface_plus.templates import TEMPLATE_SIZES

    if template is not None:
        sizes = [TEMPLATE_SIZES[template]]
    else:
        sizes = [spec.default_input_size] + [s for s in spec.input_sizes if s != spec.default_input_size]
    if "embedding_dim" not in spec.options:
        return [(s, None) for s in sizes]
    if embedding_dim is not None:
        dims = [int(embedding_dim)]
    else:
        param = inspect.signature(spec.builder).parameters.get("embedding_dim")
        default = int(param.default) if param is not None and param.default is not inspect.Parameter.empty else 512
        dims = [default] + [d for d in _WIDTHS if d != default]
    return [(s, d) for d in dims for s in sizes]


class _ShapesOnly(TorchFunctionMode):
    """Skips in-place initialisers (``normal_``, ``fill_``...) on meta tensors: a dry-run build needs the
    shapes only, and each of those calls costs tens of milliseconds on the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _build(name: str, size, dim: Optional[int], options: Mapping[str, Any], dry_run: bool = False) -> nn.Module:
    """The toolkit's ``name`` at this geometry (``dry_run``: on the meta device, shapes only)."""
    from sphereface_plus.models import create_backbone

    kwargs = dict(options, input_size=size)
    if dim is not None:
        kwargs["embedding_dim"] = dim
    try:
        if not dry_run:
            return create_backbone(name, **kwargs)
        with torch.device("meta"), _ShapesOnly():
            return create_backbone(name, **kwargs)
    except (TypeError, ValueError) as e:  # BackboneOptionError (a UsageError) passes through as it is
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--backbone {name} with --backbone-option {dict(options)}: {e}") from None


def _describe(name: str, size, dim: Optional[int], options: Mapping[str, Any]) -> str:
    opts = "".join(f", {k}={v}" for k, v in options.items())
    return f"{name} ({size[0]}x{size[1]}{'' if dim is None else f', {dim}-d'}{opts})"


def import_pytorch(path, backbone: str, options: Optional[Mapping[str, Any]] = None,
                   template: Optional[str] = None) -> Dict[str, Any]:
    """The toolkit checkpoint of the state dict in ``path`` as the toolkit's ``backbone`` built with
    ``options`` (its builder's keyword arguments; ``embedding_dim`` fixes the width, ``template`` the
    crop size). Its input convention is the toolkit's own (BGR, ``(x - 127.5) / 128``, crop and mirror
    concatenated) until the caller replaces it (``import --color/--mean/--std/--flip``): a port's
    convention is a fact of its evaluation code, not of its weights (docs/import.md#from-pytorch)."""
    from sphereface_plus.importers import face_checkpoint
    from sphereface_plus.importers.preprocessing import Preprocessing
    from sphereface_plus.templates import TEMPLATE_SIZES
    from sphereface_plus.models import backbone_spec

    spec = backbone_spec(backbone)  # an unknown name lists the registered ones
    if spec.output != "embedding":
        raise UsageError(f"--backbone {backbone} returns class {spec.output}, not face embeddings; choose a face "
                         f"backbone")
    options = dict(options or {})
    if "input_size" in options:
        raise UsageError("--backbone-option input_size: give the crop size with --template 112x96|112x112")
    dim = options.pop("embedding_dim", None)
    source, inside = load_source(path)
    where = str(path) + "".join(f"[{k!r}]" for k in inside)
    geometries = _geometries(spec, template, dim)
    (size, width), tries = geometries[0], []
    what = _describe(backbone, size, width, options)
    net = _build(backbone, size, width, options)  # the usual case: the defaults (or the options given) fit
    found = match_state_dict(net, source, what)
    if found.state is None:  # other crop sizes and widths, tried as dry runs
        tries.append(found)
        for size, width in geometries[1:]:
            what = _describe(backbone, size, width, options)
            dry = match_state_dict(_build(backbone, size, width, options, dry_run=True), source, what)
            if dry.state is not None:
                net = _build(backbone, size, width, options)
                found = match_state_dict(net, source, what)
                break
            tries.append(dry)
        else:  # nothing fits: the attempt that got furthest says where
            best = max(tries, key=lambda m: m.matched)
            hint = f"; {backbone}'s options: {', '.join(o for o in spec.options if o != 'input_size') or 'none'}"
            raise CheckpointError(f"{where}: {best.misfit} ({best.matched} of {best.total} tensors matched; another "
                                  f"--backbone or --backbone-option?{hint})")
    own = net.state_dict()
    own.update({k: v.detach().to(own[k].dtype).clone() for k, v in found.state.items()})
    net.load_state_dict(own)
    if found.ignored:
        logger.warning("%s: %d tensors after the network were ignored (a classifier?): %s", where, len(found.ignored),
                       ", ".join(found.ignored[:4]) + (", ..." if len(found.ignored) > 4 else ""))
    tmpl = next(t for t, s in TEMPLATE_SIZES.items() if s == tuple(size))
    pre = Preprocessing(template=tmpl, embedding="output", source="pytorch")
    out_dim = int(width) if width is not None else int(net(torch.zeros(1, 3, *size)).shape[1])
    ckpt = face_checkpoint(backbone, net.state_dict(), pre, [Path(path)], "pytorch", out_dim,
                           backbone_options=options)
    ckpt["imported_from"].update({"state_dict_at": inside, "ignored": list(found.ignored),
                                  "reshaped_or_expanded": found.converted})
    return ckpt
