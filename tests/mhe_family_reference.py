"""float64 numpy transcriptions of the authors' TensorFlow graphs of the MHE family, for the tests.

Written from rmlin/CoMHE (``random_projection/``, ``angle_projection/``, ``adversarial_projection/``:
``architecture.py`` and ``train.py``) and wy1iu/Sphere-Uniformity (``mhs/``, ``mhp/``, ``r_mhp/``, ``mhc/``,
``mgd/``), op for op, in the authors' layout: ``filt`` is ``D x N`` (one neuron per column). Independent of
``sphereface_plus.mhe``: nothing here imports it. Gradients the graphs themselves take (the inner
objectives of the learned projections, the poles' losses) are derived by hand; the gradients the tests
compare with the library's are central finite differences of these values (:func:`fd_grad`).
"""
from __future__ import annotations

import numpy as np

EPS = 1e-4


def filt_of(weight) -> np.ndarray:
    """A torch weight (neurons along dim 0) as the authors' ``D x N`` ``filt`` (PyTorch's flattening)."""
    w = weight.detach().double().numpy()
    return w.reshape(w.shape[0], -1).T.copy()


def cal(filt):
    """``inner_pro / norm_mat`` with ``sqrt(sum(filt^2, 0) + 1e-4)`` column norms."""
    n = np.sqrt(np.sum(filt * filt, axis=0, keepdims=True) + EPS)
    return (filt.T @ filt) / (n.T @ n)


def norm(filt):
    return filt / np.sqrt(np.sum(filt * filt, axis=0, keepdims=True) + EPS)


def half(filt):
    return np.concatenate([filt, -filt], axis=1)


def thomson(filt, half_space):
    """``_add_thomson_first`` / ``_add_thomson_final`` / ``_stat`` of CoMHE without the coefficient:
    ``pow(2 - 2 cal + diag(1), -1)``, lower triangle and diagonal removed, sum / (n (n - 1) / 2)."""
    if half_space:
        filt = half(filt)
    n = filt.shape[1]
    final = (2.0 - 2.0 * cal(filt) + np.eye(n)) ** -1.0
    final = final - np.tril(final)
    return final.sum() / (n * (n - 1) / 2.0)


# ------------------------------------------------------------------------------------------------ CoMHE


def comhe_rp(filt, projections, half_space):
    """``_add_thomson_project``: the mean over the projections of the energy of ``p @ filt``."""
    return sum(thomson(p @ filt, half_space) for p in projections) / len(projections)


def _cal_backward(x, dc):
    """d/dX of ``sum(dc * cal(X))`` for a ``D x N`` X (dc the upstream gradient of the N x N matrix)."""
    n = np.sqrt(np.sum(x * x, axis=0, keepdims=True) + EPS)
    y = x / n
    dy = y @ (dc + dc.T)
    return dy / n - x * np.sum(x * dy, axis=0, keepdims=True) / n ** 3


def ap_loss_and_grad(filt, p):
    """``p_loss = tf.norm(cal(p filt) - cal(filt))`` and its gradient with respect to ``p``."""
    x = p @ filt
    delta = cal(x) - cal(filt)
    loss = np.sqrt(np.sum(delta * delta))
    return loss, _cal_backward(x, delta / loss) @ filt.T


def ad_energy_and_grad(filt, p):
    """``_stat(p filt)`` (full space) and its gradient with respect to ``p``."""
    x = p @ filt
    n = x.shape[1]
    d = 2.0 - 2.0 * cal(x)
    cnt = n * (n - 1) / 2.0
    dc = np.triu(2.0 / (d + np.eye(n)) ** 2, 1) / cnt
    return thomson(x, False), _cal_backward(x, dc) @ filt.T


def comhe_learned(filt, p, lr, kind, half_space):
    """The network's term: ``thomson(p' filt)`` with ``p' = p - lr grad(p_loss)`` (AP) or ``+ lr grad`` (AD)."""
    if kind == "angle":
        p_next = p - lr * ap_loss_and_grad(filt, p)[1]
    else:
        p_next = p + lr * ad_energy_and_grad(filt, p)[1]
    return thomson(p_next @ filt, half_space)


def projection_steps(filt, p, lr, kind, steps):
    """``GradientDescentOptimizer(lr)`` on ``p_loss (or -filt_mhe) + 1e-3 * l2_regularizer(5e-4)(p)``."""
    for _ in range(steps):
        g = ap_loss_and_grad(filt, p)[1] if kind == "angle" else -ad_energy_and_grad(filt, p)[1]
        p = p - lr * (g + 1e-3 * 5e-4 * p)
    return p


# ------------------------------------------------------------------------------------- hyperspherical uniformity


def mhs(filt, half_space):
    """``mhs/architecture.py`` without the coefficient: ``-sum(final[final == min non-zero upper entry])``."""
    if half_space:
        filt = half(filt)
    filt = norm(filt)
    final = 2.0 - 2.0 * cal(filt)
    final = final - np.tril(final)
    x = final.reshape(-1)
    target = x[x != 0].min()
    return -final[final == target].sum()


def _pole_cos(filt, v):
    """``cal(filt, v)`` of mhp/mhc: ``v filt / (sqrt(|v|^2 + 1e-4) sqrt(sum(filt^2, 0) + 1e-4))``."""
    fn = np.sqrt(np.sum(filt * filt, axis=0, keepdims=True) + EPS)
    vn = np.sqrt(np.sum(v * v) + EPS)
    return (v @ filt) / (vn * fn)


def mhp(filt, v, half_space):
    if half_space:
        filt = half(filt)
    n = filt.shape[1]
    cross = 2.0 - 2.0 * _pole_cos(norm(filt), v)
    return np.sum(cross ** -1.0) / n


def mhc(filt, v, half_space, gamma=10.0):
    if half_space:
        filt = half(filt)
    n = filt.shape[1]
    cross = 2.0 - 2.0 * _pole_cos(norm(filt), v)
    return -np.log(np.sum(np.exp(-gamma * cross)) / n) / gamma


def r_mhp(filt):
    return np.linalg.norm(np.sum(filt, axis=1))


def mgd(filt, half_space):
    if half_space:
        filt = half(filt)
    n = filt.shape[1]
    final = np.exp(-1.0 * (2.0 - 2.0 * cal(norm(filt)))) + np.diag([1e-6] * n)
    sign, logdet = np.linalg.slogdet(final)
    assert sign > 0
    return -logdet


def pole_grad(filt, v, half_space, objective, gamma=10.0):
    """d/dv of :func:`mhp` / :func:`mhc` (by hand: ``c_i = v̂·û_i``)."""
    if half_space:
        filt = half(filt)
    n = filt.shape[1]
    u = norm(filt)
    uh = u / np.sqrt(np.sum(u * u, axis=0, keepdims=True) + EPS)
    vn = np.sqrt(np.sum(v * v) + EPS)
    c = (v @ uh) / vn
    d = 2.0 - 2.0 * c
    if objective == "mhp":
        dc = 2.0 / d ** 2 / n
    else:
        e = np.exp(-gamma * d)
        dc = -2.0 * e / np.sum(e)
    g_vhat = uh @ dc.reshape(-1)
    return g_vhat / vn - v.reshape(-1) * (v.reshape(-1) @ g_vhat) / vn ** 3


def pole_steps(filt, v, half_space, objective, coef, lr, steps, gamma=10.0):
    """``MomentumOptimizer(lr, 0.9)`` on the pole loss ``±coef * term + l2_regularizer(5e-4)(v)`` (mhp/mhc
    ``train.py``: ``vloss = thom`` for MHP, ``-thom`` for MHC)."""
    sign = 1.0 if objective == "mhp" else -1.0
    accum = np.zeros_like(v)
    for _ in range(steps):
        g = sign * coef * pole_grad(filt, v, half_space, objective, gamma).reshape(v.shape) + 5e-4 * v
        accum = 0.9 * accum + g
        v = v - lr * accum
    return v


# --------------------------------------------------------------------------------------------- differences


def fd_grad(f, x, h=1e-6):
    """Central finite differences of the scalar ``f`` at ``x`` (any shape)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g
