"""sphereface-plus import --from pytorch: networks written here the way PyTorch ports write them (their own
module names, flat or nested, parts of a block registered in another order, a classifier saved after the
backbone, the usual checkpoint wrappers), with random weights, imported by structure; the toolkit's
embeddings of aligned crops must equal the port's own forward with the port's own preprocessing
(<= 1e-5 on the L2-normalised embedding); a network that does not fit is one error line naming the
first source tensor that does not fit."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from sphereface_plus.cli import main  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def crops():
    from eval.export import synthetic_crops

    return {t: synthetic_crops(t, 2) for t in ("112x96", "112x112")}


def randomise(net: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere (BN statistics and scales included), scaled to keep activations finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or (t.ndim == 1 and name.endswith("weight")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            elif t.ndim == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.9 / math.sqrt(t[0].numel())))
    return net.eval()


def port_embeddings(net, crops_bgr, color, mean, std, flip):
    """The port's own pipeline: its channel order and normalisation in numpy, its network, its flip policy.
    (float32: PyTorch's float64 depthwise convolutions take half a minute on a CPU; the two float32 paths
    differ by rounding, far below the tolerance.)"""
    net = net.float().eval()
    x = np.stack([(c[:, :, ::-1] if color == "rgb" else c).transpose(2, 0, 1) for c in crops_bgr]).astype(np.float64)
    x = torch.from_numpy(((x - mean) / std).astype(np.float32))
    with torch.no_grad():
        f, f_flip = net(x).numpy(), net(x.flip(3)).numpy()
    f = {"none": f, "sum": f + f_flip, "concat": np.concatenate([f, f_flip], axis=1)}[flip]
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def import_and_embed(tmp_path, obj, crops_bgr, argv):
    from eval.embedder import FaceEmbedder

    torch.save(obj, tmp_path / "port.pth")
    out = tmp_path / "imported.pt"
    assert main(["import", "--from", "pytorch", str(tmp_path / "port.pth"), "--out", str(out)] + argv) == 0
    return FaceEmbedder(out, precision="fp32").embed(crops_bgr, aligned=True), out


def error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sphereface-plus import: error: "), err
    return err[0]


# ------------------------------------------------------------------ SphereFace ports
class FlatSphere(nn.Module):
    """clcarwin/sphereface_pytorch's way: every layer an attribute ``conv{stage}_{k}`` / ``relu{stage}_{k}``
    (residual convolutions with a bias), ``fc5``, and the A-Softmax weight ``fc6`` saved after it."""

    def __init__(self, units, classes=10):
        super().__init__()
        self.units, c_in = units, 3
        for s, (c, n) in enumerate(zip((64, 128, 256, 512), units), 1):
            setattr(self, f"conv{s}_1", nn.Conv2d(c_in, c, 3, 2, 1))
            setattr(self, f"relu{s}_1", nn.PReLU(c))
            for k in range(2, 2 + 2 * n):
                setattr(self, f"conv{s}_{k}", nn.Conv2d(c, c, 3, 1, 1))
                setattr(self, f"relu{s}_{k}", nn.PReLU(c))
            c_in = c
        self.fc5 = nn.Linear(512 * 7 * 6, 512)
        self.fc6 = nn.Module()  # the A-Softmax layer: a feat_dim x classes weight
        self.fc6.weight = nn.Parameter(torch.randn(512, classes))

    def forward(self, x):
        for s, n in enumerate(self.units, 1):
            x = getattr(self, f"relu{s}_1")(getattr(self, f"conv{s}_1")(x))
            for k in range(2, 2 + 2 * n, 2):
                y = getattr(self, f"relu{s}_{k}")(getattr(self, f"conv{s}_{k}")(x))
                x = x + getattr(self, f"relu{s}_{k + 1}")(getattr(self, f"conv{s}_{k + 1}")(y))
        return self.fc5(x.flatten(1))


def test_flat_sphereface_port_with_residual_biases(tmp_path, crops):
    net = randomise(FlatSphere((0, 1, 2, 0)), 0)
    emb, out = import_and_embed(tmp_path, {"epoch": 3, "state_dict": net.state_dict()}, crops["112x96"],
                                ["--backbone", "sphere10", "--backbone-option", "residual_bias=true", "--flip", "none"])
    assert np.abs(emb - port_embeddings(net, crops["112x96"], "bgr", 127.5, 128.0, "none")).max() <= TOL
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["model"]["kwargs"] == {"residual_bias": True}
    assert ckpt["imported_from"]["ignored"] == ["fc6.weight (512, 10)"]


def test_sphereface_port_without_the_option_is_one_line(tmp_path, capsys):
    torch.save(FlatSphere((0, 1, 2, 0)).state_dict(), tmp_path / "port.pth")
    line = error_line(capsys, ["import", "--from", "pytorch", str(tmp_path / "port.pth"), "--backbone", "sphere10",
                               "--out", str(tmp_path / "x.pt")])
    # the residual convolution's bias is the first tensor the toolkit's sphere10 has no place for
    assert "'conv2_2.bias' (128,)" in line and "'layer2.units.0.conv1' holds no more tensors" in line
    assert "residual_bias" in line  # the builder's options are listed
    assert not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------------ MobileFaceNet ports
class Block(nn.Module):
    """conv -> BN [-> PReLU], registered PReLU first, then BN, then the convolution (the order differs
    from the one they run in; their kinds differ, so the import pairs them)."""

    def __init__(self, c_in, c_out, k=1, s=1, p=0, groups=1, linear=False):
        super().__init__()
        self.prelu = None if linear else nn.PReLU(c_out)
        self.bn = nn.BatchNorm2d(c_out)
        self.conv = nn.Conv2d(c_in, c_out, k, s, p, groups=groups, bias=False)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    def __init__(self, c_in, c_out, stride, expansion):
        super().__init__()
        w = c_in * expansion
        self.connect = stride == 1 and c_in == c_out
        self.expand = Block(c_in, w)
        self.dw = Block(w, w, 3, stride, 1, groups=w)
        self.project = Block(w, c_out, linear=True)

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.connect else y


class PaperMobileFaceNet(nn.Module):
    """The paper's MobileFaceNet (Chen et al. 2018, Table 1) as Xiaoccer/MobileFaceNet_Pytorch writes it for
    112x96 crops: (t, c, n, s) bottleneck settings, a 7x6 linear GDConv, and a 1x1 convolution + BN2d as
    the 128-d embedding layer."""

    SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

    def __init__(self):
        super().__init__()
        self.head_conv = Block(3, 64, 3, 2, 1)
        self.head_dw = Block(64, 64, 3, 1, 1, groups=64)
        blocks, c = [], 64
        for t, c_out, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(Bottleneck(c, c_out, s if i == 0 else 1, t))
                c = c_out
        self.body = nn.Sequential(*blocks)
        self.tail = Block(128, 512)
        self.gdc = Block(512, 512, (7, 6), groups=512, linear=True)
        self.embed = Block(512, 128, linear=True)

    def forward(self, x):
        x = self.body(self.head_dw(self.head_conv(x)))
        return self.embed(self.gdc(self.tail(x))).flatten(1)


def test_paper_mobilefacenet_port(tmp_path, crops):
    net = randomise(PaperMobileFaceNet(), 1)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}  # saved from DataParallel
    emb, out = import_and_embed(tmp_path, {"epoch": 68, "net_state_dict": state}, crops["112x96"],
                                ["--backbone", "mobilefacenet", "--backbone-option", "scale=1", "--color", "rgb"])
    assert np.abs(emb - port_embeddings(net, crops["112x96"], "rgb", 127.5, 128.0, "concat")).max() <= TOL
    model = torch.load(out, weights_only=True)["config"]["model"]
    # the geometry was read from the tensors: 112x96 crops (the 7x6 GDConv), 128-d (the 1x1 embedding conv)
    assert model["input_size"] == [112, 96] and model["embedding_dim"] == 128


# ------------------------------------------------------------------ iResNet ports
class IRBlock(nn.Module):
    def __init__(self, c_in, c, stride):
        super().__init__()
        self.norm_in = nn.BatchNorm2d(c_in)
        self.conv_a = nn.Conv2d(c_in, c, 3, 1, 1, bias=False)
        self.norm_mid = nn.BatchNorm2d(c)
        self.act = nn.PReLU(c)
        self.conv_b = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.norm_out = nn.BatchNorm2d(c)
        self.shortcut = None
        if stride != 1 or c_in != c:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.norm_out(self.conv_b(self.act(self.norm_mid(self.conv_a(self.norm_in(x))))))
        return y + (x if self.shortcut is None else self.shortcut(x))


class IResNetPort(nn.Module):
    """An iResNet-18 with its own names, its stages in a ModuleList, its stem's PReLU created before the BN."""

    def __init__(self):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.stem_act = nn.PReLU(64)
        self.stem_norm = nn.BatchNorm2d(64)
        stages, c_in = [], 64
        for c in (64, 128, 256, 512):
            stages.append(nn.Sequential(IRBlock(c_in, c, 2), IRBlock(c, c, 1)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.out_norm = nn.BatchNorm2d(512)
        self.drop = nn.Dropout(0.0)
        self.embedding = nn.Linear(512 * 7 * 7, 512)
        self.embedding_norm = nn.BatchNorm1d(512)

    def forward(self, x):
        x = self.stem_act(self.stem_norm(self.stem_conv(x)))
        for stage in self.stages:
            x = stage(x)
        return self.embedding_norm(self.embedding(self.drop(self.out_norm(x).flatten(1))))


def test_iresnet_port(tmp_path, crops):
    net = randomise(IResNetPort(), 2)
    emb, _ = import_and_embed(tmp_path, {"model": net.state_dict()}, crops["112x112"],
                              ["--backbone", "iresnet18", "--color", "rgb", "--std", "127.5", "--flip", "sum"])
    assert np.abs(emb - port_embeddings(net, crops["112x112"], "rgb", 127.5, 127.5, "sum")).max() <= TOL


# ------------------------------------------------------------------ SFNet ports
class SFNetPort(nn.Module):
    """OpenSphere's SFNet-20 with BN under other names: its ``features`` BN1d created first (as
    OpenSphere does), a stage's convolution + BN + ReLU in a ``down`` module, ReLU after the residual sum."""

    def __init__(self):
        super().__init__()
        self.emb_norm = nn.BatchNorm1d(512)
        self.stages, c_in = nn.ModuleList(), 3
        for c, n in zip((64, 128, 256, 512), (1, 2, 4, 1)):
            units = [nn.ModuleDict({"conv": nn.Conv2d(c, c, 3, 1, 1, bias=False), "bn": nn.BatchNorm2d(c),
                                    "conv2": nn.Conv2d(c, c, 3, 1, 1, bias=False), "bn2": nn.BatchNorm2d(c)})
                     for _ in range(n)]
            down = nn.Sequential(nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.stages.append(nn.ModuleDict({"down": down, "units": nn.ModuleList(units)}))
            c_in = c
        self.linear = nn.Linear(512 * 7 * 7, 512)

    def forward(self, x):
        for stage in self.stages:
            x = stage["down"](x)
            for u in stage["units"]:
                x = torch.relu(x + u["bn2"](u["conv2"](torch.relu(u["bn"](u["conv"](x))))))
        return self.emb_norm(self.linear(x.flatten(1)))


def test_sfnet_port(tmp_path, crops):
    net = randomise(SFNetPort(), 3)
    emb, _ = import_and_embed(tmp_path, {"backbone": net.state_dict(), "head": {"w": torch.zeros(4, 512)}},
                              crops["112x112"], ["--backbone", "sfnet20_bn", "--color", "rgb", "--std", "127.5"])
    assert np.abs(emb - port_embeddings(net, crops["112x112"], "rgb", 127.5, 127.5, "concat")).max() <= TOL


# ------------------------------------------------------------------ what does not fit
def test_bad_sources_are_one_error_line(tmp_path, capsys):
    out = str(tmp_path / "x.pt")
    net = PaperMobileFaceNet()
    torch.save(net.state_dict(), tmp_path / "mfn.pth")
    base = ["import", "--from", "pytorch", str(tmp_path / "mfn.pth"), "--out", out]
    # the insightface default (scale 2) does not fit the paper's network: the very first tensor says so
    line = error_line(capsys, base + ["--backbone", "mobilefacenet"])
    assert "'head_conv.prelu.weight' (64,)" in line and "'layers.0.layers.0.weight' (128, 3, 3, 3)" in line
    # a source that ends early names what is left without a tensor
    state = dict(list(net.state_dict().items())[:-6])
    torch.save(state, tmp_path / "short.pth")
    line = error_line(capsys, ["import", "--from", "pytorch", str(tmp_path / "short.pth"), "--out", out,
                               "--backbone", "mobilefacenet", "--backbone-option", "scale=1",
                               "--backbone-option", "embedding_dim=128"])
    assert "the source ends" in line and "'features.layers.2.weight' (128, 512)" in line
    # another architecture altogether
    assert "does not fit sphere20" in error_line(capsys, base + ["--backbone", "sphere20"])
    for argv, words in [(["--backbone", "cifar_cnn9"], "not face embeddings"),
                        (["--backbone", "mobilefacenet", "--backbone-option", "scale"], "KEY=VALUE"),
                        (["--backbone", "mobilefacenet", "--backbone-option", "widht=2"], "no option 'widht'"),
                        (["--backbone", "mobilefacenet", "--backbone-option", "input_size=[112, 96]"], "--template"),
                        ([], "needs --backbone")]:
        assert words in error_line(capsys, base + argv), argv
    torch.save({"epoch": 1, "optimizer": {"lr": torch.tensor(0.1), "step": 3}}, tmp_path / "nostate.pth")
    assert "none of state_dict" in error_line(capsys, ["import", "--from", "pytorch", str(tmp_path / "nostate.pth"),
                                                       "--backbone", "sphere20", "--out", out])
    torch.jit.save(torch.jit.trace(nn.Linear(2, 3), torch.zeros(1, 2)), str(tmp_path / "scripted.pt"))
    assert "TorchScript" in error_line(capsys, ["import", "--from", "pytorch", str(tmp_path / "scripted.pt"),
                                                "--backbone", "sphere20", "--out", out])
    assert "--backbone-option is for --from pytorch" in error_line(
        capsys, ["import", "--from", "insightface", str(tmp_path / "mfn.pth"), "--backbone-option", "scale=1",
                 "--out", out])
    assert not (tmp_path / "x.pt").exists()
