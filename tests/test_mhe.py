"""MHE against independent references: float64 brute-force loops, closed forms, the Thomson problem."""
import math

import pytest
import torch
import torch.nn as nn

from sphereface_plus import MHERegularizer, classifier_mhe, create_backbone, mhe_energy

POWERS = ["0", "1", "2", "a0", "a1", "a2"]


# ---------------------------------------------------------------- brute-force reference (pure Python)
def ref_kernel(c, power):
    if power in ("0", "1", "2"):
        d = max(2.0 - 2.0 * c, 1e-6)
        return {"0": -math.log(d), "1": d ** -0.5, "2": 1.0 / d}[power]
    theta = math.acos(min(max(c, -1.0), 1.0))  # tf.acos, finite only on [-1, 1] (wy1iu/MHE architecture.py)
    t = theta / math.pi + 1e-4
    return {"a0": -math.log(t), "a1": 1.0 / t, "a2": t ** -2}[power]


def ref_unit(rows):
    out = []
    for r in rows:
        n = math.sqrt(sum(v * v for v in r) + 1e-4)
        out.append([v / n for v in r])
    return out


def ref_dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def ref_layer_energy(weight, power, half_space=False):
    rows = weight.reshape(weight.shape[0], -1).tolist()
    if half_space:
        rows = rows + [[-v for v in r] for r in rows]
    u = ref_unit(rows)
    n = len(u)
    total, count = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            total += ref_kernel(ref_dot(u[i], u[j]), power)
            count += 1
    return total / count


def ref_batch_vs_all(weight, labels, power):
    u = ref_unit(weight.tolist())
    C = len(u)
    total = 0.0
    for y in labels.tolist():
        for j in range(C):
            if j != y:
                total += ref_kernel(ref_dot(u[y], u[j]), power)
    return total / (len(labels) * (C - 1))


# ---------------------------------------------------------------- layer energy
@pytest.mark.parametrize("power", POWERS)
def test_layer_energy_matches_brute_force(power):
    torch.manual_seed(1)
    w = torch.randn(9, 2, 2, 2, dtype=torch.float64)  # a conv layer: 9 neurons of 8 weights
    expected = ref_layer_energy(w, power)
    assert mhe_energy(w, power).item() == pytest.approx(expected, rel=1e-12)
    for block in (1, 2, 4, 9, 50):
        assert mhe_energy(w, power, block_size=block).item() == pytest.approx(expected, rel=1e-12)
    expected_half = ref_layer_energy(w, power, half_space=True)
    assert mhe_energy(w, power, half_space=True).item() == pytest.approx(expected_half, rel=1e-12)
    assert mhe_energy(w, power, half_space=True, block_size=5).item() == pytest.approx(expected_half, rel=1e-12)


def test_integer_powers_are_accepted():
    w = torch.randn(5, 4, dtype=torch.float64)
    for p in (0, 1, 2):
        assert mhe_energy(w, p).item() == mhe_energy(w, str(p)).item()


@pytest.mark.parametrize("power", POWERS)
def test_gradcheck_dense_and_blocked(power):
    torch.manual_seed(2)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mhe_energy(x, power), (w,))
    assert torch.autograd.gradcheck(lambda x: mhe_energy(x, power, block_size=2), (w,))
    assert torch.autograd.gradcheck(lambda x: mhe_energy(x, power, half_space=True, block_size=3), (w,))


@pytest.mark.parametrize("power", POWERS)
def test_blocked_equals_dense_value_and_gradient(power):
    torch.manual_seed(3)
    w0 = torch.randn(157, 12, dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    dense = mhe_energy(w, power)
    (g_dense,) = torch.autograd.grad(dense, w)
    for block in (1, 16, 50, 157, 1000):
        wb = w0.clone().requires_grad_(True)
        blocked = mhe_energy(wb, power, block_size=block)
        (g_blocked,) = torch.autograd.grad(blocked, wb)
        torch.testing.assert_close(blocked, dense, rtol=1e-12, atol=0)
        torch.testing.assert_close(g_blocked, g_dense, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("power", POWERS)
def test_blocked_equals_dense_when_the_clamps_act(power):
    """Duplicate rows of large norm push 2 - 2c below its floor and c to within 1e-9 of +-1: the
    hand-written slopes of the blocked path must then equal autograd's (finite, steep) ones."""
    torch.manual_seed(10)
    w0 = torch.randn(12, 3, dtype=torch.float64) * 100
    w0[7] = w0[2]
    w0[9] = -w0[4] * 1.5  # antipodal pair: c within 1e-9 of -1 for the angular kernels
    w = w0.clone().requires_grad_(True)
    dense = mhe_energy(w, power)
    (g_dense,) = torch.autograd.grad(dense, w)
    assert torch.isfinite(dense) and torch.isfinite(g_dense).all()
    # c is within 3e-9 of +-1 here, where arccos turns the ulp-level difference between the loop's and
    # the matrix product's c into ~1e-8 relative (d theta = dc / sqrt(1 - c^2)): hence 1e-7, not 1e-9
    assert dense.item() == pytest.approx(ref_layer_energy(w0, power), rel=1e-7)
    for block in (1, 5, 12):
        wb = w0.clone().requires_grad_(True)
        blocked = mhe_energy(wb, power, block_size=block)
        (g_blocked,) = torch.autograd.grad(blocked, wb)
        torch.testing.assert_close(blocked, dense, rtol=1e-12, atol=0)
        # the angular slopes ~ t^-3 / sqrt(1 - c^2) are ~1e15 here and amplify the two matrix products'
        # ulp-level differences in c the same way (measured: up to 7e-7 relative for a2)
        rtol = 1e-5 if power.startswith("a") else 1e-10
        torch.testing.assert_close(g_blocked, g_dense, rtol=rtol, atol=1e-12)


def test_blocked_float32_matches_float64():
    torch.manual_seed(4)
    w = torch.randn(600, 32, dtype=torch.float64)
    ref = mhe_energy(w, "2").item()
    got = mhe_energy(w.float(), "2", block_size=64).item()
    assert got == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- closed forms
def test_orthogonal_sanity_values():
    """docs/theory.md#mhe-energy: nearly orthogonal unit vectors give about -0.693, 0.707, 0.5, 0.693, 2, 4."""
    w = torch.eye(64, dtype=torch.float64)
    expected = {"0": -math.log(2), "1": 2 ** -0.5, "2": 0.5, "a0": math.log(2), "a1": 2.0, "a2": 4.0}
    for power, value in expected.items():
        assert mhe_energy(w, power).item() == pytest.approx(value, rel=1e-3)


@pytest.mark.parametrize("power", POWERS)
def test_half_space_closed_form_for_orthonormal_rows(power):
    """[W; -W] for N orthonormal rows: each of the 2N vectors has 2N-2 orthogonal partners and one
    antipode, whose cosine is -|ŵ|^2 = -1/(1 + 1e-4)."""
    n = 6
    w = torch.eye(n, 10, dtype=torch.float64)
    pairs = 2 * n * (2 * n - 1) / 2
    ortho_pairs = 2 * n * (2 * n - 2) / 2
    expected = (ortho_pairs * ref_kernel(0.0, power) + n * ref_kernel(-1 / (1 + 1e-4), power)) / pairs
    assert mhe_energy(w, power, half_space=True).item() == pytest.approx(expected, rel=1e-12)


def test_half_space_identities():
    torch.manual_seed(5)
    w = torch.randn(8, 5, dtype=torch.float64)
    for power in POWERS:
        # half-space MHE of W is the full-space MHE of [W; -W] ...
        assert mhe_energy(w, power, half_space=True).item() == pytest.approx(
            mhe_energy(torch.cat([w, -w]), power).item(), rel=1e-12
        )
        # ... and flipping the sign of any neuron leaves it unchanged
        flipped = w.clone()
        flipped[[1, 4]] *= -1
        assert mhe_energy(flipped, power, half_space=True).item() == pytest.approx(
            mhe_energy(w, power, half_space=True).item(), rel=1e-12
        )


def test_energy_is_scale_and_permutation_invariant():
    torch.manual_seed(6)
    w = torch.randn(7, 4, dtype=torch.float64) * 50  # large norms: the 1e-4 is negligible
    perm = torch.randperm(7)
    scales = torch.rand(7, 1, dtype=torch.float64) * 10 + 20
    for power in POWERS:
        a = mhe_energy(w, power).item()
        assert mhe_energy(w[perm] * scales, power).item() == pytest.approx(a, rel=1e-6)


@pytest.mark.parametrize(
    "n, minimum",
    [(2, 0.5), (3, 1.732050808), (4, 3.674234614), (5, 6.474691495), (6, 9.985281374)],
)
def test_thomson_minima(n, minimum):
    """Minimising the s = 1 energy of N points on S^2 reaches the known Thomson minima (docs/theory.md#mhe-energy)."""
    pairs = n * (n - 1) / 2
    best = math.inf
    gen = torch.Generator().manual_seed(n)
    for _ in range(3):
        # norm 1000: the 1e-4 of the normalisation changes distances by 5e-11 only
        w = (torch.randn(n, 3, dtype=torch.float64, generator=gen) * 1000).requires_grad_(True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=400, tolerance_grad=1e-14, tolerance_change=1e-16,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = mhe_energy(w, "1") * pairs
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            u = w / w.norm(dim=1, keepdim=True)
            energy = sum(1.0 / (u[i] - u[j]).norm().item() for i in range(n) for j in range(i + 1, n))
        best = min(best, energy)
    assert best == pytest.approx(minimum, rel=1e-6)


# ---------------------------------------------------------------- classifier forms
@pytest.mark.parametrize("power", POWERS)
def test_classifier_modes_match_brute_force(power):
    torch.manual_seed(7)
    w = torch.randn(11, 4, dtype=torch.float64)
    labels = torch.tensor([3, 3, 0, 10, 5, 3])  # repeated classes count per sample in batch_vs_all
    assert classifier_mhe(w, labels, power, "batch_vs_all").item() == pytest.approx(
        ref_batch_vs_all(w, labels, power), rel=1e-12
    )
    unique = torch.tensor([0, 3, 5, 10])
    assert classifier_mhe(w, labels, power, "batch_unique").item() == pytest.approx(
        ref_layer_energy(w[unique], power), rel=1e-12
    )
    full = ref_layer_energy(w, power)
    assert classifier_mhe(w, labels, power, "full").item() == pytest.approx(full, rel=1e-12)
    assert classifier_mhe(w, None, power, "full", block_size=3).item() == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("mode", ["batch_vs_all", "batch_unique", "full"])
def test_classifier_gradcheck(mode):
    torch.manual_seed(8)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 4, 4, 0])
    assert torch.autograd.gradcheck(lambda x: classifier_mhe(x, labels, "2", mode, block_size=4), (w,))


def test_batch_unique_single_class_is_zero_with_graph():
    w = torch.randn(5, 3, requires_grad=True)
    e = classifier_mhe(w, torch.tensor([2, 2]), "0", "batch_unique")
    assert e.item() == 0.0
    e.backward()
    assert torch.all(w.grad == 0)


# ---------------------------------------------------------------- errors
def test_bad_input_errors():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="unknown MHE power"):
        mhe_energy(w, "3")
    with pytest.raises(ValueError, match="unknown MHE power"):
        mhe_energy(w, True)
    with pytest.raises(ValueError, match="at least 2"):
        mhe_energy(torch.randn(1, 8))
    bad = w.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        mhe_energy(bad)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"\[2, 1\]"):
        classifier_mhe(bad, torch.tensor([0]))
    # without the check a non-finite weight is not refused but yields a non-finite energy (what the
    # trainer's loss guard relies on)
    assert not torch.isfinite(mhe_energy(bad, check_finite=False))
    for mode in ("batch_vs_all", "batch_unique", "full"):
        assert not torch.isfinite(classifier_mhe(bad, torch.tensor([0, 2]), mode=mode, check_finite=False))
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        MHERegularizer(net, power="2")()
    assert not torch.isfinite(MHERegularizer(net, power="2", check_finite=False)()[0])
    with pytest.raises(ValueError, match="label 6 is outside"):
        classifier_mhe(w, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="label -1 is outside"):
        classifier_mhe(w, torch.tensor([-1, 2]), mode="full")
    with pytest.raises(TypeError, match="integer"):
        classifier_mhe(w, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown classifier_mhe mode"):
        classifier_mhe(w, torch.tensor([0]), mode="all")
    with pytest.raises(ValueError, match="needs the batch labels"):
        classifier_mhe(w, None)


# ---------------------------------------------------------------- MHERegularizer
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)
        self.proj = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        self.gate = nn.Linear(5, 1)  # one neuron: no pair, skipped


def test_regularizer_matches_brute_force():
    torch.manual_seed(9)
    model = Tiny().double()
    reg = MHERegularizer(model, power="0", half_space=True, exclude="gate", output_layers="out")
    assert reg.hidden_layers == ["conv", "proj"] and reg.output_layers == ["out"]
    assert (reg.hidden_coef, reg.output_coef) == (1.0, 10.0)  # docs/theory.md#mhe-regularizer (s = 0)
    loss, values = reg()
    e_conv = ref_layer_energy(model.conv.weight.detach(), "0", half_space=True)
    e_proj = ref_layer_energy(model.proj.weight.detach(), "0", half_space=True)
    e_out = ref_layer_energy(model.out.weight.detach(), "0", half_space=False)  # output: always full space
    assert values["conv"].item() == pytest.approx(e_conv, rel=1e-12)
    assert values["proj"].item() == pytest.approx(e_proj, rel=1e-12)
    assert values["out"].item() == pytest.approx(e_out, rel=1e-12)
    assert loss.item() == pytest.approx(1.0 * (e_conv + e_proj) + 10.0 * e_out, rel=1e-12)
    loss.backward()
    for layer in (model.conv, model.proj, model.out):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert model.proj.bias.grad is None and model.gate.weight.grad is None


def test_regularizer_selection_and_coefficients():
    model = Tiny()
    reg = MHERegularizer(model, power="a2", include=["conv", "pro*"], output_layers="proj")
    assert reg.hidden_layers == ["conv"] and reg.output_layers == ["proj"]
    assert (reg.hidden_coef, reg.output_coef) == (0.1, 1.0)  # docs/theory.md#mhe-regularizer (a1/a2)
    reg = MHERegularizer(model, power=2, hidden_coef=0.5, output_coef=0.0, output_layers=())
    assert reg.output_layers == [] and reg.hidden_layers == ["conv", "proj", "out"]  # gate skipped
    with pytest.raises(ValueError, match="conv, proj, out, gate"):
        MHERegularizer(model, include="nothing*")
    with pytest.raises(ValueError, match="matches none"):
        MHERegularizer(model, output_layers="fc*")
    with pytest.raises(ValueError, match="unknown MHE power"):
        MHERegularizer(model, power="b1")
    # default output layer: the model's last conv/linear layer (here 'out' once 'gate' is gone)
    model.gate = nn.Identity()
    reg = MHERegularizer(model, power="1")
    assert reg.hidden_layers == ["conv", "proj"] and reg.output_layers == ["out"]
    assert MHERegularizer(model, power="1", exclude="out").output_layers == []


def test_regularizer_on_cifar_cnn9():
    model = create_backbone("cifar_cnn9", num_classes=10)
    reg = MHERegularizer(model, power="1", half_space=True)
    hidden = [f"features.conv{s}_{j}" for s in (1, 2, 3) for j in (1, 2, 3)] + ["fc6"]
    assert reg.hidden_layers == hidden and reg.output_layers == ["score"]
    loss, values = reg()
    assert set(values) == set(hidden) | {"score"}
    assert torch.isfinite(loss)
    # He-initialised filters are close to orthogonal in high dimension: s = 1 energy near 2^-1/2
    assert values["fc6"].item() == pytest.approx(2 ** -0.5, rel=0.05)
