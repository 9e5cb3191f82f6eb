"""sphereface-plus import: each released format written here from random weights, imported, and its
embeddings of real LFW crops checked against an independent float64 numpy forward of the source network
with the source's own preprocessing (<= 1e-5); every bad input is one error line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from shared_data import LFW  # noqa: E402
from sphereface_plus.cli import main  # noqa: E402

needs_lfw = pytest.mark.skipif(not (LFW / "lfw_landmark.txt").is_file(), reason=f"real LFW not found at {LFW}")
TOL = 1e-5


# ------------------------------------------------------------------ numpy reference layers (float64)
def np_conv(x, w, b=None, stride=1, pad=1):
    """Cross-correlation, NCHW x OIHW, zero padding, as Caffe / PyTorch define it (im2col + matmul)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    cols = np.empty((n, c, kh, kw, oh, ow))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    out = np.matmul(w.reshape(o, -1), cols.reshape(n, c * kh * kw, oh * ow)).reshape(n, o, oh, ow)
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    return out


def np_prelu(x, a):
    a = a.reshape(1, -1, *([1] * (x.ndim - 2)))
    return np.where(x > 0, x, a * x)


def lfw_crops(template, count=4):
    from data_prep import align_face
    from data_prep.landmarks import read_landmarks

    marks = read_landmarks(LFW / "lfw_landmark.txt")
    paths = sorted(marks)[:count]
    return [align_face(cv2.imread(str(LFW / "images" / p)), marks[p], template=template) for p in paths]


def _unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ------------------------------------------------------------------ Caffe
def release_prototxt(units, input_size=(112, 96), margin=None):
    """A prototxt with the release's layer names (train/code/sphereface_deploy.prototxt) for ``units``."""
    lines = ['name: "SpherefaceNet"', 'input: "data"', "input_dim: 1", "input_dim: 3",
             f"input_dim: {input_size[0]}", f"input_dim: {input_size[1]}"]

    def conv(name, bottom, n_out, stride, lr2):
        lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                     f'param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: {lr2} decay_mult: 0 }} '
                     f'convolution_param {{ num_output: {n_out} kernel_size: 3 stride: {stride} pad: 1 '
                     f'weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0 }} }} }}')
        s, k = name[4:].split("_")
        lines.append(f'layer {{ name: "relu{s}_{k}" type: "PReLU" bottom: "{name}" top: "{name}" }}')
        return name

    bottom = "data"
    for s, (n, c) in enumerate(zip(units, (64, 128, 256, 512)), start=1):
        first = conv(f"conv{s}_1", bottom, c, 2, 2)
        block_in = first
        for j in range(n):
            a = conv(f"conv{s}_{2 * j + 2}", block_in, c, 1, 0)
            b = conv(f"conv{s}_{2 * j + 3}", a, c, 1, 0)
            res = f"res{s}_{2 * j + 3}"
            lines.append(f'layer {{ name: "{res}" type: "Eltwise" bottom: "{block_in}" bottom: "{b}" top: "{res}" '
                         f'eltwise_param {{ operation: 1 }} }}')
            block_in = res
        bottom = block_in
    lines.append(f'layer {{ name: "fc5" type: "InnerProduct" bottom: "{bottom}" top: "fc5" '
                 f'inner_product_param {{ num_output: 512 weight_filler {{ type: "xavier" }} }} }}')
    if margin:
        lines.append(f'layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6" '
                     f'margin_inner_product_param {{ num_output: {margin} type: QUADRUPLE base: 1000 gamma: 0.12 '
                     f'power: 1 lambda_min: 5 iteration: 0 }} }}')
    return "\n".join(lines) + "\n"


def caffe_weights(units, input_size=(112, 96), classes=7, seed=0, residual_bias=0.0):
    """Random blobs for every layer of ``release_prototxt(units)``: {layer: [arrays]} (Caffe shapes)."""
    rng = np.random.default_rng(seed)
    blobs, c_in = {}, 3
    h, w = input_size
    for s, (n, c) in enumerate(zip(units, (64, 128, 256, 512)), start=1):
        std = np.sqrt(2.0 / (9 * c_in))
        blobs[f"conv{s}_1"] = [rng.normal(0, std, (c, c_in, 3, 3)), rng.normal(0, 0.1, c)]
        blobs[f"relu{s}_1"] = [rng.uniform(0.05, 0.4, c)]
        for k in range(2, 2 + 2 * n):
            blobs[f"conv{s}_{k}"] = [rng.normal(0, 0.3 * np.sqrt(2.0 / (9 * c)), (c, c, 3, 3)),
                                     np.full(c, residual_bias)]
            blobs[f"relu{s}_{k}"] = [rng.uniform(0.05, 0.4, c)]
        c_in = c
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    blobs["fc5"] = [rng.normal(0, np.sqrt(1.0 / (512 * h * w)), (512, 512 * h * w)), rng.normal(0, 0.1, 512)]
    blobs["fc6"] = [rng.normal(0, 1, (classes, 512))]
    return blobs


def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packed_floats(field, arr):
    """A packed repeated float field in protobuf's wire format (tag, length, little-endian float32s): fast."""
    data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def write_caffemodel(path, prototxt_text, blobs, drop=(), reshape=None):
    """The .caffemodel: the prototxt's layers with their blobs (as Caffe's Net::ToProto writes them)."""
    from google.protobuf import text_format

    from sphereface_plus.importers.caffe import caffe_messages

    msgs = caffe_messages()
    net = msgs["NetParameter"]()
    text_format.Parse(prototxt_text, net, allow_unknown_field=True)
    for layer in net.layer:
        for arr in blobs.get(layer.name, []) if layer.name not in drop else []:
            if reshape and layer.name in reshape:
                arr = arr.reshape(reshape[layer.name])
            b = layer.blobs.add()
            b.shape.dim.extend(arr.shape)
            b.MergeFromString(_packed_floats(5, arr))  # BlobProto.data = 5, [packed = true]
    Path(path).write_bytes(net.SerializeToString())


def caffe_reference(blobs, units, crops_bgr):
    """fc5 of the network in float64: SphereFace preprocessing (BGR, (x - 127.5) / 128), convs, PReLUs, sums."""
    f = lambda a: np.asarray(a, np.float32).astype(np.float64)  # the weights as stored (float32)
    x = np.stack([c.transpose(2, 0, 1) for c in crops_bgr]).astype(np.float64)
    x = (x - 127.5) / 128.0
    for s, n in enumerate(units, start=1):
        w, b = blobs[f"conv{s}_1"]
        x = np_prelu(np_conv(x, f(w), f(b), stride=2), f(blobs[f"relu{s}_1"][0]))
        for j in range(n):
            k = 2 * j + 2
            y = np_prelu(np_conv(x, f(blobs[f"conv{s}_{k}"][0]), f(blobs[f"conv{s}_{k}"][1])), f(blobs[f"relu{s}_{k}"][0]))
            y = np_prelu(np_conv(y, f(blobs[f"conv{s}_{k + 1}"][0]), f(blobs[f"conv{s}_{k + 1}"][1])),
                         f(blobs[f"relu{s}_{k + 1}"][0]))
            x = x + y
    x = x.reshape(x.shape[0], -1)
    return x @ f(blobs["fc5"][0]).T + f(blobs["fc5"][1])


UNITS = (0, 1, 2, 0)  # sphere10: residual units in two stages, fast


@pytest.fixture(scope="module")
def caffe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("caffe")
    text = release_prototxt(UNITS, margin=7)
    blobs = caffe_weights(UNITS)
    (d / "net.prototxt").write_text(text)
    write_caffemodel(d / "net.caffemodel", text, blobs)
    return d, text, blobs


def test_caffe_schema_field_numbers_are_caffe_protos():
    # the facts the descriptor is built from (caffe.proto of the wy1iu/sphereface fork)
    from sphereface_plus.importers.caffe import caffe_messages

    m = caffe_messages()
    layer = m["LayerParameter"].DESCRIPTOR.fields_by_name
    assert (layer["blobs"].number, layer["convolution_param"].number, layer["margin_inner_product_param"].number,
            layer["prelu_param"].number, layer["inner_product_param"].number) == (7, 106, 147, 131, 117)
    assert m["NetParameter"].DESCRIPTOR.fields_by_name["layer"].number == 100
    blob = m["BlobProto"].DESCRIPTOR.fields_by_name
    assert (blob["shape"].number, blob["data"].number, blob["double_data"].number) == (7, 5, 8)


@needs_lfw
def test_caffe_import_matches_numpy_forward_on_lfw(caffe_files, tmp_path):
    d, text, blobs = caffe_files
    out = tmp_path / "sphere10.pt"
    assert main(["import", "--from", "caffe", str(d / "net.prototxt"), str(d / "net.caffemodel"), "--out", str(out)]) == 0
    crops = lfw_crops("112x96")
    ref = caffe_reference(blobs, UNITS, crops)
    ref_mirror = caffe_reference(blobs, UNITS, [c[:, ::-1] for c in crops])
    from eval.embedder import FaceEmbedder
    from eval.features import load_checkpoint

    model, info = load_checkpoint(out)
    assert info["template"] == "112x96" and info["backbone"] == "sphere10"
    x = torch.stack([(torch.from_numpy(c).permute(2, 0, 1).float() - 127.5) / 128 for c in crops])
    with torch.no_grad():
        raw = model(x).double().numpy()
    assert np.abs(raw - ref).max() <= TOL * np.abs(ref).max()
    emb = FaceEmbedder(out, flip=True, precision="fp32").embed(crops, aligned=True)
    want = _unit(np.concatenate([ref, ref_mirror], axis=1))
    assert np.abs(emb - want).max() <= TOL
    # the A-Softmax fc6 weights are the head, with the layer's settings: train.init_from can fine-tune it
    ckpt = torch.load(out, weights_only=True)
    assert torch.equal(ckpt["head"]["weight"], torch.from_numpy(blobs["fc6"][0].astype(np.float32)))
    assert ckpt["config"]["head"]["m"] == 4 and ckpt["config"]["head"]["name"] == "a_softmax"
    from sphereface_plus.heads import create_head

    head = create_head("a_softmax", in_features=512, num_classes=7, m=4)
    head.load_state_dict(ckpt["head"])


def _error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sphereface-plus import: error: "), err
    return err[0]


def test_caffe_bad_inputs_are_one_error_line(caffe_files, tmp_path, capsys):
    d, text, blobs = caffe_files
    out = str(tmp_path / "m.pt")
    proto = str(d / "net.prototxt")
    # a missing blob
    write_caffemodel(tmp_path / "missing.caffemodel", text, blobs, drop=("conv3_4",))
    assert "conv3_4" in _error_line(capsys, ["import", "--from", "caffe", proto, str(tmp_path / "missing.caffemodel"),
                                             "--out", out])
    # a shape mismatch (the weights of another width)
    bad = dict(blobs)
    bad["conv2_2"] = [np.zeros((128, 64, 3, 3)), np.zeros(128)]
    write_caffemodel(tmp_path / "shape.caffemodel", text, bad)
    assert "layer2.units.0.conv1.weight" in _error_line(
        capsys, ["import", "--from", "caffe", proto, str(tmp_path / "shape.caffemodel"), "--out", out])
    # a wrong architecture: --arch says sphere20, the prototxt is sphere10
    assert "sphere10" in _error_line(capsys, ["import", "--from", "caffe", proto, str(d / "net.caffemodel"),
                                              "--arch", "sphere20", "--out", out])
    # a non-zero residual bias, a truncated file, a V1 / wrong prototxt
    write_caffemodel(tmp_path / "bias.caffemodel", text, caffe_weights(UNITS, residual_bias=0.5))
    assert "non-zero bias" in _error_line(capsys, ["import", "--from", "caffe", proto, str(tmp_path / "bias.caffemodel"),
                                                   "--out", out])
    data = (d / "net.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) // 2])
    _error_line(capsys, ["import", "--from", "caffe", proto, str(tmp_path / "cut.caffemodel"), "--out", out])
    (tmp_path / "odd.prototxt").write_text(text.replace('type: "PReLU"', 'type: "ReLU"', 1))
    assert "ReLU" in _error_line(capsys, ["import", "--from", "caffe", str(tmp_path / "odd.prototxt"),
                                          str(d / "net.caffemodel"), "--out", out])
    assert not Path(out).exists()  # nothing written
