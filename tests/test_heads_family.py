"""The newer heads (sphereface_r, sphereface2, adaface, magface) against float64 loops written from
the formulas (per sample, per class, 0-dim tensors, so autograd of the loop is the reference gradient),
the SphereFace2 bias against its defining property, schedules and state round trips.

The loop references follow docs/theory.md (#sphereface-r, #sphereface2, #adaface, #magface): detached
margin offsets are computed with ``math`` on Python floats (constants to autograd), exactly as the
papers' code detaches them.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from sphereface_plus.heads import create_head
from sphereface_plus.heads.sphereface2 import sphereface2_bias_init

B, C, D = 5, 6, 4


def _data(seed, scale=3.0, unit_rows=True, norms=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, dtype=torch.float64, generator=g) * scale
    if norms is not None:  # put the feature norms inside a given interval
        lo, hi = norms
        x = F.normalize(x, dim=1) * (lo + (hi - lo) * torch.rand(B, 1, dtype=torch.float64, generator=g))
    w = torch.randn(C, D, dtype=torch.float64, generator=g)
    if unit_rows:
        w = F.normalize(w, dim=1)
    else:
        w = w * 1.7
    y = torch.tensor([0, 5, 2, 2, 3])
    return x, w, y


def _head(name, w, **kw):
    head = create_head(name, in_features=D, num_classes=C, **kw).double()
    with torch.no_grad():
        head.weight.copy_(w)
    return head.train()


def _head_loss(head, x, y):
    """The contract's loss, ``loss_weight * main + aux`` (ClassifierHead.forward), kept in float64."""
    head.begin_forward()
    logits = head.margin_logits(x, y)
    if head.loss_kind == "softmax":
        main = F.cross_entropy(logits, y)
    else:
        main = head.binary_loss_terms(logits, y).sum(dim=1).mean()
    aux, _ = head.aux_loss(x)
    return head.loss_weight * main + aux


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def _ce(logits, target):
    """Cross-entropy of one sample from a list of 0-dim logits."""
    z = torch.stack(logits)
    return torch.logsumexp(z, 0) - z[target]


def _cos(xb, wj, exact_w):
    """cos θ = x · ŵ / |x| with ŵ = w / |w| in the graph (exact) or w as stored (OpenSphere)."""
    xn = torch.sqrt((xb * xb).sum())
    wn = torch.sqrt((wj * wj).sum()) if exact_w else 1.0
    return (xb * wj).sum() / (xn * wn), xn


# ---------------------------------------------------------------- SphereFace-R
def _sfr_phi(c, is_target, m, version, lib):
    """φ of one column from the paper's definitions; ``lib`` is math (detached) or torch (exact)."""
    th = lib.acos(min(max(c, -1 + 1e-5), 1 - 1e-5)) if lib is math else torch.acos(c.clamp(-1 + 1e-5, 1 - 1e-5))
    mt = m * th if is_target else th
    if version == "v0":
        k = math.floor((mt.item() if torch.is_tensor(mt) else mt) / math.pi)
        return (-1) ** k * lib.cos(mt) - 2 * k
    if version == "v1":
        return lib.cos(min(max(mt, 1e-5), 3.14159)) if lib is math else torch.cos(mt.clamp(1e-5, 3.14159))
    return lib.cos(mt / m)


def ref_sphereface_r(x, w, y, version, norm, s, m, lw, t, gradient):
    ces, norm_terms = [], []
    for b in range(B):
        logits = []
        for j in range(C):
            c, xn = _cos(x[b], w[j], exact_w=False)
            tgt = j == int(y[b])
            if gradient == "detached":
                val = c + (_sfr_phi(c.item(), tgt, m, version, math) - c.item())
            else:
                val = _sfr_phi(c, tgt, m, version, torch)
            logits.append((s if norm == "hard" else xn) * val)
        ces.append(_ce(logits, int(y[b])))
        norm_terms.append(torch.abs(xn - s))
    loss = lw / s * torch.stack(ces).mean()
    if norm == "soft":
        loss = loss + t * torch.stack(norm_terms).mean()
    return loss


@pytest.mark.parametrize("gradient", ["detached", "exact"])
@pytest.mark.parametrize("norm", ["hard", "soft"])
@pytest.mark.parametrize("version", ["v0", "v1", "v2"])
def test_sphereface_r_loss_and_gradients_match_the_loop(version, norm, gradient):
    x, w, y = _data(1 + len(version + norm + gradient), scale=4.0)
    m = 1.7 if version == "v0" else 1.4  # v0 with k up to 1 (m θ > π for θ > 1.85)
    kw = dict(version=version, norm=norm, s=30.0, m=m, lw=50.0, t=0.01, gradient=gradient)
    head = _head("sphereface_r", w, **kw)
    xa = x.clone().requires_grad_(True)
    loss = _head_loss(head, xa, y)
    gx, gw = _grads(loss, xa, head.weight)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = ref_sphereface_r(xr, wr, y, version, norm, 30.0, m, 50.0, 0.01, gradient)
    rgx, rgw = _grads(ref, xr, wr)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, rgw, rtol=1e-9, atol=1e-11)


def test_sphereface_r_v0_reaches_k_1_and_its_forward_is_the_contract():
    x, w, y = _data(7, scale=4.0)
    head = _head("sphereface_r", w, m=1.7)
    cos = F.normalize(x, dim=1) @ w.t()
    theta_y = torch.acos(cos.gather(1, y.unsqueeze(1)))
    assert bool((1.7 * theta_y > math.pi).any()) and bool((1.7 * theta_y < math.pi).any())  # both branches of k
    out = head.float()(x.float(), y)
    head2 = _head("sphereface_r", w, m=1.7)
    torch.testing.assert_close(out.loss.double(), _head_loss(head2, x, y), rtol=1e-5, atol=1e-5)
    assert set(out.terms) == {"ce", "m"} and out.logits.shape == (B, C)


def test_sphereface_r_defaults_are_opensphere_v0s():
    hard = create_head("sphereface_r", in_features=D, num_classes=C)
    soft = create_head("sphereface_r", in_features=D, num_classes=C, norm="soft")
    assert (hard.version, hard.s, hard.m, hard.dm, hard.lw, hard.steps) == ("v0", 30.0, 1.5, 0.0, 50.0, [])
    assert (soft.s, soft.m, soft.dm, soft.t, soft.lw) == (30.0, 1.0, 1.5, 0.01, 50.0)
    assert hard.loss_weight == pytest.approx(50.0 / 30.0)
    with pytest.raises(ValueError, match="v0, v1, v2"):
        create_head("sphereface_r", in_features=D, num_classes=C, version="v3")
    with pytest.raises(ValueError, match="hard, soft"):
        create_head("sphereface_r", in_features=D, num_classes=C, norm="none")


def test_sphereface_r_m_schedule_is_checkpointed_head_state():
    x, w, y = _data(3)
    head = _head("sphereface_r", w, norm="soft", m=1.0, dm=1.5, steps=[2, 4])
    seen = []
    for _ in range(5):
        out = head(x, y)
        seen.append(float(out.terms["m"]))
    # OpenSphere_v0 SphereFaceR_S: iter += 1, then m = 1 + dm * #{step < iter}
    assert seen == [1.0, 1.0, 2.5, 2.5, 4.0]
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh = _head("sphereface_r", torch.zeros(C, D, dtype=torch.float64), norm="soft", m=1.0, dm=1.5, steps=[2, 4])
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert int(fresh.iteration) == 5 and fresh.current_m == 4.0
    torch.testing.assert_close(fresh(x, y).loss, head(x, y).loss, rtol=0, atol=0)
    head.eval()
    head(x, y)  # evaluation forwards do not advance the schedule
    assert int(head.iteration) == 6


# ---------------------------------------------------------------- SphereFace2
def _g(c, t):
    return 2.0 * ((c + 1.0) / 2.0) ** t - 1.0


def _sf2_value(c, is_target, variant, m, t, lib):
    if variant == "C":
        return _g(c, t) - m if is_target else _g(c, t) + m
    if lib is math:
        th = math.acos(min(max(c, -1 + 1e-5), 1 - 1e-5))
    else:
        th = torch.acos(c.clamp(-1 + 1e-5, 1 - 1e-5))
    if is_target:
        th = th + m if variant == "A" else th * m
    th = min(max(th, 1e-5), 3.14159) if lib is math else th.clamp(1e-5, 3.14159)
    return _g(lib.cos(th), t)


def _softplus(z):
    return torch.log1p(torch.exp(z))


def ref_sphereface2(x, w, bias, y, variant, lam, r, m, t, lw, gradient):
    per_sample = []
    for b in range(B):
        terms = []
        for j in range(C):
            c, _ = _cos(x[b], w[j], exact_w=False)
            tgt = j == int(y[b])
            if gradient == "detached":
                val = c + (_sf2_value(c.item(), tgt, variant, m, t, math) - c.item())
            else:
                val = _sf2_value(c, tgt, variant, m, t, torch)
            z = r * val + bias
            terms.append(lam * _softplus(-z) if tgt else (1 - lam) * _softplus(z))
        per_sample.append(torch.stack(terms).sum())
    return lw / r * torch.stack(per_sample).mean()


@pytest.mark.parametrize("gradient", ["detached", "exact"])
@pytest.mark.parametrize("variant", ["C", "A", "M"])
def test_sphereface2_loss_and_gradients_match_the_loop(variant, gradient):
    x, w, y = _data(11 + len(variant + gradient), scale=2.0)
    m = {"C": 0.4, "A": 0.5, "M": 1.7}[variant]
    head = _head("sphereface2", w, variant=variant, lam=0.7, r=40.0, t=3.0, lw=10.0, gradient=gradient)
    assert head.m == m  # the variant's own default margin
    with torch.no_grad():
        head.bias.fill_(-7.5)  # a value where both softplus branches matter
    xa = x.clone().requires_grad_(True)
    loss = _head_loss(head, xa, y)
    gx, gw, gb = _grads(loss, xa, head.weight, head.bias)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    br = torch.tensor(-7.5, dtype=torch.float64, requires_grad=True)
    ref = ref_sphereface2(xr, wr, br, y, variant, 0.7, 40.0, m, 3.0, 10.0, gradient)
    rgx, rgw, rgb = _grads(ref, xr, wr, br)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, rgw, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gb.reshape(()), rgb, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", ["C", "A", "M"])
def test_sphereface2_bias_starts_where_the_loss_is_flat_at_right_angles(variant):
    """Every angle π/2 (x orthogonal to every class row): the initial bias is the root of dL/db (the loop's
    derivative), found here by bisection, and the head's own autograd gives dL/db = 0 there."""
    num_classes, dim = 10, 11
    w = torch.eye(num_classes, dim, dtype=torch.float64)
    x = torch.zeros(3, dim, dtype=torch.float64)
    x[:, -1] = torch.tensor([1.0, 2.0, 5.0])
    y = torch.tensor([0, 4, 9])
    m = {"C": 0.4, "A": 0.5, "M": 1.7}[variant]
    lam, r, t = 0.7, 40.0, 3.0

    def dloss_db(b):  # one sample's derivative, from the formula: every sample is alike at θ = π/2
        ay, ai = r * _sf2_value(0.0, True, variant, m, t, math), r * _sf2_value(0.0, False, variant, m, t, math)
        sig = lambda v: 1.0 / (1.0 + math.exp(-v))
        return -lam * sig(-(ay + b)) + (1 - lam) * (num_classes - 1) * sig(ai + b)

    lo, hi = -200.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dloss_db(mid) < 0 else (lo, mid)
    assert sphereface2_bias_init(num_classes, lam, r, m, t, variant) == pytest.approx(lo, abs=1e-9)
    head = create_head("sphereface2", in_features=dim, num_classes=num_classes, variant=variant)
    assert head.bias.item() == pytest.approx(lo, rel=1e-7)  # a float32 parameter
    head = head.double()
    head.reset_parameters()  # again, in float64
    assert head.bias.item() == pytest.approx(lo, abs=1e-9)
    with torch.no_grad():
        head.weight.copy_(w)
    (gb,) = _grads(_head_loss(head, x, y), head.bias)
    assert abs(float(gb)) < 1e-9
    # the bias of a row block is the whole classifier's: init_rows_ takes the total number of classes
    block = create_head("sphereface2", in_features=dim, num_classes=4, variant=variant)
    block.init_rows_(seed=0, start=4, num_classes=num_classes)
    assert block.bias.item() == pytest.approx(lo, abs=1e-5)


def test_sphereface2_row_blocks_add_up_and_inference_has_no_bias():
    x, w, y = _data(5)
    head = _head("sphereface2", w)
    whole = head.binary_loss_terms(head.margin_logits(x, y), y)
    parts = []
    for lo, hi in ((0, 2), (2, 6)):
        block = create_head("sphereface2", in_features=D, num_classes=hi - lo).double()
        block.row_block = True
        with torch.no_grad():
            block.weight.copy_(w[lo:hi])
            block.bias.copy_(head.bias)
        local = torch.where((y >= lo) & (y < hi), y - lo, torch.full_like(y, -1))
        parts.append(block.binary_loss_terms(block.margin_logits(x, local), local))
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.logits(x), 40.0 * F.normalize(x, dim=1) @ w.t(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- AdaFace
def ref_adaface(x, w, y, m, h, s, t_alpha, mean0=20.0, std0=100.0):
    norms = [min(max(math.sqrt(sum(v * v for v in row)), 0.001), 100.0) for row in x.tolist()]
    bm = sum(norms) / len(norms)
    bs = math.sqrt(sum((n - bm) ** 2 for n in norms) / (len(norms) - 1))
    mu = bm * t_alpha + (1 - t_alpha) * mean0
    sd = bs * t_alpha + (1 - t_alpha) * std0
    ces = []
    eps = 1e-3
    for b in range(B):
        zhat = min(max((norms[b] - mu) / (sd + eps) * h, -1.0), 1.0)
        logits = []
        for j in range(C):
            c, _ = _cos(x[b], w[j], exact_w=True)
            c = c.clamp(-1 + eps, 1 - eps)
            if j == int(y[b]):
                th = (torch.acos(c) - m * zhat).clamp(eps, math.pi - eps)
                logits.append(s * (torch.cos(th) - (m + m * zhat)))
            else:
                logits.append(s * c)
        ces.append(_ce(logits, int(y[b])))
    return torch.stack(ces).mean(), mu, sd


@pytest.mark.parametrize("t_alpha", [0.01, 1.0])
def test_adaface_loss_gradients_and_statistics_match_the_loop(t_alpha):
    x, w, y = _data(21, unit_rows=False, norms=(5.0, 40.0))
    head = _head("adaface", w, t_alpha=t_alpha)
    xa = x.clone().requires_grad_(True)
    loss = _head_loss(head, xa, y)
    gx, gw = _grads(loss, xa, head.weight)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref, mu, sd = ref_adaface(xr, wr, y, 0.4, 0.333, 64.0, t_alpha)
    rgx, rgw = _grads(ref, xr, wr)
    assert float(head.batch_mean) == pytest.approx(mu, rel=1e-6) and float(head.batch_std) == pytest.approx(sd, rel=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx, rgx, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gw, rgw, rtol=1e-7, atol=1e-9)


def test_adaface_statistics_are_checkpointed_and_eval_does_not_move_them():
    x, w, y = _data(22, norms=(5.0, 40.0))
    head = _head("adaface", w, t_alpha=0.3)
    for _ in range(3):
        head(x, y)
    state = head.state_dict()
    assert set(state) == {"weight", "batch_mean", "batch_std"}
    fresh = create_head("adaface", in_features=D, num_classes=C, t_alpha=0.3).double()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.batch_mean, head.batch_mean) and torch.equal(fresh.batch_std, head.batch_std)
    torch.testing.assert_close(fresh.train()(x, y).loss, head(x, y).loss, rtol=0, atol=0)
    before = head.batch_mean.clone()
    head.eval()(x, y)
    assert torch.equal(head.batch_mean, before)


# ---------------------------------------------------------------- MagFace
def ref_magface(x, w, y, s, l_a, u_a, l_m, u_m, lambda_g, easy_margin):
    ces, gs = [], []
    for b in range(B):
        xn = torch.sqrt((x[b] * x[b]).sum())
        a = xn.clamp(l_a, u_a)
        m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        logits = []
        for j in range(C):
            c, _ = _cos(x[b], w[j], exact_w=True)
            c = c.clamp(-1.0, 1.0)
            if j == int(y[b]):
                if easy_margin:
                    logits.append(s * (torch.cos(torch.acos(c) + m) if c.item() > 0 else c))
                elif c.item() > math.cos(math.pi - m.item()):
                    logits.append(s * torch.cos(torch.acos(c) + m))
                else:
                    logits.append(s * (c - torch.sin(math.pi - m) * m))
            else:
                logits.append(s * c)
        ces.append(_ce(logits, int(y[b])))
        gs.append(a / u_a ** 2 + 1.0 / a)
    return torch.stack(ces).mean() + lambda_g * torch.stack(gs).mean()


@pytest.mark.parametrize("easy_margin", [True, False])
def test_magface_loss_and_gradients_match_the_loop(easy_margin):
    x, w, y = _data(31, unit_rows=False, norms=(12.0, 100.0))
    x[0] *= 2.0  # one norm above u_a: clamped, no gradient through the margin there
    head = _head("magface", w, easy_margin=easy_margin)
    xa = x.clone().requires_grad_(True)
    loss = _head_loss(head, xa, y)
    gx, gw = _grads(loss, xa, head.weight)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = ref_magface(xr, wr, y, 64.0, 10.0, 110.0, 0.45, 0.8, 35.0, easy_margin)
    rgx, rgw = _grads(ref, xr, wr)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, rgw, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- all four
@pytest.mark.parametrize("name", ["sphereface_r", "sphereface2", "adaface", "magface"])
def test_row_blocks_give_the_whole_heads_logits(name):
    """What the sharded classifier relies on: a block of rows with NO_TARGET elsewhere gives the whole
    head's columns (evaluation mode, so AdaFace's statistics are those in force)."""
    x, w, y = _data(41, norms=(12.0, 60.0))
    whole = _head(name, w).eval()
    expected = whole.margin_logits(x, y)
    parts = []
    for lo, hi in ((0, 3), (3, 6)):
        block = create_head(name, in_features=D, num_classes=hi - lo).double().eval()
        block.row_block = True
        with torch.no_grad():
            block.weight.copy_(w[lo:hi])
            if name == "sphereface2":
                block.bias.copy_(whole.bias)
        local = torch.where((y >= lo) & (y < hi), y - lo, torch.full_like(y, -1))
        parts.append(block.margin_logits(x, local))
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- SphereFace+ as OpenSphere_v0 defines it
def ref_v0_mhe(w, labels):
    """OpenSphere_v0 SphereFacePlus: mean over pairs i < j of the batch's distinct classes of θ_ij^-2,
    θ = arccos(clamp(w_i · w_j, -1 + 1e-5, 1 - 1e-5)), rows as stored (unit)."""
    classes = sorted(set(int(v) for v in labels))
    pairs = []
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            c = (w[classes[a]] * w[classes[b]]).sum().clamp(-1 + 1e-5, 1 - 1e-5)
            pairs.append(torch.acos(c) ** -2)
    return torch.stack(pairs).mean()


def test_opensphere_v0_mhe_variant_matches_the_loop_and_the_default_is_unchanged():
    from sphereface_plus.mhe import classifier_mhe, normalize_rows

    _, w, y = _data(51)
    w[4] = F.normalize(w[3] + 1e-7, dim=0)  # a near-duplicate pair: the 1e-5 clamp acts
    y = torch.tensor([0, 3, 4, 4, 1])
    wa = w.clone().requires_grad_(True)
    got = classifier_mhe(wa, y, power="a2", mode="batch_unique", variant="opensphere_v0")
    (g,) = _grads(got, wa)
    wr = w.clone().requires_grad_(True)
    ref = ref_v0_mhe(wr, y)
    (rg,) = _grads(ref, wr)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12)
    # the default kernel is still the MHE code's (θ/π + 1e-4)^-2 on w / sqrt(|w|^2 + 1e-4)
    wh = normalize_rows(w)
    classes = [0, 1, 3, 4]
    e = [(math.acos(max(-1.0, min(1.0, float(wh[i] @ wh[j])))) / math.pi + 1e-4) ** -2
         for a, i in enumerate(classes) for j in classes[a + 1:]]
    assert float(classifier_mhe(w, y, power="a2", mode="batch_unique")) == pytest.approx(sum(e) / len(e), rel=1e-9)
    with pytest.raises(ValueError, match="batch_unique"):
        classifier_mhe(w, y, power="a2", mode="full", variant="opensphere_v0")


def test_opensphere_v0_sharded_mhe_on_one_process_equals_the_single_process_one():
    from sphereface_plus.mhe import classifier_mhe
    from sphereface_plus.parallel.mhe import sharded_classifier_mhe

    _, w, y = _data(52)
    for mode in ("batch_unique", "batch_vs_all"):
        a = classifier_mhe(w, y, power="a2", mode=mode, variant="opensphere_v0")
        b = sharded_classifier_mhe(w, y, C, power="a2", mode=mode, variant="opensphere_v0")
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_spherefaceplus_v0_recipe_loss_is_opensphere_v0s():
    """SphereFace-R(H, v0) s=30 m=1.5 lw=30 (lw/s = 1: plain CE) + 0.1 x the opensphere_v0 a2 batch_unique
    energy: OpenSphere_v0's SphereFacePlus loss, CE(s (cos + d)) + 0.1 MHE, from the loops."""
    from sphereface_plus.mhe import classifier_mhe

    x, w, y = _data(53, scale=4.0)
    head = _head("sphereface_r", w, version="v0", norm="hard", s=30.0, m=1.5, lw=30.0)
    xa = x.clone().requires_grad_(True)
    loss = _head_loss(head, xa, y) + 0.1 * classifier_mhe(head.weight, y, power="a2", mode="batch_unique",
                                                          variant="opensphere_v0")
    gx, gw = _grads(loss, xa, head.weight)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = ref_sphereface_r(xr, wr, y, "v0", "hard", 30.0, 1.5, 30.0, 0.0, "detached") + 0.1 * ref_v0_mhe(wr, y)
    rgx, rgw = _grads(ref, xr, wr)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, rgw, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- the insightface recipe's lr schedule
def test_poly_schedule_is_insightface_polynomial_lr_warmup_closed_form():
    from sphereface_plus.engine.optim import poly_scheduler

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.2)
    sched = poly_scheduler(opt, total_iters=50, power=2.0, warmup_iters=10)
    seen = []
    for _ in range(60):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for t, lr in enumerate(seen):  # PolynomialLRWarmup._get_closed_form_lr, step 0 at the base lr
        expected = 0.2 if t == 0 else (0.2 * t / 10 if t <= 10 else 0.2 * (1 - (min(50, t) - 10) / 40) ** 2)
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15), t


# ---------------------------------------------------------------- AdaFace under data parallel
def _adaface_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, w, y = _data(61, norms=(5.0, 40.0))
        x, y = torch.cat([x, x * 0.5, x * 1.5]), torch.cat([y, y, y])[: 3 * B]  # 15 samples, 5 per rank
        per = x.shape[0] // world
        result = {}
        for stats in ("global", "local"):
            head = _head("adaface", w, t_alpha=0.5, norm_stats=stats)
            logits = head.margin_logits(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
            result[stats] = (head.batch_mean.clone(), head.batch_std.clone(), logits.detach())
        torch.save(result, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_adaface_global_statistics_do_not_depend_on_the_number_of_processes(tmp_path):
    """norm_stats='global' (default): three processes with five samples each give the statistics and
    logits of one process with all fifteen; 'local' takes each rank's own (the official DDP behaviour).
    Forked gloo processes (a spawned interpreter per rank would cost seconds of imports each)."""
    import torch.multiprocessing as mp

    world = 3
    mp.start_processes(_adaface_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world,
                       join=True, start_method="fork")
    x, w, y = _data(61, norms=(5.0, 40.0))
    x, y = torch.cat([x, x * 0.5, x * 1.5]), torch.cat([y, y, y])
    whole = _head("adaface", w, t_alpha=0.5)
    expected = whole.margin_logits(x, y).detach()
    for rank in range(world):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        mean, std, logits = got["global"]
        assert torch.equal(mean, whole.batch_mean) and torch.equal(std, whole.batch_std)
        torch.testing.assert_close(logits, expected[rank * B:(rank + 1) * B], rtol=0, atol=1e-12)
        own = x[rank * B:(rank + 1) * B].norm(dim=1)
        local_mean, local_std, _ = got["local"]
        assert float(local_mean) == pytest.approx(0.5 * float(own.mean()) + 0.5 * 20.0, rel=1e-12)
        assert float(local_std) == pytest.approx(0.5 * float(own.std()) + 0.5 * 100.0, rel=1e-12)


@pytest.mark.parametrize("name", ["sphereface_r", "sphereface2", "adaface", "magface"])
def test_state_dict_round_trip_resumes_exactly(name):
    """Two training forwards, a checkpoint through torch.save / weights_only load into a fresh head, then the
    next forward of both: bit-identical loss, logits, terms and state (schedules, statistics, the bias)."""
    x, w, y = _data(71, norms=(12.0, 60.0))
    kw = {"sphereface_r": dict(norm="soft", steps=[1, 2]), "adaface": dict(t_alpha=0.4)}.get(name, {})
    head = _head(name, w, **kw)
    for _ in range(2):
        out = head(x, y)
        out.loss.backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    fresh = create_head(name, in_features=D, num_classes=C, **kw).double().train()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    a, b = head(x, y), fresh(x, y)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)
    assert a.terms.keys() == b.terms.keys() and all(torch.equal(a.terms[k], b.terms[k]) for k in a.terms)
    sa, sb = head.state_dict(), fresh.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _v0_mhe_worker(rank, world, init_file):
    import torch.distributed as dist

    from sphereface_plus.mhe import classifier_mhe
    from sphereface_plus.parallel.collectives import shard_range
    from sphereface_plus.parallel.mhe import sharded_classifier_mhe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        num_classes = 11  # an uneven split
        w = F.normalize(torch.randn(num_classes, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                        dim=1)
        y = torch.tensor([0, 0, 10, 3, 5, 7, 3, 9])
        start, end = shard_range(num_classes, world, rank)
        for mode in ("batch_unique", "batch_vs_all"):
            whole = w.clone().requires_grad_(True)
            ref = classifier_mhe(whole, y, "a2", mode, variant="opensphere_v0")
            ref.backward()
            rows = w[start:end].clone().requires_grad_(True)
            got = sharded_classifier_mhe(rows, y, num_classes, "a2", mode, variant="opensphere_v0")
            got.backward()
            torch.testing.assert_close(got, ref.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(rows.grad, whole.grad[start:end], rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_opensphere_v0_sharded_mhe_on_several_processes_equals_the_whole(world, tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_v0_mhe_worker, args=(world, str(tmp_path / "init")), nprocs=world, join=True,
                       start_method="fork")
