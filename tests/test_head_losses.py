"""Every option of a_softmax, cosface, arcface and softmax: the head's loss (HeadOutput.loss) and its
gradients for the embeddings, the weight rows and the bias, against float64 brute-force loops written
here from the formulas (docs/theory.md#a-softmax, #a-softmax-real-m, #cosface, #arcface,
#detached-margin), one sample and one class at a time.

Gradients: central finite differences of the brute-force loss. A detached margin is the loss whose
margin term is held at its value at the point (the definition of gradient='detached'); ``weight_gradient
='stored'`` the loss whose row norms are held at theirs. Also: OpenSphere's SphereFace (s=64, m=1.7,
hard, detached, lambda 0), insightface's CombinedMarginLoss ArcFace and OpenSphere's ArcFace, each
from its own formula.
"""
from __future__ import annotations

import math

import pytest
import torch

from sphereface_plus.heads import create_head, head_parameters, list_heads
from sphereface_plus.heads import functional as HF
from sphereface_plus.heads.base import ClassifierHead, HeadOutput

B, C, D = 3, 4, 3
EPS = 1e-6  # finite-difference step
TOL = dict(rtol=1e-6, atol=1e-7)


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def _norm(a):
    return math.sqrt(_dot(a, a))


def _ce(row, y):
    top = max(row)
    return math.log(sum(math.exp(v - top) for v in row)) + top - row[y]


def _psi(theta, m, integer):
    k = math.floor(m * theta / math.pi)
    if integer:
        k = min(k, int(m) - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


# ---------------------------------------------------------------- brute-force losses (python floats)
def a_softmax_target(cos, m, lam):
    integer = float(m).is_integer()
    c = max(-1.0, min(1.0, cos)) if integer else max(-1 + 1e-5, min(1 - 1e-5, cos))
    return (lam * cos + _psi(math.acos(c), m, integer)) / (1 + lam)


def arcface_target(cos, m, wrap, easy_margin=False):
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if easy_margin:
        return math.cos(theta + m) if cos > 0 else cos
    if wrap == "insightface":
        return math.cos(theta + m)
    if wrap == "opensphere":
        t = math.acos(max(-1 + 1e-5, min(1 - 1e-5, cos)))
        return math.cos(min(max(t + m, 1e-5), 3.14159))
    return math.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)


def brute_loss(name, kw, x, w, b, y, frozen=None):
    """The mean loss of the batch; ``frozen`` (margins per sample, row norms) holds the detached parts."""
    total = 0.0
    margins, norms = [], []
    for i in range(len(x)):
        xn = _norm(x[i])
        row = []
        for j in range(len(w)):
            wn = _norm(w[j]) if frozen is None or frozen["norms"] is None else frozen["norms"][j]
            norms.append(_norm(w[j]))
            if name == "softmax":
                row.append(_dot(x[i], w[j]) + b[j])
                continue
            cos = _dot(x[i], w[j]) / (xn * wn)
            if name == "a_softmax":
                scale = kw.get("s", 64.0) if kw.get("feature_norm") == "hard" else xn
                if j == y[i]:
                    target = a_softmax_target(cos, kw.get("m", 4), kw["lam"])
            else:
                scale = kw.get("s", 64.0)
                if j == y[i] and name == "cosface":
                    target = cos - kw.get("m", 0.35)
                elif j == y[i]:
                    target = arcface_target(cos, kw.get("m", 0.5), kw.get("wrap", "toolkit"), kw.get("easy_margin", False))
            if j == y[i]:
                margins.append(target - cos)
                if frozen is not None and frozen["margins"] is not None:
                    target = cos + frozen["margins"][i]
                row.append(scale * target)
            else:
                row.append(scale * cos)
        total += _ce(row, y[i])
    return total / len(x), margins, norms[:len(w)]


def numeric_gradients(name, kw, x, w, b, y):
    """(loss, d/dx, d/dw, d/db) of the brute-force loss, the detached parts frozen at the point."""
    loss, margins, norms = brute_loss(name, kw, x, w, b, y)
    frozen = {"margins": margins if kw.get("gradient") == "detached" else None,
              "norms": norms if kw.get("weight_gradient") == "stored" else None}

    def grad_of(tensor):
        g = [[0.0] * len(tensor[0]) for _ in tensor] if isinstance(tensor[0], list) else [0.0] * len(tensor)
        for idx in range(len(g)):
            for jdx in (range(len(g[idx])) if isinstance(g[idx], list) else [None]):
                def shifted(delta):
                    if jdx is None:
                        tensor[idx] += delta
                    else:
                        tensor[idx][jdx] += delta
                shifted(EPS)
                up = brute_loss(name, kw, x, w, b, y, frozen)[0]
                shifted(-2 * EPS)
                down = brute_loss(name, kw, x, w, b, y, frozen)[0]
                shifted(EPS)
                value = (up - down) / (2 * EPS)
                if jdx is None:
                    g[idx] = value
                else:
                    g[idx][jdx] = value
        return torch.tensor(g, dtype=torch.float64)

    return loss, grad_of(x), grad_of(w), grad_of(b)


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 2
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 3, 1])
    return x, w, b, y


def check_head(name, head_kw, brute_kw, seed=0):
    x, w, b, y = _data(seed)
    head = create_head(name, in_features=D, num_classes=C, **head_kw).double().eval()
    with torch.no_grad():
        head.weight.copy_(w)
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(b)
    xr = x.clone().requires_grad_(True)
    out = head(xr, y)
    assert isinstance(out, HeadOutput) and out.loss.dim() == 0
    out.loss.backward()
    loss, gx, gw, gb = numeric_gradients(name, brute_kw, x.tolist(), w.tolist(), b.tolist(), y.tolist())
    what = f"{name} {head_kw}"
    assert out.loss.item() == pytest.approx(loss, rel=1e-12, abs=1e-12), what
    torch.testing.assert_close(xr.grad, gx, **TOL, msg=lambda m: f"{what} embeddings: {m}")
    torch.testing.assert_close(head.weight.grad, gw, **TOL, msg=lambda m: f"{what} weight: {m}")
    if name == "softmax":
        torch.testing.assert_close(head.bias.grad, gb, **TOL, msg=lambda m: f"{what} bias: {m}")
    return out


# λ fixed (base = lambda_min = λ): an evaluation-mode forward uses λ(t) without advancing anyway
A_SOFTMAX_CASES = [
    dict(m=4, lam=0.0), dict(m=4, lam=2.5), dict(m=2, lam=0.0), dict(m=3, lam=1.0),
    dict(m=1.7, lam=0.0), dict(m=1.5, lam=3.0), dict(m=2.35, lam=0.0),
]


@pytest.mark.parametrize("case", A_SOFTMAX_CASES, ids=lambda c: f"m{c['m']}-lam{c['lam']}")
@pytest.mark.parametrize("feature_norm", ["none", "hard"])
@pytest.mark.parametrize("gradient", ["exact", "detached"])
@pytest.mark.parametrize("weight_gradient", ["normalized", "stored"])
def test_a_softmax_loss_and_gradients(case, feature_norm, gradient, weight_gradient):
    lam = case["lam"]
    head_kw = dict(m=case["m"], base=lam, lambda_min=lam, feature_norm=feature_norm, s=5.0, gradient=gradient,
                   weight_gradient=weight_gradient)
    brute_kw = dict(m=case["m"], lam=lam, feature_norm=feature_norm, s=5.0, gradient=gradient,
                    weight_gradient=weight_gradient)
    out = check_head("a_softmax", head_kw, brute_kw, seed=int(case["m"] * 10))
    assert out.terms["lambda"].item() == lam and "ce" in out.terms


@pytest.mark.parametrize("wrap", HF.ARCFACE_WRAPS)
@pytest.mark.parametrize("gradient", HF.MARGIN_GRADIENTS)
@pytest.mark.parametrize("weight_gradient", HF.WEIGHT_GRADIENTS)
@pytest.mark.parametrize("m", [0.5, 2.2])  # 2.2: most targets have θ + m > π, where the wraps differ
def test_arcface_loss_and_gradients(wrap, gradient, weight_gradient, m):
    kw = dict(s=4.0, m=m, wrap=wrap, gradient=gradient, weight_gradient=weight_gradient)
    check_head("arcface", kw, kw, seed=7)


def test_arcface_easy_margin():
    kw = dict(s=4.0, m=0.5, easy_margin=True)
    check_head("arcface", kw, kw, seed=8)


@pytest.mark.parametrize("gradient", HF.MARGIN_GRADIENTS)
@pytest.mark.parametrize("weight_gradient", HF.WEIGHT_GRADIENTS)
def test_cosface_loss_and_gradients(gradient, weight_gradient):
    kw = dict(s=6.0, m=0.35, gradient=gradient, weight_gradient=weight_gradient)
    check_head("cosface", kw, kw, seed=9)


def test_softmax_loss_and_gradients():
    check_head("softmax", {}, {}, seed=10)


def test_the_arcface_wraps_differ_where_they_should():
    """Past π - m the three rules give three values; before it, one."""
    c = torch.tensor([math.cos(0.3), math.cos(math.pi - 0.2)], dtype=torch.float64).unsqueeze(1)
    values = {wrap: HF.arcface_target(c, 0.5, wrap=wrap).squeeze(1) for wrap in HF.ARCFACE_WRAPS}
    for v in values.values():
        assert v[0].item() == pytest.approx(math.cos(0.8), abs=1e-9)
    assert values["toolkit"][1].item() == pytest.approx(math.cos(math.pi - 0.2) - 0.5 * math.sin(0.5), abs=1e-12)
    assert values["insightface"][1].item() == pytest.approx(math.cos(math.pi + 0.3), abs=1e-12)
    assert values["opensphere"][1].item() == pytest.approx(math.cos(3.14159), abs=1e-12)


# ---------------------------------------------------------------- the peers' formulas
def _opensphere_sphereface(x, w, y, s, m):
    """OpenSphere main model/head/sphereface.py, from its formula: W renormalised in place and used as is,
    cos = x̂·w, θ = arccos(clamp(cos, ±(1 - 1e-5))), k = ⌊mθ/π⌋, φ = (-1)^k cos(mθ) - 2k, logits
    s (cos + d) with d = φ_y - cos_y on the target only and computed without gradient."""
    total = 0.0
    for i in range(len(x)):
        xn = _norm(x[i])
        row = []
        for j in range(len(w)):
            cos = _dot(x[i], w[j]) / xn
            if j == y[i]:
                theta = math.acos(max(-1 + 1e-5, min(1 - 1e-5, cos)))
                k = math.floor(m * theta / math.pi)
                row.append(s * ((-1) ** k * math.cos(m * theta) - 2 * k))
            else:
                row.append(s * cos)
        total += _ce(row, y[i])
    return total / len(x)


def test_a_softmax_equals_opensphere_sphereface():
    """s=64, m=1.7, feature_norm=hard, gradient=detached, λ = 0 and (OpenSphere differentiates its renormalised
    rows as they are) weight_gradient=stored: OpenSphere main's SphereFace, loss and gradients."""
    x, w, _, y = _data(11)
    w = w / w.norm(dim=1, keepdim=True)  # OpenSphere renormalises the stored rows before the forward
    head = create_head("a_softmax", in_features=D, num_classes=C, m=1.7, s=64.0, feature_norm="hard",
                       gradient="detached", base=0.0, lambda_min=0.0, weight_gradient="stored").double().train()
    with torch.no_grad():
        head.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    out = head(xr, y)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(_opensphere_sphereface(x.tolist(), w.tolist(), y.tolist(), 64.0, 1.7),
                                            rel=1e-12)
    # OpenSphere's backward sees s cos θ: the gradient of CE(s x̂·w + d) with d constant
    d = []
    for i in range(B):
        c = float(torch.nn.functional.normalize(x[i], dim=0) @ w[y[i]])
        theta = math.acos(max(-1 + 1e-5, min(1 - 1e-5, c)))
        k = math.floor(1.7 * theta / math.pi)
        d.append((-1) ** k * math.cos(1.7 * theta) - 2 * k - c)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits = 64.0 * (torch.nn.functional.normalize(xs, dim=1) @ ws.t())
    logits = logits + 64.0 * torch.zeros_like(logits).scatter(1, y.unsqueeze(1), torch.tensor(d, dtype=torch.float64).unsqueeze(1))
    torch.nn.functional.cross_entropy(logits, y).backward()
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ws.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("peer", ["insightface", "opensphere"])
def test_arcface_detached_equals_the_peers(peer):
    """insightface arcface_torch CombinedMarginLoss (m1=1, m3=0: arccos, + m, cos under no_grad, on the
    normalised weight in the graph) and OpenSphere's ArcFace (θ + m clamped, renormalised rows used as they are)."""
    x, w, _, y = _data(12)
    w = w / w.norm(dim=1, keepdim=True)
    s, m = 64.0, 2.0  # a large m: some targets pass π - m
    weight_gradient = "normalized" if peer == "insightface" else "stored"
    head = create_head("arcface", in_features=D, num_classes=C, s=s, m=m, gradient="detached", wrap=peer,
                       weight_gradient=weight_gradient).double()
    with torch.no_grad():
        head.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    out = head(xr, y)
    out.loss.backward()
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    w_used = torch.nn.functional.normalize(ws, dim=1) if peer == "insightface" else ws
    cos = (torch.nn.functional.normalize(xs, dim=1) @ w_used.t()).clamp(-1, 1)
    target = []
    for i in range(B):
        c = float(cos.detach()[i, y[i]])
        if peer == "insightface":
            target.append(math.cos(math.acos(c) + m))
        else:
            target.append(math.cos(min(max(math.acos(max(-1 + 1e-5, min(1 - 1e-5, c))) + m, 1e-5), 3.14159)))
    d = torch.tensor(target, dtype=torch.float64) - cos.detach().gather(1, y.unsqueeze(1)).squeeze(1)
    logits = s * (cos + torch.zeros_like(cos).scatter(1, y.unsqueeze(1), d.unsqueeze(1)))
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ws.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the contract
def test_integer_m_keeps_the_chebyshev_path_and_real_m_agrees_with_it():
    x, w, _, y = _data(13)
    for m in (1, 2, 3, 4):
        ints = HF.a_softmax_logits(x, w, y, m=m, lam=1.0)
        assert torch.equal(HF.a_softmax_logits(x, w, y, m=float(m), lam=1.0), ints)  # 4.0 is the integer 4
        # psi_angular at the same integer m (no clamp at these angles)
        c = torch.linspace(-0.99, 0.99, 101, dtype=torch.float64)
        torch.testing.assert_close(HF.psi_angular(c, m + 0.0), HF.psi(c, m), rtol=0, atol=1e-12)


def test_psi_angular_is_continuous_and_decreasing():
    # inside the arccos clamp (cos θ within 1 - 1e-5 of ±1, θ < 0.0045 from 0 or π, ψ is constant there)
    theta = torch.linspace(0.01, math.pi - 0.01, 20001, dtype=torch.float64)
    for m in (1.35, 1.7, 2.5, 3.9):
        v = HF.psi_angular(torch.cos(theta), m)
        assert torch.all(v[1:] < v[:-1]), m
        assert (v[1:] - v[:-1]).abs().max() < 1e-2, m  # no jumps at the joints kπ/m


@pytest.mark.parametrize("name", list_heads())
def test_every_head_follows_the_contract(name):
    head = create_head(name, in_features=5, num_classes=6)
    assert isinstance(head, ClassifierHead) and head.weight.shape == (6, 5)
    assert head.loss_kind in ("softmax", "binary")
    named = dict(head.named_parameters())
    assert set(named) <= set(head.row_parameters) | set(head.shared_parameters), name
    for p in head.row_parameters:
        if p in named:
            assert named[p].shape[0] == 6
    x = torch.randn(4, 5)
    inference = head(x)
    assert inference.loss is None and torch.equal(inference.logits, head.logits(x))
    for pname, p in head_parameters(name).items():  # every setting has a default: a head builds from its name
        assert p.default is not p.empty, (name, pname)


def test_init_rows_is_the_same_for_a_whole_head_and_its_blocks():
    head = create_head("cosface", in_features=4, num_classes=10)
    head.init_rows_(seed=3)
    block = create_head("cosface", in_features=4, num_classes=4)
    block.init_rows_(seed=3, start=5, num_classes=10)
    assert torch.equal(block.weight, head.weight[5:9])
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(10))


def test_bad_options_are_value_errors_naming_the_choices():
    for name, kw, match in [("a_softmax", dict(gradient="approx"), "exact, caffe, detached"),
                            ("a_softmax", dict(feature_norm="soft"), "none, hard"),
                            ("a_softmax", dict(m=1.7, gradient="caffe"), "integer m"),
                            ("arcface", dict(wrap="clamp"), "toolkit, insightface, opensphere"),
                            ("cosface", dict(gradient="caffe"), "exact, detached"),
                            ("arcface", dict(weight_gradient="raw"), "normalized, stored")]:
        with pytest.raises(ValueError, match=match):
            create_head(name, in_features=4, num_classes=3, **kw)
