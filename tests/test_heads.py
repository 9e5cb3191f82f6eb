"""Heads: ψ properties, A-Softmax / CosFace / ArcFace logits against arccos-based loops, the λ schedule."""
import io
import math

import pytest
import torch

from sphereface_plus import a_softmax_logits, create_head, list_heads, psi
from sphereface_plus.heads import a_softmax_lambda
from sphereface_plus.heads import functional as HF


def ref_psi(theta, m):
    """The piecewise definition with θ itself (docs/theory.md#a-softmax-psi)."""
    k = min(int(math.floor(m * theta / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


# ---------------------------------------------------------------- ψ
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_endpoints_and_reference(m):
    ends = psi(torch.tensor([1.0, -1.0], dtype=torch.float64), m)
    assert ends[0].item() == pytest.approx(1.0, abs=1e-12)
    assert ends[1].item() == pytest.approx(-(2 * m - 1), abs=1e-12)
    theta = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(m)) * math.pi
    got = psi(torch.cos(theta), m)
    expected = torch.tensor([ref_psi(t, m) for t in theta.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_continuous_and_decreasing(m):
    for k in range(1, m):
        edge = k * math.pi / m
        left = psi(torch.tensor(math.cos(edge - 1e-9), dtype=torch.float64), m).item()
        right = psi(torch.tensor(math.cos(edge + 1e-9), dtype=torch.float64), m).item()
        at = psi(torch.tensor(math.cos(edge), dtype=torch.float64), m).item()
        assert left == pytest.approx(-(2 * k - 1), abs=1e-6)  # the value at the joint: (-1)^k cos(kπ) - 2k
        assert abs(left - right) < 1e-6 and abs(at - left) < 1e-6
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    values = psi(torch.cos(theta), m)
    assert torch.all(values[1:] < values[:-1])


def test_psi_rejects_bad_m():
    for m in (0, 5, 2.5, True):
        with pytest.raises(ValueError, match="1, 2, 3, 4"):
            psi(torch.zeros(3), m)
    for m in (6, 0.5, True):  # a real m is fine for the head (psi_angular), within [1, 4]
        with pytest.raises(ValueError, match=r"\[1, 4\]"):
            create_head("a_softmax", in_features=4, num_classes=3, m=m)


# ---------------------------------------------------------------- A-Softmax logits
def ref_a_softmax(x, w, labels, m, lam):
    out = []
    for b, xb in enumerate(x.tolist()):
        xn = math.sqrt(sum(v * v for v in xb))
        row = []
        for j, wj in enumerate(w.tolist()):
            wn = math.sqrt(sum(v * v for v in wj))
            cos = sum(a * c for a, c in zip(xb, wj)) / (xn * wn)
            if j == labels[b]:
                theta = math.acos(max(-1.0, min(1.0, cos)))
                row.append((lam * xn * cos + xn * ref_psi(theta, m)) / (1 + lam))
            else:
                row.append(xn * cos)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 5.0, 1000.0])
def test_a_softmax_logits_reference(m, lam):
    g = torch.Generator().manual_seed(10 * m)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g) * 3
    w = torch.randn(7, 5, dtype=torch.float64, generator=g)
    labels = torch.tensor([0, 6, 3, 3, 1, 5])
    got = a_softmax_logits(x, w, labels, m=m, lam=lam)
    torch.testing.assert_close(got, ref_a_softmax(x, w, labels.tolist(), m, lam), rtol=1e-10, atol=1e-10)
    # without labels: the margin-free ‖x‖ cos θ
    torch.testing.assert_close(a_softmax_logits(x, w, None, m=m), x @ (w / w.norm(dim=1, keepdim=True)).t())


def test_a_softmax_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    labels = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda a, b: a_softmax_logits(a, b, labels, m=4, lam=2.0), (x, w))


# ---------------------------------------------------------------- λ schedule and the head's counter
def test_lambda_schedule_values():
    assert a_softmax_lambda(0) == 1000.0
    assert a_softmax_lambda(1) == pytest.approx(1000 / 1.12, rel=1e-12)
    assert a_softmax_lambda(100) == pytest.approx(1000 / 13, rel=1e-12)
    # SphereFace values reach λ_min = 5 after about 1,658 iterations (docs/theory.md#lambda-schedule)
    assert a_softmax_lambda(1658) == pytest.approx(1000 / (1 + 0.12 * 1658), rel=1e-12)
    assert a_softmax_lambda(1658) > 5.0
    assert a_softmax_lambda(1659) == 5.0 and a_softmax_lambda(10**6) == 5.0
    assert a_softmax_lambda(10, base=100, gamma=0.5, power=2, lambda_min=0) == pytest.approx(100 / 36)


def test_a_softmax_head_counter_and_state_dict():
    torch.manual_seed(0)
    head = create_head("a_softmax", in_features=8, num_classes=5, m=4, base=1000.0, gamma=0.12, power=1.0,
                       lambda_min=5.0)
    assert head.weight.shape == (5, 8) and isinstance(head.weight, torch.nn.Parameter)
    assert head.current_lambda == 1000.0
    x, y = torch.randn(3, 8), torch.tensor([0, 4, 2])
    head.train()
    for t in range(1, 4):
        out = head(x, y)
        logits = out.logits
        assert out.terms["lambda"].item() == head.current_lambda  # the schedule's value in force, reported
        assert int(head.iteration) == t
        assert head.current_lambda == pytest.approx(1000 / (1 + 0.12 * t))
        torch.testing.assert_close(logits, a_softmax_logits(x, head.weight, y, m=4, lam=head.current_lambda))
    # the stored rows are kept at unit length, as in the Caffe layer
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(5))
    head.eval()
    head(x, y)
    assert int(head.iteration) == 3  # evaluation does not advance the schedule
    assert "iteration" in head.state_dict()

    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh = create_head("a_softmax", in_features=8, num_classes=5)
    assert int(fresh.iteration) == 0
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert int(fresh.iteration) == 3 and fresh.current_lambda == head.current_lambda
    fresh.eval()
    torch.testing.assert_close(fresh(x, y).logits, head(x, y).logits)


# ---------------------------------------------------------------- other heads
def test_cosface_and_arcface_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g)
    labels = [1, 0, 2, 2, 1]
    for name, s, m in (("cosface", 30.0, 0.35), ("arcface", 64.0, 0.5)):
        head = create_head(name, in_features=4, num_classes=3, s=s, m=m).double()
        got = head(x, torch.tensor(labels)).logits
        w = head.weight.detach()
        expected = torch.empty(5, 3, dtype=torch.float64)
        for b in range(5):
            for j in range(3):
                cos = (x[b] @ w[j] / (x[b].norm() * w[j].norm())).item()
                if j == labels[b]:
                    theta = math.acos(cos)
                    if name == "cosface":
                        cos = cos - m
                    elif theta + m <= math.pi:
                        cos = math.cos(theta + m)
                    else:  # ArcFace's linear continuation beyond π
                        cos = cos - math.sin(math.pi - m) * m
                expected[b, j] = s * cos
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_arcface_monotonic_in_angle():
    """The target logit decreases with θ over the whole [0, π], also past π - m."""
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    x = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    head = create_head("arcface", in_features=2, num_classes=2, s=1.0, m=0.5).double()
    with torch.no_grad():
        head.weight.copy_(torch.cat([w, -w]))
    target = head(x, torch.zeros(2001, dtype=torch.long)).logits[:, 0]
    assert torch.all(target[1:] < target[:-1])


def test_softmax_head_is_linear():
    head = create_head("softmax", in_features=6, num_classes=4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(head(x, torch.tensor([0, 1, 3])).logits, x @ head.weight.t() + head.bias)


@pytest.mark.parametrize("name", list_heads())
def test_every_head(name):
    torch.manual_seed(0)
    head = create_head(name, in_features=16, num_classes=7).train()
    assert head.weight.shape == (7, 16)
    x = torch.randn(2, 16, requires_grad=True)
    out = head(x, torch.tensor([3, 6]))
    assert out.logits.shape == (2, 7) and torch.isfinite(out.logits).all()
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(v.shape == () and not v.requires_grad for v in out.terms.values())
    out.loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="label 7 is outside"):
        head(torch.randn(2, 16), torch.tensor([0, 7]))


def test_unknown_head_lists_choices():
    with pytest.raises(KeyError) as info:
        create_head("sphereface", in_features=4, num_classes=3)
    for name in ("a_softmax", "arcface", "cosface", "softmax"):
        assert name in str(info.value)


@pytest.mark.parametrize("fn, kw", [(HF.a_softmax_logits, dict(m=4, lam=2.5)), (HF.cosface_logits, dict(s=30.0, m=0.35)),
                                    (HF.arcface_logits, dict(s=30.0, m=0.5))])
def test_row_blocks_with_no_target_labels_equal_the_full_classifier(fn, kw):
    # A row-sharded classifier calls the margin functions on a block of rows [lo, hi) with the labels
    # shifted into the block and NO_TARGET elsewhere: the blocks side by side must be the full logits,
    # with the same gradients for the embeddings and every row.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 3, 9, 5, 6, 1, 8, 4])
    full = fn(x, w, y, **kw)
    (full * torch.linspace(-1, 1, full.numel(), dtype=torch.float64).view_as(full)).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    blocks = []
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        local = torch.where((y >= lo) & (y < hi), y - lo, torch.full_like(y, HF.NO_TARGET))
        blocks.append(fn(x, w[lo:hi], local, **kw))
    joined = torch.cat(blocks, dim=1)
    torch.testing.assert_close(joined, full, rtol=0, atol=1e-12)
    (joined * torch.linspace(-1, 1, joined.numel(), dtype=torch.float64).view_as(joined)).sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, gw, rtol=0, atol=1e-12)


def test_heads_reject_no_target_labels():
    head = create_head("a_softmax", in_features=4, num_classes=3)
    with pytest.raises(ValueError, match="label -1 is outside"):
        head(torch.randn(2, 4), torch.tensor([0, -1]))


def test_a_head_is_registered_as_its_class_and_its_settings_are_its_signature():
    """A head's settings are its constructor's named keyword arguments (no return annotation, no builder);
    a constructor that hides them behind **kwargs is refused when it is registered."""
    import inspect

    from sphereface_plus.heads import HEADS, ClassifierHead, head_parameters, register_head

    for name in HEADS.names():
        cls = HEADS.get(name)
        assert isinstance(cls, type) and issubclass(cls, ClassifierHead), name
        params = [p for p in inspect.signature(cls).parameters if p not in ("in_features", "num_classes")]
        assert list(head_parameters(name)) == params, name

    class Hidden(ClassifierHead):
        def __init__(self, in_features, num_classes, **kwargs):
            super().__init__(in_features, num_classes)

    with pytest.raises(TypeError, match="named keyword arguments"):
        register_head("hidden_settings")(Hidden)
    assert "hidden_settings" not in HEADS
