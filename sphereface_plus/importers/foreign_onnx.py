"""A foreign face-embedding ONNX model (insightface's model zoo ``w600k_r50.onnx``, ``glintr100.onnx``...)
rewritten as a toolkit ``.onnx`` model.

Why an ``.onnx`` and not a ``.pt``: the toolkit already reads ``.onnx`` files everywhere a checkpoint is
read (``eval.onnx_model.OnnxModel``: verify, compare, IJB, ``FaceEmbedder``), and converting an arbitrary ONNX
graph back to PyTorch modules would need an operator-by-operator translator for a model that runs as
it is under onnxruntime. So the graph is kept and given the interface of a ``sphereface-plus export``
file:

* a prelude takes the toolkit's input (``input``: ``B x 3 x H x W``, BGR, ``(x - 127.5) / 128``) and
  computes the model's own: pixels ``x * 128 + 127.5`` (exact), channels reversed for an RGB model,
  ``(pixels - mean) / std``, fed to the original input;
* the original first output becomes ``feature``, and ``embedding`` is its L2 normalisation;
* the metadata (written by the caller, ``sphereface-plus import``) holds the template, the source's
  convention and its flip policy, which the embedding code applies.

The input convention: the size from the graph's input shape (``--template`` when it is symbolic); colour
and normalisation as insightface's model zoo reads them from the graph (``model_zoo/arcface_onnx.py``):
models whose first nodes include a ``Sub`` and a ``Mul`` normalise inside the graph (mean 0, std 1),
the others take ``(x - 127.5) / 127.5``; both take RGB (``swapRB=True``) and are scored with the
mirror summed. Each is overridable on the command line (``--color/--mean/--std/--flip``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from sphereface_plus.errors import CheckpointError, InputFileError, MissingFileError, UsageError
from sphereface_plus.export_format import EMBEDDING_OUTPUT, FEATURE_OUTPUT, INPUT_NAME
from sphereface_plus.importers.preprocessing import INSIGHTFACE, TOOLKIT_MEAN, TOOLKIT_STD, Preprocessing
from sphereface_plus.templates import TEMPLATE_SIZES

logger = logging.getLogger(__name__)

__all__ = ["read_onnx", "guess_preprocessing", "convert_onnx", "INPUT_NAME", "FEATURE_OUTPUT", "EMBEDDING_OUTPUT"]

# crop size -> template name
_SIZES = {size: name for name, size in TEMPLATE_SIZES.items()}


def read_onnx(path):
    """The ``ModelProto`` of ``path`` (with its weights), checked to be a one-input image model."""
    try:
        import onnx
    except ImportError:
        raise UsageError("--from onnx needs the onnx package: pip install onnx onnxruntime") from None
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise CheckpointError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputFileError(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a face-embedding "
                             f"model takes one image batch")
    if not len(model.graph.output):
        raise InputFileError(f"{path} has no output")
    return model


def _input_hw(model) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    inits = {i.name for i in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in inits]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return None, None, None
    return dims[1], dims[2], dims[3]


def guess_preprocessing(model, template: Optional[str] = None) -> Preprocessing:
    """The convention of an insightface-style model (module docstring); ``template`` for a symbolic size."""
    c, h, w = _input_hw(model)
    if c not in (None, 3):
        raise InputFileError(f"the model's input has {c} channels; a face model takes 3 (B x 3 x H x W)")
    if h is not None and w is not None:
        found = _SIZES.get((h, w))
        if found is None:
            raise InputFileError(f"the model takes {h}x{w} crops; the toolkit aligns 112x112 or 112x96 crops")
        if template is not None and template != found:
            raise UsageError(f"--template {template}: the model's input is {found}")
        template = found
    if template is None:
        raise UsageError("the model's input size is symbolic: give --template 112x112 or 112x96")
    first = [n.op_type for n in model.graph.node[:8]]
    in_graph = "Sub" in first and "Mul" in first
    mean, std = ([0.0] * 3, [1.0] * 3) if in_graph else (INSIGHTFACE.mean, INSIGHTFACE.std)
    return Preprocessing(template=template, color="rgb", mean=mean, std=std, flip="sum", embedding="output 0",
                         source="onnx")


def convert_onnx(model, pre: Preprocessing, metadata: Dict[str, str]) -> bytes:
    """The toolkit ``.onnx`` (bytes): prelude + the original graph + ``feature``/``embedding`` outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name for i in graph.initializer}
    (orig_in,) = [i for i in graph.input if i.name not in inits]
    orig_out = graph.output[0].name
    taken = {n for node in graph.node for n in list(node.input) + list(node.output)} | inits | {orig_in.name}
    if INPUT_NAME in taken or FEATURE_OUTPUT in taken or EMBEDDING_OUTPUT in taken:
        raise InputFileError(f"the model already uses one of the names {INPUT_NAME}, {FEATURE_OUTPUT}, "
                             f"{EMBEDDING_OUTPUT}: is it already a toolkit export?")
    p = "sphereface_plus_prelude_"
    consts = {
        f"{p}scale": np.array(TOOLKIT_STD, np.float32), f"{p}shift": np.array(TOOLKIT_MEAN, np.float32),
        f"{p}mean": np.array(pre.mean, np.float32).reshape(1, 3, 1, 1),
        f"{p}std": np.array(pre.std, np.float32).reshape(1, 3, 1, 1),
        f"{p}bgr2rgb": np.array([2, 1, 0], np.int64),
    }
    nodes = [helper.make_node("Mul", [INPUT_NAME, f"{p}scale"], [f"{p}scaled"]),
             helper.make_node("Add", [f"{p}scaled", f"{p}shift"], [f"{p}pixels"])]
    pixels = f"{p}pixels"
    if pre.color == "rgb":
        nodes.append(helper.make_node("Gather", [pixels, f"{p}bgr2rgb"], [f"{p}rgb"], axis=1))
        pixels = f"{p}rgb"
    nodes += [helper.make_node("Sub", [pixels, f"{p}mean"], [f"{p}centred"]),
              helper.make_node("Div", [f"{p}centred", f"{p}std"], [orig_in.name])]
    tail = [helper.make_node("Identity", [orig_out], [FEATURE_OUTPUT]),
            helper.make_node("LpNormalization", [FEATURE_OUTPUT], [EMBEDDING_OUTPUT], axis=1, p=2)]
    h, w = pre.input_size
    new = helper.make_graph(
        nodes + list(graph.node) + tail, graph.name or "imported",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info(FEATURE_OUTPUT, TensorProto.FLOAT, ["batch", None]),
         helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["batch", None])],
        initializer=list(graph.initializer) + [numpy_helper.from_array(v, k) for k, v in consts.items()],
        value_info=list(graph.value_info))
    out = helper.make_model(new, opset_imports=list(model.opset_import), producer_name="sphereface-plus import")
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    helper.set_model_props(out, metadata)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:
        raise InputFileError(f"the rewritten graph does not validate ({str(e).splitlines()[0]})") from None
    return out.SerializeToString()
