"""Speed features (docs/performance.md): the fast PReLU, train.compile=auto, the JPEG decoder and normalisation, bench/device_check.sh."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from sphereface_plus.config import ConfigError
from sphereface_plus.face.config import load_config
from sphereface_plus.engine import compile as compile_rule
from sphereface_plus.errors import UsageError
from sphereface_plus.models import create_backbone
from sphereface_plus.models.layers import PReLU
from tests.shared_data import LFW

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- PReLU
def _reference_grads(x, weight, grad):
    """dL/dx and dL/da of PReLU written from He et al. 2015, eq. 1-4, as a float64 loop over channels."""
    x, weight, grad = x.double(), weight.double(), grad.double()
    gx = torch.empty_like(x)
    ga = torch.zeros_like(weight)
    per_channel = weight.numel() > 1
    for c in range(x.shape[1] if x.dim() > 1 else 1):
        xs = x[:, c] if x.dim() > 1 else x
        gs = grad[:, c] if x.dim() > 1 else grad
        a = weight[c] if per_channel else weight[0]
        neg = xs <= 0
        gx_c = torch.where(neg, a * gs, gs)
        if x.dim() > 1:
            gx[:, c] = gx_c
        else:
            gx = gx_c
        ga[c if per_channel else 0] += (gs * xs)[neg].sum()
    return gx, ga


@pytest.mark.parametrize("slopes", ["positive", "mixed"])  # backward from the saved output / input
@pytest.mark.parametrize("shape,num,channels_last", [
    ((3, 5, 6, 7), 5, True), ((3, 5, 6, 7), 5, False), ((4, 6), 6, False), ((2, 4, 9), 4, False),
    ((3, 5, 6, 7), 1, False), ((2, 3, 4, 5), 1, True),
])
def test_prelu_gradients_match_nn_prelu_and_the_formula(shape, num, channels_last, slopes):
    g = torch.Generator().manual_seed(sum(shape) + num)
    ref, new = nn.PReLU(num).double(), PReLU(num).double()  # float64 on a CPU: the fast backward by default
    with torch.no_grad():
        w = torch.rand(num, generator=g, dtype=torch.float64)
        if slopes == "mixed":  # a negative and a zero slope: the sign of x is not in y, x is kept
            w = w * 1.4 - 0.5
            w[0] = -0.3
            w[-1] = 0.0 if num > 1 else w[-1]
        else:
            w = w * 0.9 + 1e-3
        ref.weight.copy_(w)
        new.weight.copy_(ref.weight)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x.view(-1)[::5] = 0.0  # x == 0 counts as negative (nn.PReLU's convention)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), new(x2)
    assert torch.equal(y1, y2)
    saved = y2.grad_fn.saved_tensors[0]
    assert saved.data_ptr() == (y2 if slopes == "positive" else x2).data_ptr()
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-14)
    torch.testing.assert_close(new.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    gx, ga = _reference_grads(x, ref.weight.detach(), grad)
    torch.testing.assert_close(x2.grad, gx, rtol=0, atol=1e-14)
    torch.testing.assert_close(new.weight.grad, ga, rtol=1e-12, atol=1e-12)


def test_prelu_bf16_autocast_slope_gradient_in_float32():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    act = PReLU(8, init=0.25, fast_backward=True)
    x = torch.randn(2, 3, 10, 9, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        h = conv(x)
        y = act(h)
    assert y.dtype == torch.bfloat16
    h.retain_grad()
    y.float().square().sum().backward()
    assert act.weight.grad.dtype == torch.float32
    # the same slope gradient from the formula on the very bf16 activations, in float64
    _, ga = _reference_grads(h.detach(), act.weight.detach(), (2 * y.detach().float()).to(torch.bfloat16))
    torch.testing.assert_close(act.weight.grad.double(), ga, rtol=2e-2, atol=1e-2)


def test_prelu_is_a_drop_in_nn_prelu():
    new = PReLU(7, init=0.1)
    assert isinstance(new, nn.PReLU) and list(new.state_dict()) == ["weight"] and new.weight.shape == (7,)
    ref = nn.PReLU(7)
    ref.load_state_dict(new.state_dict())
    new.load_state_dict(nn.PReLU(7, init=0.3).state_dict())
    assert torch.all(new.weight == 0.3)
    x = torch.randn(2, 7, 3, 3)
    with torch.no_grad():  # inference takes torch's own kernel
        assert torch.equal(new(x), torch.nn.functional.prelu(x, new.weight))


@pytest.mark.parametrize("slopes", [(0.3, 0.1, 1.2), (0.3, -0.2, 0.0)])
def test_prelu_double_backward(slopes):
    w = torch.tensor(slopes, dtype=torch.float64).requires_grad_()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # away from the kink at 0
    from sphereface_plus.models.layers import prelu

    def fast(x, w):
        return prelu(x, w, fast=True)

    assert torch.autograd.gradcheck(fast, (x, w))
    assert torch.autograd.gradgradcheck(fast, (x, w))


def test_sphere_net_gradients_and_keys_unchanged():
    """sphere4 with the toolkit's PReLU against the same net with nn.PReLU: state-dict keys, outputs, gradients."""
    torch.manual_seed(0)
    net = create_backbone("sphere4").double()
    ref = create_backbone("sphere4")
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, PReLU):
                setattr(module, name, nn.PReLU(child.num_parameters))
    ref = ref.double()
    assert any(isinstance(m, PReLU) for m in net.modules())
    assert list(net.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 112, 96, dtype=torch.float64)
    net(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------- train.compile
@pytest.mark.parametrize("given,expected", [(True, "true"), (False, "false"), ("auto", "auto"), ("TRUE", "true")])
def test_compile_setting_accepts_booleans_and_words(given, expected):
    assert compile_rule.normalize_compile(given) == expected


def test_compile_setting_in_config():
    from sphereface_plus.face.resolve import DataFacts, resolve

    def in_force(overrides):  # the resolved recipe's value (the one config.yaml and checkpoints record)
        return resolve(load_config(None, overrides), DataFacts((112, 96))).config.train.compile

    assert in_force(["model.backbone=sphere4"]) == "auto"
    assert in_force(["train.compile=true"]) == "true"
    assert in_force(["train.compile=false"]) == "false"
    with pytest.raises(ConfigError, match="auto, true, false"):
        load_config(None, ["train.compile=sometimes"])
    with pytest.raises(UsageError):
        compile_rule.normalize_compile(3)


def test_compile_auto_rule(monkeypatch):
    monkeypatch.delenv(compile_rule.AUTO_ENV, raising=False)
    assert compile_rule.resolve_compile("true", "cpu", 1) is True
    assert compile_rule.resolve_compile("false", "cpu", 10 ** 9) is False
    monkeypatch.setattr(compile_rule, "BREAK_EVEN", {"cpu": 100.0})
    monkeypatch.setattr(compile_rule, "compile_toolchain", lambda device: "")
    needed = compile_rule.SAFETY * 100.0
    assert compile_rule.resolve_compile("auto", "cpu", int(needed)) is True
    assert compile_rule.resolve_compile("auto", "cpu", int(needed) - 1) is False
    monkeypatch.setattr(compile_rule, "compile_toolchain", lambda device: "no C++ compiler on PATH")
    assert compile_rule.resolve_compile("auto", "cpu", 10 ** 9) is False
    monkeypatch.setattr(compile_rule, "BREAK_EVEN", {"cpu": math.inf})
    monkeypatch.setattr(compile_rule, "compile_toolchain", lambda device: "")
    assert compile_rule.resolve_compile("auto", "cpu", 10 ** 9) is False
    assert compile_rule.resolve_compile("auto", "meta", 10 ** 9) is False  # no measured figure: eager
    monkeypatch.setattr(compile_rule, "BREAK_EVEN", {"cpu": 100.0})
    monkeypatch.setenv(compile_rule.AUTO_ENV, "eager")
    assert compile_rule.resolve_compile("auto", "cpu", 10 ** 9) is False
    assert compile_rule.resolve_compile("true", "cpu", 1) is True


def test_compile_toolchain_reports_a_missing_compiler(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "compiler" in compile_rule.compile_toolchain("cpu")


# --------------------------------------------------------------------------------- input pipeline
def _jpegs(n=6):
    import cv2

    files = sorted(LFW.rglob("*.jpg"))[:n] if LFW.is_dir() else []
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if files:
            img = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
        else:
            img = cv2.resize(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), (96, 112), interpolation=cv2.INTER_CUBIC)
        crop = cv2.resize(img, (96, 112))
        for q in (75, 95):
            out.append(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes())
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    out.append(cv2.imencode(".jpg", gray)[1].tobytes())
    return out


def test_simplejpeg_pixels_match_opencv_within_decoder_tolerance():
    pytest.importorskip("simplejpeg", reason="simplejpeg is the optional extra fast-jpeg")
    from data_prep.jpeg import decode_bgr
    from data_prep.image_files import read_image

    for data in _jpegs():
        fast = decode_bgr(data, decoder="simplejpeg")
        ref = read_image(data)[0]
        assert fast is not None and fast.shape == ref.shape and fast.dtype == np.uint8
        diff = np.abs(fast.astype(np.int16) - ref.astype(np.int16))
        assert diff.max() <= 2 and diff.mean() < 0.1  # two libjpeg-turbo builds, accurate DCT: (near) identical


def test_jpeg_decoder_falls_back_to_opencv(monkeypatch):
    from data_prep import jpeg
    from data_prep.datasets import decode_crop

    data = _jpegs(1)[0]
    assert jpeg.decode_bgr(data, decoder="cv2") is None
    assert jpeg.decode_bgr(data[: len(data) // 2], decoder="simplejpeg") is None  # truncated: OpenCV explains
    with pytest.raises(ValueError, match="truncated JPEG"):
        decode_crop(data[: len(data) // 2])
    monkeypatch.setenv(jpeg.ENV, "cv2")
    assert jpeg.decoder_name() == "cv2"
    monkeypatch.setenv(jpeg.ENV, "turbo")
    with pytest.raises(UsageError, match="auto, simplejpeg, cv2"):
        jpeg.decoder_name()


def test_lookup_normalisation_equals_the_formula():
    from data_prep.datasets import preprocess, to_network_tensor

    img = np.random.default_rng(0).integers(0, 256, (112, 96, 3), dtype=np.uint8)
    expected = (torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1) - 127.5) / 128
    assert torch.equal(to_network_tensor(img).double(), expected)
    assert torch.equal(preprocess(img, (112, 96), flip=True).double(), expected.flip(2))
    assert to_network_tensor(img).dtype == torch.float32 and to_network_tensor(img).is_contiguous()


def test_batched_torchvision_decode_matches_the_reader():
    """decode_batch_cuda's pixel path, run on the CPU (torchvision's decoder on the device is the CUDA option)."""
    pytest.importorskip("torchvision")
    from data_prep.datasets import decode_crop, preprocess
    from data_prep.jpeg import decode_batch_cuda

    datas = _jpegs(2)[:4]
    flips = [False, True, False, True]
    batch = decode_batch_cuda(datas, flips, (112, 96), device="cpu")
    ref = torch.stack([preprocess(decode_crop(d), (112, 96), f) for d, f in zip(datas, flips)])
    assert batch.shape == ref.shape
    assert (batch - ref).abs().max() * 128 <= 2.0  # libjpeg-turbo in torchvision vs OpenCV/simplejpeg


# ------------------------------------------------------------------------------- device_check.sh
def test_device_check_script_parses_and_runs_its_cpu_fallback(tmp_path):
    script = REPO / "bench" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = dict(os.environ, PYTHON=sys.executable, DEVICE_CHECK_OUT=str(tmp_path), DEVICE_CHECK_SIZE="ci",
               PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)  # a hang guard only
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    summary = json.loads((tmp_path / "device_check.json").read_text())
    assert summary["device"] == "cpu" and summary["size"] == "ci"
    names = {r["name"] for r in summary["throughput"]}
    assert "sphere20 bf16 channels_last eager" in names or "sphere20 fp32 channels_last eager" in names
    assert all(r["images_per_s"] > 0 for r in summary["throughput"])
    assert summary["input_pipeline"]["per_worker"]
    assert (tmp_path / "device_check.md").is_file()
