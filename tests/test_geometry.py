"""Tests of data_prep.geometry against independent references (complex closed form, numpy sampling)."""
from __future__ import annotations


import cv2
import numpy as np
import pytest

from data_prep.geometry import (
    align_face,
    alignment_matrix,
    similarity_transform,
    template_points,
    warp_points,
)
from shared_data import LFW
from sphereface_plus.templates import TEMPLATES



def _random_similarity(rng, reflect: bool) -> np.ndarray:
    theta = rng.uniform(-np.pi, np.pi)
    s = rng.uniform(0.2, 3.0)
    t = rng.uniform(-100, 100, size=2)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lin = s * rot
    if reflect:
        lin = lin @ np.diag([-1.0, 1.0])
    return np.hstack([lin, t[:, None]])


# ---- independent reference: complex-number closed form of MATLAB cp2tform('similarity') ----------
# A non-reflective similarity is z -> a z + b with complex a, b. MATLAB fits the inverse map
# (template -> image) in least squares and inverts it; the reflective candidate is fitted on the
# template mirrored in x and mirrored back. Candidates are compared with MATLAB's matrix 2-norm.
def _complex_ls(w: np.ndarray, z: np.ndarray):
    """Least-squares a, b minimising sum |a w + b - z|^2 (closed form on centred data)."""
    wc, zc = w - w.mean(), z - z.mean()
    a = np.sum(np.conj(wc) * zc) / np.sum(np.abs(wc) ** 2)
    return a, z.mean() - a * w.mean()


def _reference_cp2tform(src: np.ndarray, dst: np.ndarray, reflective: bool = True) -> np.ndarray:
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    a, b = _complex_ls(zd, zs)  # zs ~ a zd + b
    fwd1 = lambda z: (z - b) / a  # noqa: E731
    cands = [("plain", fwd1)]
    if reflective:
        zr = -np.conj(zd)
        a2, b2 = _complex_ls(zr, zs)  # zs ~ a2 (-conj zd) + b2
        fwd2 = lambda z: -np.conj((z - b2) / a2)  # noqa: E731
        cands.append(("reflect", fwd2))

    def resid(f):
        r = f(zs) - zd
        return np.linalg.svd(np.stack([r.real, r.imag], 1), compute_uv=False)[0]

    best = cands[0][1]
    if reflective and resid(cands[1][1]) < resid(cands[0][1]):
        best = cands[1][1]
    # Recover the 2x3 matrix from images of 0, 1 and i.
    o, e1, e2 = best(np.array([0.0 + 0j])), best(np.array([1.0 + 0j])), best(np.array([1j]))
    c1, c2 = e1 - o, e2 - o
    return np.array([[c1.real[0], c2.real[0], o.real[0]], [c1.imag[0], c2.imag[0], o.imag[0]]])


@pytest.mark.parametrize("reflect", [False, True])
def test_recovers_exact_similarity(reflect):
    rng = np.random.default_rng(1 + int(reflect))
    for _ in range(50):
        m = _random_similarity(rng, reflect)
        src = rng.uniform(0, 250, size=(5, 2))
        dst = warp_points(m, src)
        got = similarity_transform(src, dst, reflective=True)
        assert got.shape == (2, 3) and got.dtype == np.float64
        np.testing.assert_allclose(got, m, atol=1e-9, rtol=0)
        if not reflect:
            np.testing.assert_allclose(similarity_transform(src, dst, reflective=False), m, atol=1e-9, rtol=0)
        else:
            # without the reflective candidate the fit must stay a proper rotation (det > 0)
            nr = similarity_transform(src, dst, reflective=False)
            assert np.linalg.det(nr[:, :2]) > 0


def test_reflected_point_set_picks_reflective_fit():
    rng = np.random.default_rng(5)
    tpl = template_points("112x96")
    for _ in range(20):
        # a face seen in a mirror: template mirrored in x, randomly moved, with landmark noise
        m = _random_similarity(rng, reflect=True)
        pts = warp_points(m, tpl) + rng.normal(0, 0.5, size=(5, 2))
        got = similarity_transform(pts, tpl)
        assert np.linalg.det(got[:, :2]) < 0
        plain = similarity_transform(pts, tpl, reflective=False)
        assert np.linalg.norm(warp_points(got, pts) - tpl) < np.linalg.norm(warp_points(plain, pts) - tpl)
        # and an ordinary (non-mirrored) noisy face keeps the non-reflective fit
        m2 = _random_similarity(rng, reflect=False)
        pts2 = warp_points(m2, tpl) + rng.normal(0, 0.5, size=(5, 2))
        assert np.linalg.det(similarity_transform(pts2, tpl)[:, :2]) > 0


def test_matches_closed_form_reference_on_noisy_points():
    rng = np.random.default_rng(7)
    tpl = template_points("112x96")
    for i in range(200):
        m = _random_similarity(rng, reflect=bool(i % 5 == 0))
        noise = rng.normal(0, rng.uniform(0.1, 20.0), size=(5, 2))
        pts = warp_points(m, tpl) + noise
        got = similarity_transform(pts, tpl)
        ref = _reference_cp2tform(pts, tpl)
        np.testing.assert_allclose(got, ref, atol=1e-9 * max(1.0, np.abs(ref).max()), rtol=1e-9)


def _matlab_port(uv: np.ndarray, xy: np.ndarray, reflective: bool = True) -> np.ndarray:
    """Line-by-line port of MATLAB cp2tform's findSimilarity / findNonreflectiveSimilarity:
    the 2N x 4 system solved with lstsq, 3x3 row-vector matrices, inv, MATLAB norm (ord=2)."""

    def nonreflective(uv, xy):
        m = xy.shape[0]
        x, y = xy[:, :1], xy[:, 1:]
        X = np.vstack([np.hstack([x, y, np.ones((m, 1)), np.zeros((m, 1))]),
                       np.hstack([y, -x, np.zeros((m, 1)), np.ones((m, 1))])])
        U = np.vstack([uv[:, :1], uv[:, 1:]])
        sc, ss, tx, ty = np.linalg.lstsq(X, U, rcond=None)[0].ravel()
        t = np.linalg.inv(np.array([[sc, -ss, 0], [ss, sc, 0], [tx, ty, 1]]))
        t[:, 2] = [0, 0, 1]
        return t

    def fwd(t, pts):
        return np.hstack([pts, np.ones((len(pts), 1))]) @ t[:, :2]

    t1 = nonreflective(uv, xy)
    if reflective:
        xyr = xy.copy()
        xyr[:, 0] *= -1
        t2 = nonreflective(uv, xyr) @ np.diag([-1.0, 1.0, 1.0])
        if np.linalg.norm(fwd(t2, uv) - xy, 2) < np.linalg.norm(fwd(t1, uv) - xy, 2):
            t1 = t2
    return t1[:, :2].T


def test_matches_line_by_line_matlab_port():
    rng = np.random.default_rng(8)
    tpl = template_points("112x112")
    for i in range(200):
        pts = warp_points(_random_similarity(rng, reflect=bool(i % 4 == 0)), tpl) + rng.normal(0, 4.0, (5, 2))
        for refl in (True, False):
            ref = _matlab_port(pts, tpl, refl)
            np.testing.assert_allclose(similarity_transform(pts, tpl, refl), ref,
                                       atol=1e-9 * max(1.0, np.abs(ref).max()), rtol=1e-9)


def test_fit_direction_is_matlab_inverse_least_squares():
    """cp2tform minimises the residual in the input image (inverse map); check optimality directly."""
    rng = np.random.default_rng(11)
    tpl = template_points("112x96")
    pts = warp_points(_random_similarity(rng, False), tpl) + rng.normal(0, 3.0, size=(5, 2))
    m = similarity_transform(pts, tpl, reflective=False)
    inv = cv2.invertAffineTransform(m)

    def cost(mat):
        return np.sum((warp_points(mat, tpl) - pts) ** 2)

    base = cost(inv)
    # perturb the 4 similarity parameters of the inverse map: the cost never decreases
    a, b = inv[0, 0], inv[1, 0]
    for d in np.vstack([np.eye(4), -np.eye(4)]) * 1e-4:
        aa, bb, tx, ty = a + d[0], b + d[1], inv[0, 2] + d[2], inv[1, 2] + d[3]
        assert cost(np.array([[aa, -bb, tx], [bb, aa, ty]])) >= base - 1e-9
    # and it differs from the forward least-squares fit (the naive port) on noisy points
    sol = np.linalg.lstsq(
        np.vstack([np.c_[pts[:, 0], -pts[:, 1], np.ones(5), np.zeros(5)],
                   np.c_[pts[:, 1], pts[:, 0], np.zeros(5), np.ones(5)]]),
        np.concatenate([tpl[:, 0], tpl[:, 1]]), rcond=None)[0]
    fwd_scale = np.hypot(sol[0], sol[1])
    assert np.sqrt(abs(np.linalg.det(m[:, :2]))) > fwd_scale + 1e-6


def test_templates_and_offset():
    h, w, pts = TEMPLATES["112x96"]
    assert (h, w) == (112, 96)
    np.testing.assert_allclose(pts[0], [30.2946, 51.6963])
    np.testing.assert_allclose(template_points("112x96"), pts - 1.0)
    np.testing.assert_allclose(template_points("112x112"), template_points("112x96") + [8.0, 0.0])
    assert TEMPLATES["112x112"][:2] == (112, 112)
    with pytest.raises(ValueError, match="unknown template"):
        template_points("96x96")


def test_bad_landmarks_are_clear_errors():
    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="5 x 2"):
        align_face(img, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        align_face(img, np.ones((5, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        align_face(img, np.full((5, 2), np.nan))


def _bilinear_reference(img: np.ndarray, m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Inverse-map every crop pixel and sample bilinearly in float64, zeros outside (numpy only)."""
    inv = cv2.invertAffineTransform(m)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    H, W = img.shape[:2]
    out = np.zeros((h, w, 3))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            vals = np.zeros((h, w, 3))
            vals[ok] = img[yy[ok], xx[ok]]
            out += (wy * wx)[..., None] * vals
    return out


def _lfw_landmarks(n: int):
    lines = (LFW / "lfw_landmark.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(lines), size=n, replace=False):
        parts = lines[i].split()
        yield parts[0], np.array(parts[1:], dtype=np.float64).reshape(5, 2)


@pytest.mark.skipif(not (LFW / "lfw_landmark.txt").exists(), reason=f"real LFW data not found at {LFW}")
@pytest.mark.parametrize("template", ["112x96", "112x112"])
def test_real_lfw_crops_put_landmarks_on_template(template):
    tpl = template_points(template)
    h, w = TEMPLATES[template][:2]
    for rel, lm in _lfw_landmarks(12):
        img = cv2.imread(str(LFW / "images" / rel), cv2.IMREAD_COLOR)
        assert img is not None, rel
        crop = align_face(img, lm, template)
        assert crop.shape == (h, w, 3) and crop.dtype == np.uint8
        m = alignment_matrix(lm, template)
        fit_residual = np.linalg.norm(warp_points(m, lm) - tpl, axis=1)
        # Where do the landmarks really end up in the crop? Paint a small Gaussian blob at each
        # landmark of a blank image, warp it with align_face and take each blob's centroid: this
        # checks warpAffine's pixel convention (no 0.5 / 1 px shift) independently of the matrix.
        for k in range(5):
            blob = np.zeros(img.shape[:2], np.float64)
            yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
            blob = np.exp(-((xx - lm[k, 0]) ** 2 + (yy - lm[k, 1]) ** 2) / (2 * 2.0 ** 2))
            blob_img = np.repeat(np.round(blob * 255).astype(np.uint8)[..., None], 3, axis=2)
            warped = align_face(blob_img, lm, template)[..., 0].astype(np.float64)
            cy, cx = np.mgrid[0:h, 0:w]
            c = np.array([(warped * cx).sum(), (warped * cy).sum()]) / warped.sum()
            assert np.linalg.norm(c - tpl[k]) <= fit_residual[k] + 0.15, (rel, k)
        # and the crop's pixels equal an independent float64 bilinear resampling (+-1 for rounding)
        ref = _bilinear_reference(img.astype(np.float64), m, h, w)
        assert np.abs(crop.astype(np.float64) - ref).max() <= 1.0 + 1e-6


def test_gray_and_rgba_inputs():
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, size=(120, 100, 3), dtype=np.uint8)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    lm = template_points("112x96") + [2.0, 3.0]
    np.testing.assert_array_equal(align_face(gray, lm), align_face(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), lm))
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(align_face(bgra, lm), align_face(bgr, lm))
    # black border outside the image
    far = template_points("112x96") * 0.2 + 500.0
    assert align_face(bgr, far).max() == 0
