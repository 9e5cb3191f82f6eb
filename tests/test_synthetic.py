"""Tests of data_prep.synthetic: determinism, landmark correctness (found again in the pixels), pairs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep.landmarks import read_landmarks
from data_prep.synthetic import ensure_synthetic_dataset, make_synthetic_dataset
from data_prep.synthetic_faces import identity_params, image_params, render_image

K, M, PAIRS = 20, 4, 8  # the smallest set with 10 person-disjoint folds


def _digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(root, K, M, seed=3, pairs_per_fold=PAIRS, workers=1)


def test_layout_and_determinism(synth, tmp_path):
    assert synth.num_images == K * M
    files = sorted(p.relative_to(synth.images).as_posix() for p in synth.images.rglob("*.jpg"))
    assert files == sorted(synth.paths())
    assert files[0] == "id_0000/id_0000_0001.jpg"
    img = cv2.imread(str(synth.images / files[0]))
    assert img.shape == (250, 250, 3) and img.dtype == np.uint8
    # same arguments -> byte-identical files, also with a different number of workers
    again = make_synthetic_dataset(tmp_path / "again", K, M, seed=3, pairs_per_fold=PAIRS, workers=2)
    assert _digest(again.root) == _digest(synth.root)
    other = make_synthetic_dataset(tmp_path / "other", K, M, seed=4, pairs_per_fold=PAIRS, workers=1)
    assert _digest(other.images) != _digest(synth.images)
    # the landmark file holds the same values as the returned landmarks
    lms = read_landmarks(synth.landmarks_file)
    assert set(lms) == set(synth.paths())
    for rel, lm in synth.landmarks.items():
        np.testing.assert_allclose(lms[rel], lm, atol=5e-4)


def test_pupils_are_at_the_eye_landmarks(synth):
    """The dark pupil disc is found again around each eye landmark in the written (noisy JPEG) image."""
    errs = []
    for rel, lm in synth.landmarks.items():
        ident, j = int(rel[3:7]), int(rel[-8:-4]) - 1
        # pupil radius in this image: 0.55 x eye height x the image's scale
        pr = 0.55 * identity_params(3, ident)["eye_ry"] * image_params(3, ident, j)["scale"]
        gray = cv2.cvtColor(cv2.imread(str(synth.images / rel)), cv2.COLOR_BGR2GRAY).astype(np.float64)
        for k in (0, 1):
            x0, y0 = lm[k]
            r = pr + 1.5  # the pupil and a ring of iris around it
            ys, xs = np.mgrid[int(y0) - 6 : int(y0) + 8, int(x0) - 6 : int(x0) + 8]
            g = gray[ys, xs]
            inside = (xs - x0) ** 2 + (ys - y0) ** 2 <= r * r
            thr = (g[inside].min() + g[inside].max()) / 2  # halfway between pupil and iris
            w = np.clip(thr - g, 0, None) * inside
            c = np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()
            errs.append(np.linalg.norm(c - lm[k]))
    errs = np.array(errs)
    # a half-pixel convention slip would move the median to >= 0.5; JPEG + dark irises give rare outliers
    assert np.median(errs) < 0.3 and np.quantile(errs, 0.9) < 0.6 and errs.max() < 1.6, (np.median(errs), errs.max())


def _clean(imp: dict) -> dict:
    imp = dict(imp)
    imp.update(noise=0.0, blur=0.0, gain=1.0, light_amp=0.0, cast=np.ones(3), clutter=[], mouth_open=0.0)
    return imp


@pytest.mark.parametrize("ident", [0, 5, 11])
def test_nose_and_mouth_landmarks_in_clean_renders(ident):
    """Without photometric nuisance, the nose-tip disc and the lip ends sit on the landmarks."""
    idp = identity_params(9, ident)
    for j in range(6):
        imp = _clean(image_params(9, ident, j))
        img, lm = render_image(idp, imp)
        f = img.astype(np.float64)
        # nose tip: a small highlight disc, brighter than the skin, centred on the landmark
        skin = idp["skin"]
        hi = skin + (255.0 - skin) * 0.5
        x0, y0 = lm[2]
        ys, xs = np.mgrid[int(y0) - 4 : int(y0) + 6, int(x0) - 4 : int(x0) + 6]
        k = int(np.argmax(hi - skin))  # the channel where the highlight stands out most
        w = (f[ys, xs, k] > (skin[k] + hi[k]) / 2).astype(np.float64)
        c = np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()
        assert np.linalg.norm(c - lm[2]) < 0.5, (ident, j, c, lm[2])
        # mouth corners: the extreme lip pixels along the mouth direction
        u = (lm[4] - lm[3]) / np.linalg.norm(lm[4] - lm[3])
        lip = np.clip(idp["lip"], 0, 255)
        mid = (lm[3] + lm[4]) / 2
        half = np.linalg.norm(lm[4] - lm[3]) / 2
        ys, xs = np.mgrid[0:250, 0:250]
        rel = np.stack([xs - mid[0], ys - mid[1]], -1)
        along, across = rel @ u, rel @ np.array([-u[1], u[0]])
        near = (np.abs(across) < 12) & (np.abs(along) < half + 6)
        # pixels of the dark line between the lips: nearer its colour than to skin or lip colour
        dark = lip * 0.5
        dist = lambda c: np.linalg.norm(f - c, axis=2)  # noqa: E731
        d_dark = dist(dark)
        lipmask = near & (d_dark < dist(idp["skin"])) & (d_dark < dist(lip)) & (d_dark < 40)
        a = along[lipmask]
        assert abs(a.min() + half) < 1.6 and abs(a.max() - half) < 1.6, (ident, j, a.min(), a.max(), half)


def test_pairs_file_is_lfw_format_and_person_disjoint(synth):
    lines = synth.pairs_file.read_text().splitlines()
    assert lines[0] == f"10 {PAIRS // 2}"
    body = lines[1:]
    assert len(body) == 10 * PAIRS
    folds_people = []
    for f in range(10):
        block = body[f * PAIRS : (f + 1) * PAIRS]
        people = set()
        for i, line in enumerate(block):
            p = line.split("\t")
            if i < PAIRS // 2:
                assert len(p) == 3 and p[1] != p[2]
                people.add(p[0])
                rels = [f"{p[0]}/{p[0]}_{int(p[1]):04d}.jpg", f"{p[0]}/{p[0]}_{int(p[2]):04d}.jpg"]
            else:
                assert len(p) == 4 and p[0] != p[2]
                people.update([p[0], p[2]])
                rels = [f"{p[0]}/{p[0]}_{int(p[1]):04d}.jpg", f"{p[2]}/{p[2]}_{int(p[3]):04d}.jpg"]
            for r in rels:
                assert (synth.images / r).is_file(), r
        assert len(set(block)) == len(block)  # no repeated pair
        assert all(synth.fold_of[n] == f for n in people)
        folds_people.append(people)
    for a in range(10):
        for b in range(a + 1, 10):
            assert not folds_people[a] & folds_people[b]


def test_errors_and_reuse(tmp_path, synth):
    with pytest.raises(ValueError, match="at least 20 identities"):
        make_synthetic_dataset(tmp_path / "few", 10, 3)
    with pytest.raises(ValueError, match="even"):
        make_synthetic_dataset(tmp_path / "odd", 20, 3, pairs_per_fold=5)
    with pytest.raises(ValueError, match="cannot give"):
        make_synthetic_dataset(tmp_path / "small", 20, 2, pairs_per_fold=40)
    (tmp_path / "user" / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a synthetic data set"):
        make_synthetic_dataset(tmp_path / "user", 20, 2, pairs_per_fold=2)
    # ensure_* reuses a finished data set with the same parameters (no rewrite) ...
    stamp = {p: p.stat().st_mtime_ns for p in synth.images.rglob("*.jpg")}
    ds = ensure_synthetic_dataset(synth.root, K, M, seed=3, pairs_per_fold=PAIRS)
    assert {p: p.stat().st_mtime_ns for p in synth.images.rglob("*.jpg")} == stamp
    assert ds.fold_of == synth.fold_of and set(ds.landmarks) == set(synth.landmarks)
    # ... and regenerates (replacing its own earlier output) when they differ
    root = tmp_path / "regen"
    ensure_synthetic_dataset(root, 20, 2, seed=1, pairs_per_fold=2)
    ds2 = ensure_synthetic_dataset(root, 20, 3, seed=1, pairs_per_fold=2)
    assert len(list(ds2.images.rglob("*.jpg"))) == 60
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folders left
