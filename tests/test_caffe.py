"""The released-model semantics against float64 transcriptions of the original code, written here as loops.

- Caffe ``InterClass`` type AMONG (wy1iu/sphereface-plus ``inter_class_layer.cpp``, Forward_cpu and
  Backward_cpu) -> ``classifier_mhe(..., mode='caffe_among')``.
- Caffe ``MarginInnerProduct`` (wy1iu/sphereface ``margin_inner_product_layer.cpp``, Forward_cpu and
  Backward_cpu) -> ``a_softmax_logits(..., gradient='caffe')`` and ``create_head('a_softmax', gradient='caffe')``.
- TF MHE angular kernels (wy1iu/MHE ``code/architecture.py``, ``_add_thomson_constraint``): no clamp.
"""
import math

import pytest
import torch

from sphereface_plus import mhe as M
from sphereface_plus.heads import A_SOFTMAX_GRADIENTS, create_head
from sphereface_plus.heads import functional as HF


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _rel_close(got: torch.Tensor, want, rel: float = 1e-10) -> None:
    want = torch.as_tensor(want, dtype=torch.float64)
    scale = float(want.abs().max())
    err = float((got.detach().double() - want).abs().max())
    assert err <= rel * scale, f"max error {err:.3e} vs scale {scale:.3e}"


# ------------------------------------------------------------------ Caffe InterClass AMONG, CPU
def caffe_inter_class_among(weight, labels, alpha):
    """Forward_cpu then Backward_cpu of the AMONG type (normalize: true, the default), as loops."""
    W = weight.tolist()
    label = labels.tolist()
    N, K, Mb = len(W), len(W[0]), len(label)
    mean = list(W[0])  # caffe_copy then caffe_add over i = 1..N-1, then caffe_scal(1/N)
    for i in range(1, N):
        mean = [a + b for a, b in zip(mean, W[i])]
    mean = [v * (1.0 / N) for v in mean]
    inv = 1.0 / math.sqrt(_dot(mean, mean) + 1e-5)
    mean = [v * inv for v in mean]
    tmp = 0.0
    for i in range(N):
        for j in range(Mb):
            d = [a - b for a, b in zip(W[i], W[label[j]])]
            tmp += _dot(d, d)
    dist = tmp / N
    total_coff = -4.0 * alpha / (Mb * dist * dist + 1e-5)
    diff = [[0.0] * K for _ in range(N)]
    for i in range(Mb):
        l = label[i]
        for k in range(K):
            diff[l][k] += total_coff * (W[l][k] - mean[k])
    return dist, diff


def _unit_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    return w / w.norm(dim=1, keepdim=True)


LABELS = torch.tensor([4, 1, 4, 7, 0, 4, 9, 1, 2, 11])  # class 4 three times, class 1 twice; 3, 5, 6, 8, 10 absent


@pytest.mark.parametrize("alpha", [1.0, 10.0, 5.3])
def test_caffe_among_value_and_diff_equal_the_layer(alpha):
    w0 = _unit_rows(12, 5, 0)
    d_ref, diff_ref = caffe_inter_class_among(w0, LABELS, alpha)
    w = w0.clone().requires_grad_(True)
    d = M.classifier_mhe(w, LABELS, mode="caffe_among")
    assert d.item() == pytest.approx(d_ref, rel=1e-10)
    (alpha * d).backward()
    _rel_close(w.grad, diff_ref)
    absent = [3, 5, 6, 8, 10]
    assert torch.count_nonzero(w.grad[absent]) == 0  # classes not in the batch get nothing
    # class 4 was seen three times: three equal contributions, i.e. 3x one sample's term
    one = -4.0 * alpha / (len(LABELS) * d_ref ** 2 + 1e-5) * (w0[4] - M.caffe_among_direction(w0.mean(0)))
    torch.testing.assert_close(w.grad[4], 3 * one, rtol=1e-10, atol=0)


def test_caffe_among_is_not_normalised_inside_and_reports_unit_rows_value():
    # rows of norm 3: the layer acts on the rows as given (its D scales by 9, no normalisation)
    w0 = 3.0 * _unit_rows(12, 5, 1)
    d_ref, diff_ref = caffe_inter_class_among(w0, LABELS, 2.0)
    w = w0.clone().requires_grad_(True)
    (2.0 * M.classifier_mhe(w, LABELS, mode="caffe_among")).backward()
    assert M.caffe_among_distance(w0, LABELS).item() == pytest.approx(d_ref, rel=1e-10)
    _rel_close(w.grad, diff_ref)


def test_caffe_among_replicas_are_the_caffe_gpus_averaged():
    # 2 GPUs x 5 samples: each GPU's layer has its own D; NCCL sums the diffs and divides by 2
    w0 = _unit_rows(12, 5, 2)
    halves = [caffe_inter_class_among(w0, LABELS[:5], 10.0), caffe_inter_class_among(w0, LABELS[5:], 10.0)]
    w = w0.clone().requires_grad_(True)
    d = M.classifier_mhe(w, LABELS, mode="caffe_among", replicas=2)
    assert d.item() == pytest.approx((halves[0][0] + halves[1][0]) / 2, rel=1e-10)
    (10.0 * d).backward()
    want = (torch.tensor(halves[0][1], dtype=torch.float64) + torch.tensor(halves[1][1], dtype=torch.float64)) / 2
    _rel_close(w.grad, want)
    with pytest.raises(ValueError, match="dividing"):
        M.classifier_mhe(w, LABELS, mode="caffe_among", replicas=3)
    with pytest.raises(ValueError, match="only for mode"):
        M.classifier_mhe(w, LABELS, mode="batch_vs_all", replicas=2)


def test_caffe_among_row_blocks_sum_to_the_full_layer():
    # what a row-sharded classifier does: all-reduce the row sum and the two partial sums, diff per block
    w0 = _unit_rows(12, 5, 3)
    d_ref, diff_ref = caffe_inter_class_among(w0, LABELS, 1.0)
    row_mean = w0.sum(0) / 12
    spread = target = 0.0
    blocks = ((0, 5), (5, 9), (9, 12))
    local = [torch.where((LABELS >= lo) & (LABELS < hi), LABELS - lo, torch.full_like(LABELS, -1)) for lo, hi in blocks]
    for (lo, hi), y in zip(blocks, local):
        s, t = M.caffe_among_partial_sums(w0[lo:hi], y, row_mean)
        spread, target = spread + s, target + t
    d = M.caffe_among_distance_from_sums(spread, target, 12, len(LABELS))
    assert d.item() == pytest.approx(d_ref, rel=1e-10)
    direction = M.caffe_among_direction(row_mean)
    diff = torch.cat([M.caffe_among_diff(w0[lo:hi], y, direction, d, num_samples=len(LABELS))
                      for (lo, hi), y in zip(blocks, local)])
    _rel_close(diff, diff_ref)


def test_caffe_among_is_a_listed_mode():
    assert "caffe_among" in M.CLASSIFIER_MODES
    with pytest.raises(ValueError, match="caffe_among"):
        M.classifier_mhe(_unit_rows(4, 3, 0), torch.tensor([0]), mode="caffe")


# ------------------------------------------------------------------ Caffe MarginInnerProduct, CPU
def _sign(v):
    return float((0.0 < v) - (v < 0.0))  # caffe_sign


def caffe_margin_inner_product(x, weight, labels, m, lam, top_diff):
    """Forward_cpu and Backward_cpu of the layer (types SINGLE..QUADRUPLE = m 1..4) as loops.

    Returns (top, bottom_diff, weight_diff); weight_diff is the diff of the stored rows, which the
    layer has normalised in place at the start of Forward_cpu.
    """
    X, W, G, label = x.tolist(), weight.tolist(), top_diff.tolist(), labels.tolist()
    Mb, N, K = len(X), len(W), len(X[0])
    for i in range(N):  # normalize weight, in place
        inv = 1.0 / math.sqrt(_dot(W[i], W[i]))
        W[i] = [v * inv for v in W[i]]
    x_norm = [math.sqrt(_dot(X[i], X[i])) for i in range(Mb)]
    xw = [[_dot(X[i], W[j]) for j in range(N)] for i in range(Mb)]
    cos = [[xw[i][j] * (1.0 / x_norm[i]) for j in range(N)] for i in range(Mb)]  # caffe_scal(1/|x|)
    s0 = [[_sign(cos[i][j]) for j in range(N)] for i in range(Mb)]
    s1 = [[_sign(abs(cos[i][j]) - 0.5) for j in range(N)] for i in range(Mb)]
    s2 = [[s0[i][j] * (1.0 + s1[i][j]) - 2.0 for j in range(N)] for i in range(Mb)]
    s3 = [[s0[i][j] * _sign(2.0 * cos[i][j] ** 2 - 1.0) for j in range(N)] for i in range(Mb)]
    s4 = [[2.0 * s0[i][j] + s3[i][j] - 3.0 for j in range(N)] for i in range(Mb)]
    # forward
    top = [list(r) for r in xw]
    if m > 1:
        for i in range(Mb):
            j, c = label[i], cos[i][label[i]]
            if m == 2:
                top[i][j] = x_norm[i] * (2.0 * s0[i][j] * c ** 2 - 1.0)
            elif m == 3:
                top[i][j] = x_norm[i] * (s1[i][j] * (4.0 * c ** 3 - 3.0 * c) + s2[i][j])
            else:
                top[i][j] = x_norm[i] * (s3[i][j] * (8.0 * c ** 4 - 8.0 * c ** 2 + 1.0) + s4[i][j])
        top = [[(top[i][j] + lam * xw[i][j]) / (1.0 + lam) for j in range(N)] for i in range(Mb)]
    # weight diff: top_diff^T x
    wdiff = [[sum(G[i][j] * X[i][k] for i in range(Mb)) for k in range(K)] for j in range(N)]
    # bottom diff
    bdiff = [[0.0] * K for _ in range(Mb)]
    for i in range(Mb):
        for j in range(N):
            if m == 1:
                for k in range(K):
                    bdiff[i][k] += G[i][j] * W[j][k]
                continue
            if label[i] != j:
                for k in range(K):
                    bdiff[i][k] += 1.0 / (1.0 + lam) * G[i][j] * W[j][k]
            else:
                c = cos[i][j]
                if m == 2:
                    cw = 4.0 * s0[i][j] * c
                    cx = 1.0 / (-x_norm[i]) * (2.0 * s0[i][j] * c ** 2 + 1.0)
                elif m == 3:
                    cw = s1[i][j] * (12.0 * c ** 2 - 3.0)
                    cx = 1.0 / (-x_norm[i]) * (8.0 * s1[i][j] * c ** 3 - s2[i][j])
                else:
                    cw = s3[i][j] * (32.0 * c ** 3 - 16.0 * c)
                    cx = 1.0 / (-x_norm[i]) * (s3[i][j] * (24.0 * c ** 4 - 8.0 * c ** 2 - 1.0) - s4[i][j])
                nrm = math.sqrt(cw * cw + cx * cx)
                cw, cx = cw / nrm, cx / nrm
                for k in range(K):
                    bdiff[i][k] += 1.0 / (1.0 + lam) * G[i][j] * cw * W[j][k]
                    bdiff[i][k] += 1.0 / (1.0 + lam) * G[i][j] * cx * X[i][k]
            for k in range(K):
                bdiff[i][k] += lam / (1.0 + lam) * G[i][j] * W[j][k]  # the final gemm, every column
    return top, bdiff, wdiff


def _boundary_batch(m, seed):
    """Features whose target cosine is cos(k pi / m) for k = 0..m (psi's boundaries), plus random ones."""
    g = torch.Generator().manual_seed(seed)
    C, d = 7, 5
    w = torch.randn(C, d, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    labels, rows = [], []
    for k in range(m + 1):
        y = k % C
        u = torch.randn(d, generator=g, dtype=torch.float64)
        u = u - (u @ w[y]) * w[y]
        u = u / u.norm()
        phi = k * math.pi / m
        rows.append((2.0 + k) * (math.cos(phi) * w[y] + math.sin(phi) * u))
        labels.append(y)
    for _ in range(4):
        rows.append(3.0 * torch.randn(d, generator=g, dtype=torch.float64))
        labels.append(int(torch.randint(0, C, (1,), generator=g)))
    x = torch.stack(rows)
    top_diff = torch.randn(len(rows), C, generator=g, dtype=torch.float64)
    return x, w, torch.tensor(labels), top_diff


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 5.0, 100.0])
def test_caffe_a_softmax_backward_equals_the_layer(m, lam):
    x0, w0, y, top_diff = _boundary_batch(m, seed=10 * m + int(lam))
    top, bdiff, wdiff = caffe_margin_inner_product(x0, w0, y, m, lam, top_diff)
    x = x0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    logits = HF.a_softmax_logits(x, w, y, m=m, lam=lam, gradient="caffe")
    _rel_close(logits, top, rel=1e-12)  # the forward is the layer's
    exact = HF.a_softmax_logits(x0, w0, y, m=m, lam=lam)
    torch.testing.assert_close(logits.detach(), exact, rtol=0, atol=0)  # and unchanged
    (logits * top_diff).sum().backward()
    _rel_close(x.grad, bdiff)
    _rel_close(w.grad, wdiff)


def test_caffe_gradient_differs_from_the_exact_one_and_leaves_it_alone():
    x0, w0, y, top_diff = _boundary_batch(4, seed=1)
    grads = {}
    for gradient in ("exact", "caffe"):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        (HF.a_softmax_logits(x, w, y, m=4, lam=5.0, gradient=gradient) * top_diff).sum().backward()
        grads[gradient] = (x.grad, w.grad)
    x = x0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    (HF.a_softmax_logits(x, w, y, m=4, lam=5.0) * top_diff).sum().backward()  # the default is exact
    torch.testing.assert_close(x.grad, grads["exact"][0], rtol=0, atol=0)
    assert (grads["caffe"][0] - grads["exact"][0]).abs().max() > 1e-3
    assert (grads["caffe"][1] - grads["exact"][1]).abs().max() > 1e-3


def _scalar_coefficients(c, x_norm, m):
    """Backward_cpu's (coeff_w, coeff_x) for one target entry, with its sign variables."""
    s0, s1 = _sign(c), _sign(abs(c) - 0.5)
    s2 = s0 * (1.0 + s1) - 2.0
    s3 = s0 * _sign(2.0 * c * c - 1.0)
    s4 = 2.0 * s0 + s3 - 3.0
    if m == 1:
        return 1.0, 0.0
    if m == 2:
        cw, cx = 4.0 * s0 * c, 1.0 / (-x_norm) * (2.0 * s0 * c * c + 1.0)
    elif m == 3:
        cw, cx = s1 * (12.0 * c * c - 3.0), 1.0 / (-x_norm) * (8.0 * s1 * c ** 3 - s2)
    else:
        cw = s3 * (32.0 * c ** 3 - 16.0 * c)
        cx = 1.0 / (-x_norm) * (s3 * (24.0 * c ** 4 - 8.0 * c * c - 1.0) - s4)
    n = math.sqrt(cw * cw + cx * cx)
    return cw / n, cx / n


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_caffe_coefficients_on_exact_boundaries(m):
    # cosines that are exactly psi's boundaries in floating point: the layer's signs are 0 there
    cs = [1.0, -1.0, 0.0, 0.5, -0.5, math.sqrt(0.5), -math.sqrt(0.5), 0.3, -0.8]
    c = torch.tensor(cs, dtype=torch.float64).unsqueeze(1)
    x_norm = torch.full_like(c, 2.5)
    cw, cx = HF.caffe_target_coefficients(c, x_norm, m)
    assert torch.isfinite(cw).all() and torch.isfinite(cx).all()
    for i, ci in enumerate(cs):
        want = _scalar_coefficients(ci, 2.5, m)
        assert (cw[i].item(), cx[i].item()) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_softmax_head_with_the_caffe_gradient(mode):
    torch.manual_seed(0)
    head = create_head("a_softmax", in_features=5, num_classes=7, m=4, gradient="caffe").double()
    with torch.no_grad():
        head.weight.mul_(3.0)  # stored rows not unit: Caffe (and the head in train mode) normalises them
    getattr(head, mode)()
    x0, _, y, top_diff = _boundary_batch(4, seed=5)
    x = x0.clone().requires_grad_(True)
    logits = head(x, y).logits
    w_used = head.weight.detach().clone()
    top, bdiff, wdiff = caffe_margin_inner_product(x0, w_used, y, 4, head.current_lambda, top_diff)
    _rel_close(logits, top, rel=1e-12)
    (logits * top_diff).sum().backward()
    _rel_close(x.grad, bdiff)
    _rel_close(head.weight.grad, wdiff)
    assert "gradient='caffe'" in repr(head)


def test_unknown_gradient_lists_the_choices():
    assert A_SOFTMAX_GRADIENTS == ("exact", "caffe", "detached")
    with pytest.raises(ValueError, match="exact, caffe"):
        create_head("a_softmax", in_features=4, num_classes=3, gradient="original")
    with pytest.raises(ValueError, match="exact, caffe"):
        HF.a_softmax_logits(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), gradient="approx")


def test_caffe_gradient_row_blocks_with_no_target_labels_equal_the_full_classifier():
    # the row-sharded classifier: per-block logits side by side are the full logits, and the blocks'
    # Caffe gradients sum (features) and stack (rows) to the full classifier's Caffe gradient
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 3, 9, 5, 6, 1, 8, 4])
    kw = dict(m=4, lam=2.5, gradient="caffe")
    full = HF.a_softmax_logits(x, w, y, **kw)
    weights = torch.linspace(-1, 1, full.numel(), dtype=torch.float64).view_as(full)
    (full * weights).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    blocks = []
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        local = torch.where((y >= lo) & (y < hi), y - lo, torch.full_like(y, HF.NO_TARGET))
        blocks.append(HF.a_softmax_logits(x, w[lo:hi], local, **kw))
    joined = torch.cat(blocks, dim=1)
    torch.testing.assert_close(joined, full, rtol=0, atol=1e-12)
    (joined * weights).sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, gw, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ TF MHE angular kernels
def tf_thomson(weight: torch.Tensor, power: str, half_space: bool) -> torch.Tensor:
    """``_add_thomson_constraint`` of wy1iu/MHE code/architecture.py in float64 torch (no clamp), rows = neurons."""
    filt = weight.reshape(weight.shape[0], -1).t()  # TF: [-1, n_filt], one column per neuron
    if half_space:
        filt = torch.cat((filt, -filt), dim=1)
    n = filt.shape[1]
    filt_norm = torch.sqrt((filt * filt).sum(0, keepdim=True) + 1e-4)
    inner_pro = (filt.t() @ filt) / (filt_norm.t() @ filt_norm)
    iu = torch.triu_indices(n, n, 1)  # final -= matrix_band_part(final, -1, 0): the pairs i < j
    acos = torch.acos(inner_pro[iu[0], iu[1]]) / math.pi + 1e-4
    final = {"a0": -torch.log(acos), "a1": acos ** -1, "a2": acos ** -2}[power]
    return final.sum() / (n * (n - 1) / 2.0)


@pytest.mark.parametrize("power", ["a0", "a1", "a2"])
@pytest.mark.parametrize("block_size", [None, 3])
def test_angular_energy_equals_tf_where_tf_is_finite(power, block_size):
    # rows of squared norm 10: each row and its negation have c = -10 / 10.0001 = -0.99999, where the
    # old clamp to -1 + 1e-5 acted; TF is finite there and so must we be, value and gradient
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    w0 = w0 / w0.norm(dim=1, keepdim=True) * math.sqrt(10.0)
    w_tf = w0.clone().requires_grad_(True)
    ref = tf_thomson(w_tf, power, half_space=True)
    (g_ref,) = torch.autograd.grad(ref, w_tf)
    assert torch.isfinite(ref) and torch.isfinite(g_ref).all()
    w = w0.clone().requires_grad_(True)
    got = M.mhe_energy(w, power, half_space=True, block_size=block_size)
    (g_got,) = torch.autograd.grad(got, w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("power", ["a0", "a1", "a2"])
def test_angular_kernel_substitutes_only_where_tf_is_not_finite(power):
    c = torch.tensor([1.0, -1.0, 1.0 + 1e-12, -1.0 - 1e-12, 1.0 - 1e-12, 0.3], dtype=torch.float64,
                     requires_grad=True)
    e = M.mhe_kernel(c, power)
    (grad,) = torch.autograd.grad(e.sum(), c)
    t = torch.acos(c.detach().clamp(-1, 1)) / math.pi + 1e-4
    want = {"a0": -torch.log(t), "a1": 1 / t, "a2": t ** -2}[power]
    torch.testing.assert_close(e.detach(), want, rtol=1e-12, atol=0)  # at +-1: TF's own (finite) value
    assert torch.isfinite(grad).all()
    assert grad[:4].eq(0).all()  # TF's slope is infinite or NaN at |c| >= 1
    c_in = c.detach()[4:].clone().requires_grad_(True)  # inside: TF's slope, however steep
    t_in = torch.acos(c_in) / math.pi + 1e-4
    (g_in,) = torch.autograd.grad({"a0": -torch.log(t_in), "a1": 1 / t_in, "a2": t_in ** -2}[power].sum(), c_in)
    torch.testing.assert_close(grad[4:], g_in, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the released recipes
@pytest.mark.parametrize("name, gradient, mode, lambda_m", [
    ("sphereface20_casia_released", "caffe", None, 0.0),
    ("spherefaceplus20_casia_released", "caffe", "caffe_among", 10.0),
])
def test_released_recipes_use_the_caffe_semantics(name, gradient, mode, lambda_m):
    import pathlib

    import yaml

    cfg = yaml.safe_load((pathlib.Path(__file__).parents[1] / "configs" / "face" / f"{name}.yaml").read_text())
    assert cfg["head"]["gradient"] == gradient and gradient in A_SOFTMAX_GRADIENTS
    assert cfg["mhe"]["lambda_m"] == lambda_m
    if mode is not None:
        assert cfg["mhe"]["mode"] == mode and mode in M.CLASSIFIER_MODES
    assert cfg["train"]["batch_size"] == 512 and cfg["train"]["precision"] == "off"
