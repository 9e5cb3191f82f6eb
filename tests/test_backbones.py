"""The backbone registry as a whole: declarations, shapes at every declared input size, training and
evaluation modes, parameter counts against closed forms and the reference figures, the state-dict key
names of the peers, the building blocks against formulas written here, the config checks, and a
checkpoint round trip through the one rebuild function (``backbone_from_config``).

Speed: the registry-wide shape test runs on the meta device (shapes only, nothing computed); numerical
forward / backward runs on one small network per family (the same block code as the big sizes);
iresnet100 / iresnet200 are only counted, never run.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sphereface_plus.config import ConfigError
from sphereface_plus.face.config import load_config
from sphereface_plus.errors import UsageError
from sphereface_plus.models import (OUTPUTS, BackboneOptionError, backbone_from_config, backbone_spec,
                                    check_model_config, count_parameters, create_backbone, list_backbones)

COUNT_ONLY = {"iresnet100", "iresnet200"}  # too big to run in a test: parameters are counted, nothing else
FACE_SIZES = ((112, 112), (112, 96))


def _size_cases():
    for name in list_backbones():
        if name in COUNT_ONLY:
            continue
        for size in backbone_spec(name).input_sizes:
            yield name, size


# ----------------------------------------------------------------------------------- declarations
def test_registry_has_the_issue_backbones():
    names = set(list_backbones())
    wanted = {f"iresnet{d}" for d in (18, 34, 50, 100, 200)} | {"mobilefacenet"}
    wanted |= {f"sfnet{d}{v}" for d in (20, 36, 64) for v in ("", "_bn", "_deprecated")}
    assert wanted <= names
    assert set(list_backbones("embedding")) == names - {"cifar_cnn9"}
    assert list_backbones("logits") == ["cifar_cnn9"]


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_declares_what_it_takes(name):
    spec = backbone_spec(name)
    assert spec.output in OUTPUTS and spec.input_sizes and spec.source
    assert spec.default_input_size in spec.input_sizes
    if spec.output == "embedding":
        assert set(spec.input_sizes) == set(FACE_SIZES)  # every face network takes both crop templates
        assert {"input_size", "embedding_dim"} <= set(spec.options)
    with torch.device("meta"):
        net = create_backbone(name)
    assert tuple(net.input_size) == spec.default_input_size


@pytest.mark.parametrize("name, size", list(_size_cases()))
def test_output_shape_at_every_declared_size(name, size):
    """Shapes only (meta device): B x embedding_dim (B x classes for the CIFAR CNN) at each declared size."""
    spec = backbone_spec(name)
    kwargs = {"input_size": size, "embedding_dim": 24} if spec.output == "embedding" else {"num_classes": 7}
    with torch.device("meta"):
        net = create_backbone(name, **kwargs).eval()
        out = net(torch.empty(2, 3, *size))
    assert out.shape == (2, 24 if spec.output == "embedding" else 7)
    if hasattr(net, "feature_size"):  # the final map: the FC's (or GDConv's) input follows from the input size
        assert tuple(net.feature_size) == (7, 7 if size[1] == 112 else 6)
    if hasattr(net, "fc"):
        assert net.fc.in_features == 512 * net.feature_size[0] * net.feature_size[1]


# ----------------------------------------------------------------------------- numerics, small nets
SMALL = {  # one cheap network per family, built through the registry (same code as every size)
    "sphere4": {},
    "sfnet20": {"channels": [4, 8, 8, 16], "dropout": 0.2},
    "sfnet20_bn": {"channels": [4, 8, 8, 16]},
    "sfnet20_deprecated": {"channels": [4, 8, 8, 16]},
    "mobilefacenet": {"scale": 1, "blocks": [1, 1, 1, 1]},
}


def _small(name, size, **extra):
    torch.manual_seed(0)
    return create_backbone(name, input_size=size, embedding_dim=16, **SMALL[name], **extra)


def _check_step(net, x):
    net.train()
    out = net(x)
    assert out.shape == (x.shape[0], 16) and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, pname
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    net.eval()
    with torch.no_grad():
        batch = net(x)
        rows = torch.cat([net(x[i:i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(batch, rows, rtol=1e-4, atol=1e-5)  # eval mode: no mixing across the batch
    return out.detach(), batch


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("size", FACE_SIZES)
def test_forward_backward_train_and_eval(name, size):
    net = _small(name, size)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    train_out, eval_out = _check_step(net, x)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules())
    # batch statistics (BN) or dropout make training mode differ from evaluation mode, and only they
    assert (not torch.allclose(train_out, eval_out, atol=1e-6)) == (has_bn or has_dropout)


def test_iresnet_forward_backward():
    """The iResNet code path on real 112x96 crops (112x112 is shape-checked above): one block per stage
    (iresnet18..200 differ only in the number of identical blocks). The insightface features BN scale
    is frozen (no gradient)."""
    from sphereface_plus.models.iresnet import IResNet

    size = (112, 96)
    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), input_size=size, embedding_dim=16, dropout=0.1)
    assert not net.features.weight.requires_grad and torch.all(net.features.weight == 1)
    _check_step(net, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)))


def test_cifar_cnn9_step():
    torch.manual_seed(0)
    net = create_backbone("cifar_cnn9", num_classes=16)
    _check_step(net, torch.randn(2, 3, 32, 32))


# ------------------------------------------------------------------- parameter counts (closed forms)
def _bn(c):
    return 2 * c


def iresnet_params(layers, size, emb=512):
    """Closed form of insightface's iResNet: stem, blocks (BN-conv-BN-PReLU-conv-BN, 1x1 conv + BN shortcut
    on each stage's first block), BN2d, FC (+ bias) on the 512 x h x w map, features BN1d."""
    chans, h, w = (64, 128, 256, 512), *size
    total = 3 * 64 * 9 + _bn(64) + 64
    c_in = 64
    for c, n in zip(chans, layers):
        for j in range(n):
            cin = c_in if j == 0 else c
            total += _bn(cin) + 9 * cin * c + _bn(c) + c + 9 * c * c + _bn(c)
            if j == 0:
                total += cin * c + _bn(c)
        c_in, h, w = c, (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return total + _bn(512) + 512 * h * w * emb + emb + _bn(emb)


def sfnet_params(units, size, bn, emb=512):
    """Closed form of OpenSphere's SFNet: 3x3 convolutions with bias (no BN) or without bias + BN, the FC,
    and the features BN1d of the BN variant."""
    chans, h, w = (64, 128, 256, 512), *size
    conv = (lambda ci, co: 9 * ci * co + _bn(co)) if bn else (lambda ci, co: 9 * ci * co + co)
    total, c_in = 0, 3
    for c, n in zip(chans, units):
        total += conv(c_in, c) + n * 2 * conv(c, c)
        c_in, h, w = c, (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return total + 512 * h * w * emb + emb + (_bn(emb) if bn else 0)


def mobilefacenet_params(size, emb=512, scale=2, blocks=(1, 4, 6, 2), fold_bn=False):
    """Closed form of MobileFaceNet (Chen et al. 2018, Table 1, as insightface builds it). ``fold_bn``: the
    deploy-time count where each BN becomes one bias per channel."""
    bn = (lambda c: c) if fold_bn else _bn
    cb = lambda ci, co, k=1, g=1: ci // g * co * k + bn(co) + co  # conv + BN + PReLU
    lb = lambda ci, co, k=1, g=1: ci // g * co * k + bn(co)  # conv + BN
    dw = lambda ci, co, width: cb(ci, width) + cb(width, width, 9, width) + lb(width, co)
    c1, c2 = 64 * scale, 128 * scale
    h, w = size
    for _ in range(4):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    total = cb(3, c1, 9)
    total += cb(c1, c1, 9, 64) if blocks[0] == 1 else blocks[0] * dw(c1, c1, 128)
    total += dw(c1, c1, 128) + blocks[1] * dw(c1, c1, 128)
    total += dw(c1, c2, 256) + blocks[2] * dw(c2, c2, 256)
    total += dw(c2, c2, 512) + blocks[3] * dw(c2, c2, 256)
    total += cb(c2, 512) + lb(512, 512, h * w, 512) + 512 * emb + bn(emb)
    return total


IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}
# Reference figures at 112x112, 512-d: parameters of the peers' own modules, instantiated side by side
# with these (outside this repository) and counted with sum(p.numel() for p in model.parameters()):
# insightface recognition/arcface_torch/backbones/iresnet.py and mobilefacenet.py (deepinsight/insightface
# at 7fadd420; get_model("r18".."r200"), get_mbf(False, 512)), and OpenSphere model/backbone/sfnet.py,
# sfnet_deprecated.py (ydwen/opensphere OpenSphere_v0 and main). The same comparison gave identical
# state-dict keys and shapes and, with the peers' weights loaded, outputs equal in float64.
# (Rounded, these are the published sizes: iResNet-50 43.6 M, iResNet-100 65.2 M.)
INSIGHTFACE_IRESNET = {18: 24_025_600, 34: 34_139_328, 50: 43_590_848, 100: 65_156_160, 200: 118_833_920}
INSIGHTFACE_MBF = 2_059_520  # get_mbf(fp16=False, num_features=512): scale 2, blocks (1, 4, 6, 2)
OPENSPHERE_SFNET = {20: 24_500_992, 36: 34_605_440, 64: 50_020_864}  # no BN (sfnet.py and sfnet_deprecated.py)
OPENSPHERE_SFNET_BN = {20: 24_506_688, 36: 34_614_848, 64: 50_036_544}  # sfnet.py with norm_layer set


@pytest.mark.parametrize("depth", sorted(IRESNET_LAYERS))
def test_iresnet_parameter_counts(depth):
    name = f"iresnet{depth}"
    assert count_parameters(name) == iresnet_params(IRESNET_LAYERS[depth], (112, 112)) == INSIGHTFACE_IRESNET[depth]
    assert count_parameters(name, input_size=(112, 96)) == iresnet_params(IRESNET_LAYERS[depth], (112, 96))
    assert count_parameters(name, embedding_dim=128) == iresnet_params(IRESNET_LAYERS[depth], (112, 112), 128)


def test_iresnet_published_sizes():
    assert round(count_parameters("iresnet50") / 1e6, 1) == 43.6
    assert round(count_parameters("iresnet100") / 1e6, 1) == 65.2


@pytest.mark.parametrize("depth", [20, 36, 64])
def test_sfnet_parameter_counts(depth):
    from sphereface_plus.models.sfnet import UNITS

    units = UNITS[depth]
    for size in FACE_SIZES:
        plain = sfnet_params(units, size, bn=False)
        assert count_parameters(f"sfnet{depth}", input_size=size) == plain
        assert count_parameters(f"sfnet{depth}_deprecated", input_size=size) == plain
        assert count_parameters(f"sfnet{depth}_bn", input_size=size) == sfnet_params(units, size, bn=True)
    assert count_parameters(f"sfnet{depth}") == OPENSPHERE_SFNET[depth]
    assert count_parameters(f"sfnet{depth}_bn") == OPENSPHERE_SFNET_BN[depth]
    # the SphereFace paper's layer count: 4 stage convolutions + 2 per residual unit
    with torch.device("meta"):
        net = create_backbone(f"sfnet{depth}")
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == depth


def test_mobilefacenet_parameter_counts():
    for size in FACE_SIZES:
        assert count_parameters("mobilefacenet", input_size=size) == mobilefacenet_params(size)
    assert count_parameters("mobilefacenet") == INSIGHTFACE_MBF
    large = dict(scale=4, blocks=(2, 8, 12, 4))  # insightface's mbf_large
    assert count_parameters("mobilefacenet", **large) == mobilefacenet_params((112, 112), **large)
    # the paper's network (Table 1: 64 / 128 channels, 128-d): "0.99 M parameters" (Sec. 3.3, Table 2),
    # counted at deploy time with each BN folded into one bias per channel
    paper = dict(scale=1, embedding_dim=128)
    assert count_parameters("mobilefacenet", **paper) == mobilefacenet_params((112, 112), 128, scale=1)
    assert round(mobilefacenet_params((112, 112), 128, scale=1, fold_bn=True) / 1e6, 2) == 0.99


# --------------------------------------------------------------------------- peers' key names
def _keys(name, **kw):
    with torch.device("meta"):
        return set(create_backbone(name, **kw).state_dict())


def test_insightface_iresnet_key_names():
    keys = _keys("iresnet18")
    for k in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
              "layer1.0.bn2.bias", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean", "layer4.1.bn3.weight",
              "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"):
        assert k in keys, k
    assert not any(k.startswith("layer1.1.downsample") for k in keys)


def test_insightface_mobilefacenet_key_names():
    keys = _keys("mobilefacenet")
    for k in ("layers.0.layers.0.weight", "layers.0.layers.1.running_mean", "layers.0.layers.2.weight",
              "layers.2.layers.0.layers.0.weight", "layers.2.layers.2.layers.1.weight",
              "layers.3.layers.0.layers.1.layers.0.weight", "conv_sep.layers.2.weight",
              "features.layers.0.layers.0.weight", "features.layers.0.layers.1.weight", "features.layers.2.weight",
              "features.layers.3.running_var"):
        assert k in keys, k
    assert "features.layers.2.bias" not in keys


def test_opensphere_sfnet_key_names():
    plain, dep, bn = _keys("sfnet20"), _keys("sfnet20_deprecated"), _keys("sfnet20_bn")
    assert plain == dep  # both no-BN variants load the same files
    assert {"layer1.0.conv1.weight", "layer1.0.conv1.bias", "layer1.1.conv2.bias", "fc.weight"} <= plain
    assert not any(".bn" in k or k.startswith("features") for k in plain)
    assert {"layer1.0.conv1.weight", "layer1.0.bn1.running_mean", "layer3.4.bn2.weight", "features.weight"} <= bn
    assert not any(k.endswith("conv1.bias") or k.endswith("conv2.bias") for k in bn)


# ------------------------------------------------------------------ building blocks against formulas
def _prelu(x, a):
    return torch.where(x >= 0, x, a.view(1, -1, 1, 1) * x)


def _bn_eval(x, bn):
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _randomize_bn(module, g):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64))


def test_iresnet_block_formula():
    """insightface IBasicBlock: BN3(conv2_s(PReLU(BN2(conv1(BN1(x)))))) + BN(conv1x1_s(x)); no activation after."""
    from sphereface_plus.models.iresnet import IBasicBlock

    g = torch.Generator().manual_seed(0)
    blk = IBasicBlock(4, 6, stride=2).double().eval()
    _randomize_bn(blk, g)
    x = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    y = F.conv2d(_bn_eval(x, blk.bn1), blk.conv1.weight, padding=1)
    y = _prelu(_bn_eval(y, blk.bn2), blk.prelu.weight)
    y = _bn_eval(F.conv2d(y, blk.conv2.weight, stride=2, padding=1), blk.bn3)
    short = _bn_eval(F.conv2d(x, blk.downsample[0].weight, stride=2), blk.downsample[1])
    torch.testing.assert_close(blk(x), y + short, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["plain", "bn", "deprecated"])
def test_sfnet_unit_formula(variant):
    """OpenSphere: ReLU(x + BN(conv(ReLU(BN(conv(x)))))) (sfnet.py, BN only with norm_layer);
    x + ReLU(conv(ReLU(conv(x)))) (sfnet_deprecated.py)."""
    from sphereface_plus.models.sfnet import SFNet

    g = torch.Generator().manual_seed(0)
    net = SFNet((1, 0, 0, 0), variant, channels=(4, 4, 4, 4), embedding_dim=8).double().eval()
    _randomize_bn(net, g)
    unit = net.layer1[1]
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64)
    bn = (lambda t, m: _bn_eval(t, m)) if variant == "bn" else (lambda t, m: t)
    branch = bn(F.conv2d(x, unit.conv1.weight, unit.conv1.bias, padding=1), unit.bn1).relu()
    branch = bn(F.conv2d(branch, unit.conv2.weight, unit.conv2.bias, padding=1), unit.bn2)
    want = x + branch.relu() if variant == "deprecated" else (x + branch).relu()
    torch.testing.assert_close(unit(x), want, rtol=0, atol=1e-12)


def test_mobilefacenet_bottleneck_formula():
    """Inverted bottleneck: 1x1 conv-BN-PReLU, 3x3 depthwise conv-BN-PReLU, 1x1 conv-BN, + x (residual)."""
    from sphereface_plus.models.mobilefacenet import DepthWise

    g = torch.Generator().manual_seed(0)
    blk = DepthWise(4, 4, width=6, stride=1, residual=True).double().eval()
    _randomize_bn(blk, g)
    (c1, b1, p1), (c2, b2, p2), (c3, b3) = (blk.layers[0].layers, blk.layers[1].layers, blk.layers[2].layers)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    y = _prelu(_bn_eval(F.conv2d(x, c1.weight), b1), p1.weight)
    y = _prelu(_bn_eval(F.conv2d(y, c2.weight, padding=1, groups=6), b2), p2.weight)
    torch.testing.assert_close(blk(x), x + _bn_eval(F.conv2d(y, c3.weight), b3), rtol=0, atol=1e-12)


def test_heads_of_the_networks():
    """iResNet: BN2d -> flatten -> dropout -> FC -> BN1d; SFNet-BN: FC -> BN1d (scale 0.1, OpenSphere main);
    MobileFaceNet: linear GDConv over the whole 7x6 map -> FC (no bias) -> BN1d."""
    from sphereface_plus.models.iresnet import IResNet

    g = torch.Generator().manual_seed(0)
    net = IResNet((1, 1, 1, 1), input_size=(112, 96), embedding_dim=8).double().eval()
    _randomize_bn(net, g)
    fmap = torch.randn(2, 512, 7, 6, generator=g, dtype=torch.float64)
    net.forward_features = lambda x: fmap  # the head alone, on a given final map
    want = _bn_eval(F.linear(_bn_eval(fmap, net.bn2).flatten(1), net.fc.weight, net.fc.bias), net.features)
    torch.testing.assert_close(net(torch.empty(2, 3, 112, 96, dtype=torch.float64)), want, rtol=0, atol=1e-10)
    with torch.device("meta"):
        bn_net = create_backbone("sfnet20_bn")
        mbf = create_backbone("mobilefacenet", input_size=(112, 96))
    assert isinstance(bn_net.features, nn.BatchNorm1d) and bn_net.features.weight.requires_grad
    gdc = mbf.features.layers[0].layers[0]
    assert gdc.kernel_size == (7, 6) and gdc.groups == 512 and mbf.features.layers[2].bias is None
    torch.manual_seed(0)
    assert torch.all(create_backbone("sfnet20_bn", channels=[4, 4, 4, 4]).features.weight == 0.1)
    assert torch.all(create_backbone("sfnet20_bn", channels=[4, 4, 4, 4], features_scale_init=1.0).features.weight == 1)


def test_initialisation_follows_the_peers():
    torch.manual_seed(0)
    net = create_backbone("iresnet18", input_size=(112, 96), embedding_dim=8)
    w = net.layer3[1].conv1.weight
    assert abs(w.std().item() - 0.1) < 0.005 and abs(w.mean().item()) < 0.005  # N(0, 0.1)
    dep = create_backbone("sfnet20_deprecated", channels=[16, 32, 64, 128], embedding_dim=8)
    w = dep.layer3[2].conv1.weight  # Xavier-normal: std = sqrt(2 / (fan_in + fan_out))
    assert abs(w.std().item() / math.sqrt(2 / (2 * 64 * 9)) - 1) < 0.05
    plain = create_backbone("sfnet20", channels=[16, 32, 64, 128], embedding_dim=8)
    w = plain.layer3[2].conv1.weight  # Kaiming-normal, fan-out: std = sqrt(2 / fan_out)
    assert abs(w.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.05


# --------------------------------------------------------------------------------------- errors
def test_unknown_option_names_the_valid_ones():
    with pytest.raises(BackboneOptionError) as info:
        create_backbone("iresnet50", dropuot=0.4)
    msg = str(info.value)
    assert "dropuot" in msg and "dropout" in msg and "zero_init_residual" in msg
    with pytest.raises(BackboneOptionError, match="fp16"):  # insightface's in-model autocast is not an option
        create_backbone("mobilefacenet", fp16=True)


def test_unsupported_input_size_names_the_valid_ones():
    with pytest.raises(BackboneOptionError) as info:
        create_backbone("iresnet18", input_size=(96, 96))
    assert "96x96" in str(info.value) and "112x112" in str(info.value) and "112x96" in str(info.value)
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("overrides, fragments", [
    (["model.backbone=cifar_cnn9"], ["cifar_cnn9", "logits", "iresnet50", "sphere20"]),
    (["model.backbone=iresnt50"], ["iresnt50", "Did you mean 'iresnet50'"]),
    (["model.backbone=iresnet50", "model.kwargs.dropuot=0.4"], ["dropuot", "dropout", "train_features_scale"]),
    (["model.backbone=iresnet50", "model.kwargs.dropout=1.5"], ["dropout", "1.5"]),
    (["model.backbone=sfnet20", "model.kwargs.embedding_dim=128"], ["model.embedding_dim"]),
    (["model.backbone=sfnet20", "model.input_size=[96,96]"], ["96x96", "112x96"]),
    (["model.kwargs=3"], ["model.kwargs", "mapping"]),
])
def test_config_validation_refuses(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))


def test_config_records_kwargs():
    cfg = load_config(None, ["model.backbone=mobilefacenet", "model.kwargs={scale: 1}", "model.kwargs.blocks=[1,2,2,1]"])
    assert cfg.model.kwargs == {"scale": 1, "blocks": [1, 2, 2, 1]}
    assert cfg.to_dict()["model"]["kwargs"] == {"scale": 1, "blocks": [1, 2, 2, 1]}
    check_model_config(cfg.to_dict()["model"])  # the stored dict passes the same checks


# ------------------------------------------------------------------ the one rebuild, checkpoint round trip
ROUND_TRIP = [
    {"backbone": "sfnet20_bn", "input_size": [112, 96], "embedding_dim": 16,
     "kwargs": {"channels": [4, 8, 8, 16], "dropout": 0.3, "features_scale_init": 1.0}},
    {"backbone": "sfnet20_deprecated", "input_size": [112, 112], "embedding_dim": 8, "kwargs": {"channels": [4, 4, 8, 8]}},
    {"backbone": "mobilefacenet", "input_size": [112, 96], "embedding_dim": 32, "kwargs": {"scale": 1, "blocks": [2, 1, 1, 1]}},
    {"backbone": "iresnet18", "input_size": [112, 96], "embedding_dim": 8, "kwargs": {"train_features_scale": True}},
    {"backbone": "sphere4", "input_size": [112, 112], "embedding_dim": 8},  # a checkpoint without kwargs
]


@pytest.mark.parametrize("model_cfg", ROUND_TRIP, ids=lambda c: c["backbone"])
def test_checkpoint_round_trip(tmp_path, model_cfg):
    """Trainer side and eval side both go through backbone_from_config: the checkpoint's stored config
    rebuilds the same network (kwargs and input size included), which loads the weights and gives the
    same embeddings."""
    from eval.features import load_embedding_model
    from sphereface_plus.utils import atomic_torch_save

    torch.manual_seed(0)
    net = backbone_from_config(model_cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong rebuild could not pass
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"model": net.state_dict(), "head": {}, "iteration": 3,
                       "config": {"model": dict(model_cfg), "data": {"template": "x".join(map(str, model_cfg["input_size"]))}}},
                      path)
    loaded, info = load_embedding_model(path)
    assert type(loaded) is type(net) and info["backbone"] == model_cfg["backbone"]
    assert info["input_size"] == tuple(model_cfg["input_size"])
    x = torch.randn(2, 3, *model_cfg["input_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert loaded(x).shape == (2, model_cfg["embedding_dim"])


def test_checkpoint_of_an_unknown_backbone_is_a_checkpoint_error(tmp_path):
    from eval.features import load_embedding_model
    from sphereface_plus.errors import CheckpointError

    path = tmp_path / "future.pt"
    torch.save({"model": {}, "config": {"model": {"backbone": "resnet9000", "input_size": [112, 112]}}}, path)
    with pytest.raises(CheckpointError, match="resnet9000"):
        load_embedding_model(path)


def test_trainer_builds_from_the_same_function():
    """Trainer.build_model goes through backbone_from_config (model.kwargs reach the network)."""
    from sphereface_plus.face.trainer import FaceTrainer

    class Data:
        input_size = (112, 96)
        num_classes = 5

        def __len__(self):
            return 10

    cfg = load_config(None, ["model.backbone=sfnet20_bn", "model.embedding_dim=8", "train.device=cpu",
                             "model.kwargs={channels: [4, 4, 8, 8], dropout: 0.25}", "train.tensorboard=false",
                             "train.precision=fp32"])
    trainer = FaceTrainer.from_config(cfg, Data())
    net = trainer.model.backbone
    assert net.input_size == (112, 96) and net.dropout.p == 0.25 and net.layer4[0].conv1.out_channels == 8
    assert trainer.cfg.to_dict()["model"]["kwargs"] == {"channels": [4, 4, 8, 8], "dropout": 0.25}


def test_train_then_export_and_load_any_backbone(tmp_path, capsys):
    """End to end through the command line: train one step with a non-SphereFace backbone, its model.kwargs
    and 112x112 crops; the checkpoint records them; eval's loader and `export` rebuild the same network."""
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    from eval.features import load_embedding_model
    from sphereface_plus.cli import main
    from sphereface_plus.engine.checkpoint import load_checkpoint as load_state

    rng = np.random.default_rng(0)
    root = tmp_path / "crops"
    for k in range(3):
        (root / f"id{k}").mkdir(parents=True)
        for j in range(2):
            cv2.imwrite(str(root / f"id{k}" / f"{j}.png"), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    out = tmp_path / "run"
    rc = main(["train", f"out_dir={out}", "data.source=folder", f"data.root={root}", "data.template=112x112",
               "model.backbone=mobilefacenet", "model.embedding_dim=16", "model.kwargs={scale: 1, blocks: [1, 1, 1, 1]}",
               "train.iterations=1", "train.batch_size=4", "train.tensorboard=false", "data.num_workers=0",
               "train.device=cpu", "train.precision=fp32", "eval.pairs="])
    assert rc == 0, capsys.readouterr().err[-2000:]
    ckpt = out / "checkpoints" / "last.pt"
    stored = load_state(ckpt)["config"]["model"]
    assert stored["backbone"] == "mobilefacenet" and stored["input_size"] == [112, 112]
    assert stored["kwargs"] == {"scale": 1, "blocks": [1, 1, 1, 1]}
    model, info = load_embedding_model(ckpt)
    assert model.scale == 1 and model.blocks == (1, 1, 1, 1) and info["input_size"] == (112, 112)
    exported = tmp_path / "model.ts"
    rc = main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(exported),
               "--check-count", "2"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    ts = torch.jit.load(str(exported))
    with torch.no_grad():
        torch.testing.assert_close(ts.features(x), model(x), rtol=1e-5, atol=1e-5)
