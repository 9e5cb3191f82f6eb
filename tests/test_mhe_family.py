"""The MHE family (CoMHE, MHS, MHP, R-MHP, MHC, MGD) against float64 transcriptions of the authors' TF code
(tests/mhe_family_reference.py), the closed forms the papers state, and the inner optimisers' trajectories.

Every value is compared at rel <= 1e-6 (they agree to ~1e-13); every gradient with respect to the
weights against central finite differences of the transcription (relative error of the whole gradient
<= 1e-6), on a convolution and a linear layer, in full and half space.
"""
import math

import numpy as np
import pytest
import torch

import mhe_family_reference as ref
from sphereface_plus.mhe import (adversarial_energy, angle_preserving_loss, comhe_learned_energy, comhe_rp_energy,
                                 mgd_energy, mhc_energy, mhp_energy, mhs_energy, pole_step, projection_step,
                                 r_mhp_energy)

LAYERS = {"conv": (5, 3, 2, 2), "linear": (6, 10)}  # neurons x (in x kh x kw) / out x in
SPACES = {"full": False, "half": True}


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _close(actual, expected, rel=1e-6):
    assert actual == pytest.approx(expected, rel=rel), (actual, expected)


def _grad_close(grad, expected):
    grad, expected = np.asarray(grad, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    err = np.linalg.norm(grad - expected) / np.linalg.norm(expected)
    assert err <= 1e-6, err


def _check(fn, ref_fn, weight, *extra):
    """fn(weight, *extra) -> torch scalar; ref_fn(filt) -> float: value and d/dweight."""
    w = weight.clone().requires_grad_(True)
    value = fn(w, *extra)
    (grad,) = torch.autograd.grad(value, w)
    filt = ref.filt_of(weight)
    _close(float(value), ref_fn(filt))
    # the transcription's gradient with respect to filt (D x N) is the transpose of the weight rows'
    fd = ref.fd_grad(ref_fn, filt).T.reshape(weight.shape)
    _grad_close(grad, fd)


# --------------------------------------------------------------------------------------------------- CoMHE


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("layer", LAYERS)
def test_comhe_rp_matches_the_transcription(layer, space):
    w = _weight(LAYERS[layer])
    d = w[0].numel()
    proj = _weight((3, 4, d), seed=1)
    _check(lambda x: comhe_rp_energy(x, proj, "2", SPACES[space]),
           lambda f: ref.comhe_rp(f, proj.numpy(), SPACES[space]), w)


@pytest.mark.parametrize("kind", ["angle", "adversarial"])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("layer", LAYERS)
def test_comhe_learned_projection_term_matches_the_transcription(layer, space, kind):
    # the term takes a look-ahead gradient step of the projection inside the graph; the network's
    # gradient goes through it (second order), and the finite differences see all of it
    w = _weight(LAYERS[layer], seed=2)
    p = _weight((4, w[0].numel()), seed=3)
    lr = 0.3
    _check(lambda x: comhe_learned_energy(x, p, lr, kind, "2", SPACES[space]),
           lambda f: ref.comhe_learned(f, p.numpy(), lr, kind, SPACES[space]), w)


@pytest.mark.parametrize("layer", LAYERS)
def test_inner_objectives_and_their_projection_gradients(layer):
    w = _weight(LAYERS[layer], seed=4)
    p = _weight((4, w[0].numel()), seed=5).requires_grad_(True)
    filt = ref.filt_of(w)
    for fn, ref_fn in ((angle_preserving_loss, ref.ap_loss_and_grad), (adversarial_energy, ref.ad_energy_and_grad)):
        value = fn(w, p)
        (g,) = torch.autograd.grad(value, p)
        ref_value, ref_grad = ref_fn(filt, p.detach().numpy())
        _close(float(value), ref_value)
        _grad_close(g, ref_grad)
        # the hand-derived transcription gradient is itself checked against finite differences
        _grad_close(ref_grad, ref.fd_grad(lambda q: ref_fn(filt, q)[0], p.detach().numpy()))


@pytest.mark.parametrize("kind", ["angle", "adversarial"])
def test_projection_step_is_the_authors_gradient_descent(kind):
    w, p = _weight((6, 10), 19), _weight((4, 10), 20)
    got = p
    for _ in range(3):
        got = projection_step(w, got, 0.3, kind)
    np.testing.assert_allclose(got.numpy(), ref.projection_steps(ref.filt_of(w), p.numpy(), 0.3, kind, 3), rtol=1e-10)


@pytest.mark.parametrize("objective", ["mhp", "mhc"])
def test_pole_step_is_the_authors_momentum(objective):
    w, v = _weight((5, 3, 2, 2), 21), _weight((12,), 22)
    got, buf = v, None
    for _ in range(4):
        got, buf = pole_step(w, got, buf, 0.2, objective, coefficient=0.7, half_space=True)
    expected = ref.pole_steps(ref.filt_of(w), v.numpy().reshape(1, -1), True, objective, 0.7, 0.2, 4)
    np.testing.assert_allclose(got.numpy(), expected.reshape(-1), rtol=1e-10)


# ----------------------------------------------------------------------------------- hyperspherical uniformity


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("layer", LAYERS)
def test_mhs_matches_the_transcription(layer, space):
    _check(lambda x: mhs_energy(x, SPACES[space]), lambda f: ref.mhs(f, SPACES[space]), _weight(LAYERS[layer], 6))
    # the blocked search (memory O(block N)) gives the same value and gradient
    w = _weight(LAYERS[layer], 6)
    for block in (1, 2, 4):
        _check(lambda x: mhs_energy(x, SPACES[space], block_size=block), lambda f: ref.mhs(f, SPACES[space]), w)


@pytest.mark.parametrize("objective", ["mhp", "mhc"])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("layer", LAYERS)
def test_pole_objectives_match_the_transcription(layer, space, objective):
    w = _weight(LAYERS[layer], 7)
    v = _weight((w[0].numel(),), 8)
    fn = mhp_energy if objective == "mhp" else mhc_energy
    ref_fn = ref.mhp if objective == "mhp" else ref.mhc
    _check(lambda x: fn(x, v, SPACES[space]), lambda f: ref_fn(f, v.numpy().reshape(1, -1), SPACES[space]), w)
    # and with respect to the pole (what the poles' optimiser uses)
    vv = v.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(w, vv, SPACES[space]), vv)
    expected = ref.pole_grad(ref.filt_of(w), v.numpy().reshape(1, -1), SPACES[space], objective)
    _grad_close(g, expected)
    _grad_close(expected, ref.fd_grad(lambda q: ref_fn(ref.filt_of(w), q.reshape(1, -1), SPACES[space]), v.numpy()))


@pytest.mark.parametrize("layer", LAYERS)
def test_r_mhp_matches_the_transcription(layer):
    _check(lambda x: r_mhp_energy(x), ref.r_mhp, _weight(LAYERS[layer], 9))


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("layer", LAYERS)
def test_mgd_matches_the_transcription(layer, space):
    _check(lambda x: mgd_energy(x, SPACES[space]), lambda f: ref.mgd(f, SPACES[space]), _weight(LAYERS[layer], 10))


def test_mgd_in_float32_is_the_float64_formula_rounded():
    w = _weight((40, 30), 11)
    w[1] = w[0] + 1e-4 * w[1]  # two nearly parallel neurons: an eigenvalue near the 1e-6 jitter
    v32 = mgd_energy(w.float(), True)
    assert v32.dtype == torch.float32
    _close(float(v32), ref.mgd(ref.filt_of(w), True), rel=1e-5)


# --------------------------------------------------------------------------------------------- closed forms


def _simplex(n):
    """``n`` vertices of a regular simplex, ``e_i - 1/n``: entries exact in binary for n a power of two."""
    return torch.eye(n, dtype=torch.float64) - 1.0 / n


@pytest.mark.parametrize("n", [4, 8])
def test_mhs_on_a_regular_simplex(n):
    # every pair of a regular simplex is at the largest possible minimum distance, 2 + 2 / (n - 1)
    # (cosine -1/(n-1)), here shrunk by the two 1e-4 normalisations, and every pair ties
    w = _simplex(n)
    r2 = (1.0 - 1.0 / n)  # |v|^2
    a = r2 / (r2 + 1e-4)  # |n(v)|^2
    shrink = a / (a + 1e-4)  # |n(n(v))|^2
    d2 = 2.0 + 2.0 / (n - 1) * shrink
    value = float(mhs_energy(w))
    ties = round(-value / d2)
    assert 1 <= ties <= n * (n - 1) // 2
    _close(-value / ties, d2, rel=1e-12)
    # a perturbed simplex separates less: its (single, untied) closest pair is nearer
    noisy = w + 1e-3 * _weight((n, n), 12)
    assert -float(mhs_energy(noisy)) < d2 * (1 - 1e-4)


@pytest.mark.parametrize("n, d", [(5, 5), (4, 9)])
def test_mgd_on_orthonormal_rows(n, d):
    q, _ = torch.linalg.qr(_weight((d, n), 13))
    w = q.t().contiguous()  # n orthonormal rows
    a = 1.0 / (1.0 + 1e-4)
    diag = math.exp(-(2.0 - 2.0 * a / (a + 1e-4))) + 1e-6
    off = math.exp(-2.0)
    # K = (diag - off) I + off 11^T: eigenvalues diag - off (n - 1 times) and diag + (n - 1) off
    expected = -((n - 1) * math.log(diag - off) + math.log(diag + (n - 1) * off))
    _close(float(mgd_energy(w)), expected, rel=1e-10)


def test_mhs_half_space_counts_each_pair_twice():
    # [W; -W] repeats every pair: the closest pair (w_0, w_1) is also (-w_0, -w_1), and the code's mask
    # keeps both, so the half-space term is twice the full-space one
    w = _weight((6, 8), 14)
    w[1] = w[0] + 0.05 * w[1]
    full, half = float(mhs_energy(w)), float(mhs_energy(w, True))
    _close(half, 2 * full, rel=1e-12)
    _close(half, ref.mhs(ref.filt_of(w), True))


@pytest.mark.parametrize("power", ["0", "1", "2", "a0", "a1", "a2"])
@pytest.mark.parametrize("space", SPACES)
def test_comhe_rp_with_every_kernel_is_the_mean_mhe_energy_of_the_projections(power, space):
    # the fused half-space form (N x N products only) against mhe_energy (tests/test_mhe.py checks it against
    # a brute-force loop) on each projection's 2N rows
    from sphereface_plus.mhe import mhe_energy

    w = _weight((7, 3, 2, 2), 15).requires_grad_(True)
    proj = _weight((4, 5, 12), 16)
    got = comhe_rp_energy(w, proj, power, SPACES[space])
    (g,) = torch.autograd.grad(got, w)
    rows = w.reshape(7, -1)
    expected = torch.stack([mhe_energy(rows @ p.t(), power, SPACES[space]) for p in proj]).mean()
    (g_ref,) = torch.autograd.grad(expected, w)
    _close(float(got), float(expected), rel=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)


def test_comhe_rp_on_a_wide_layer_goes_one_projection_and_row_block_at_a_time():
    # N = 2100: N^2 > 4M entries, so each projection is its own group, in two row blocks
    from sphereface_plus.mhe import mhe_energy

    w = _weight((2100, 10), 17).requires_grad_(True)
    proj = _weight((2, 6, 10), 18)
    got = comhe_rp_energy(w, proj, "2", True)
    (g,) = torch.autograd.grad(got, w)
    expected = torch.stack([mhe_energy(w @ p.t(), "2", True) for p in proj]).mean()
    (g_ref,) = torch.autograd.grad(expected, w)
    _close(float(got), float(expected), rel=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)
