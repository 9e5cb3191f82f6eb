"""Backbones: shapes of docs/theory.md#sphere-backbones and docs/theory.md#cifar-setup, gradients, the
original initialisation, the registry."""
import math

import pytest
import torch
import torch.nn as nn

from sphereface_plus import create_backbone, list_backbones
from sphereface_plus.models.sphere import ResidualUnit, SphereStage

SPHERE_UNITS = {
    "sphere4": (0, 0, 0, 0),
    "sphere10": (0, 1, 2, 0),
    "sphere20": (1, 2, 4, 1),
    "sphere36": (2, 4, 8, 2),
    "sphere64": (3, 8, 16, 3),
}


def test_registry_contents():
    assert set(list_backbones()) >= set(SPHERE_UNITS) | {"cifar_cnn9"}


def test_unknown_backbone_lists_choices():
    with pytest.raises(KeyError) as info:
        create_backbone("sphere21")
    msg = str(info.value)
    for name in list_backbones():
        assert name in msg
    assert "sphere20" in msg


@pytest.mark.parametrize("name", [n for n in list_backbones() if n.startswith("sphere") or n == "cifar_cnn9"])
def test_every_backbone_forward_backward(name):
    """A single-sample training step: output shape, finite values, a non-zero gradient for every parameter.
    (The SphereFace and CIFAR families; every registered backbone is covered by tests/test_backbones.py.)"""
    torch.manual_seed(0)
    model = create_backbone(name)
    model.train()
    h, w = model.input_size
    out = model(torch.randn(1, 3, h, w))
    expected = 512 if name.startswith("sphere") else model.num_classes
    assert out.shape == (1, expected)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", ["sphere4", "cifar_cnn9"])
def test_batch_rows_are_independent_in_eval(name):
    """In eval mode each row of a batch of 3 equals the single-sample output (no cross-sample mixing)."""
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    h, w = model.input_size
    x = torch.randn(3, 3, h, w)
    with torch.inference_mode():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, units", sorted(SPHERE_UNITS.items()))
def test_sphere_layer_counts(name, units):
    model = create_backbone(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 + 2 * sum(units)  # the number in the name: sphere20 has 20 conv layers
    assert int(name[len("sphere"):]) == len(convs)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in model.modules())
    assert [len(getattr(model, f"layer{i}").units) for i in range(1, 5)] == list(units)


@pytest.mark.parametrize("input_size, final", [((112, 96), (7, 6)), ((112, 112), (7, 7))])
def test_sphere20_shapes(input_size, final):
    model = create_backbone("sphere20", input_size=input_size)
    x = torch.randn(1, 3, *input_size)
    sizes = []
    h = x
    with torch.no_grad():
        for i in range(1, 5):
            h = getattr(model, f"layer{i}")(h)
            sizes.append(tuple(h.shape[1:]))
    H, W = input_size
    assert sizes == [
        (64, H // 2, W // 2),
        (128, H // 4, W // 4),
        (256, H // 8, W // 8),
        (512, *final),
    ]
    assert model.fc5.in_features == 512 * final[0] * final[1]
    assert model.fc5.out_features == 512
    for stage, c in zip((model.layer1, model.layer2, model.layer3, model.layer4), (64, 128, 256, 512)):
        assert stage.conv.stride == (2, 2) and stage.conv.kernel_size == (3, 3) and stage.conv.bias is not None
        assert stage.conv.out_channels == c and stage.prelu.weight.shape == (c,)


def test_sphere_rejects_wrong_input():
    with pytest.raises(ValueError, match="112"):
        create_backbone("sphere20", input_size=(100, 100))
    model = create_backbone("sphere4", input_size=(112, 96))
    with pytest.raises(ValueError, match="112 x 96"):
        model(torch.randn(1, 3, 112, 112))


def test_sphere_original_init():
    torch.manual_seed(0)
    model = create_backbone("sphere20")
    for m in model.modules():
        if isinstance(m, SphereStage):
            w = m.conv.weight
            fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform
            assert w.abs().max() <= bound
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
            assert torch.all(m.conv.bias == 0)
            assert torch.all(m.prelu.weight == 0.25)
        elif isinstance(m, ResidualUnit):
            for conv in (m.conv1, m.conv2):
                assert conv.bias is None  # Caffe's fixed (lr_mult 0) zero bias
                assert abs(conv.weight.std().item() - 0.01) < 0.001
                assert abs(conv.weight.mean().item()) < 0.001
    bound = math.sqrt(6.0 / (model.fc5.in_features + model.fc5.out_features))
    assert model.fc5.weight.abs().max() <= bound and torch.all(model.fc5.bias == 0)


def test_cifar_structure_and_init():
    torch.manual_seed(0)
    model = create_backbone("cifar_cnn9", num_classes=10)
    convs = {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert list(convs) == [f"conv{s}_{j}" for s in (1, 2, 3) for j in (1, 2, 3)] + ["fc6", "score"]
    assert all(m.bias is None for m in convs.values())
    assert [convs[f"conv{s}_1"].out_channels for s in (1, 2, 3)] == [64, 128, 256]
    assert convs["fc6"].kernel_size == (4, 4) and convs["fc6"].out_channels == 256
    assert convs["score"].kernel_size == (1, 1) and convs["score"].out_channels == 10
    # He-normal, fan-in
    for name in ("conv3_2", "fc6"):
        w = convs[name].weight
        fan_in = w[0].numel()
        assert abs(w.std().item() - math.sqrt(2.0 / fan_in)) < 0.03 * math.sqrt(2.0 / fan_in)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 9 and all(bn.eps == 1e-3 for bn in bns)


def test_cifar_bn_moving_average_is_0999():
    """TF's moving average 0.999: running <- 0.999 running + 0.001 batch (docs/theory.md#cifar-setup)."""
    torch.manual_seed(0)
    model = create_backbone("cifar_cnn9", num_classes=10).train()
    x = torch.randn(4, 3, 32, 32) * 2 + 3
    bn = model.features.bn1_1
    with torch.no_grad():
        batch_mean = model.features.conv1_1(x).mean(dim=(0, 2, 3))
        model(x)
    torch.testing.assert_close(bn.running_mean, 0.001 * batch_mean, rtol=1e-4, atol=1e-7)


def test_cifar_rejects_wrong_input():
    model = create_backbone("cifar_cnn9")
    with pytest.raises(ValueError, match="32 x 32"):
        model(torch.randn(2, 3, 28, 28))


def test_sphere_embedding_dim_and_112x112():
    model = create_backbone("sphere4", input_size=(112, 112), embedding_dim=128)
    assert model.fc5.in_features == 512 * 7 * 7
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 128)
