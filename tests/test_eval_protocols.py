"""The two verification protocols (eval.protocols): insightface's against a float64 transcription written
from its description (tests/protocol_reference.py), sphereface unchanged, the oracle accuracy, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

import protocol_reference as ref
from eval import insightface_metrics
from eval import verification_metrics as metrics
from eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS, protocol_report


@pytest.fixture(scope="module")
def pairs600():
    f1, f2, same = ref.realistic_pairs(603, seed=0)  # 603: the first 3 folds one pair longer (KFold)
    return f1, f2, same, ref.contiguous(len(same))


def test_insightface_protocol_matches_transcription(pairs600):
    f1, f2, same, folds = pairs600
    rep = protocol_report("insightface", f1, f2, same, folds, flip_halves=True)
    dist = ref.distances(ref.embeddings(f1), ref.embeddings(f2))
    accs, thrs = ref.kfold(dist, same, folds)
    assert rep["protocol"] == "insightface"
    assert rep["fold_accuracies"] == accs  # exact: same counts, same division
    assert rep["fold_thresholds"] == thrs
    assert rep["mean_accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert rep["std_accuracy"] == pytest.approx(np.std(accs), abs=1e-12)  # population std
    assert 0.7 < rep["mean_accuracy"] < 0.99 and len(set(thrs)) > 1  # informative, not saturated
    vals, fars, vthrs = ref.val_at_far(dist, same, folds)
    v = rep["val_at_far"]
    assert v["fold_val"] == vals and v["fold_far"] == fars
    np.testing.assert_allclose(v["fold_thresholds"], vthrs, rtol=0, atol=1e-12)
    assert v["val"] == pytest.approx(np.mean(vals)) and v["far"] == pytest.approx(np.mean(fars))


def test_insightface_without_flip_uses_features_as_they_are(pairs600):
    f1, f2, same, folds = pairs600
    rep = protocol_report("insightface", f1[:, :32], f2[:, :32], same, folds, flip_halves=False)
    accs, thrs = ref.kfold(ref.distances(ref.embeddings(f1[:, :32], False), ref.embeddings(f2[:, :32], False)),
                           same, folds)
    assert rep["fold_accuracies"] == accs and rep["fold_thresholds"] == thrs


def test_val_threshold_on_plateaus_and_ties():
    """scipy's old slinear rule on a FAR curve with plateaus: end of the lower plateau to the start of the next."""
    far = np.array([0.0, 0.0, 0.001, 0.001, 0.001, 0.004, 0.004, 1.0])
    thr = np.arange(far.size) * 0.5
    # exactly on a plateau: its largest threshold
    assert insightface_metrics.threshold_at_far_slinear(far, thr, 0.001) == thr[4]
    # between plateaus: from (0.001, thr[4]) to (0.004, thr[5])
    assert insightface_metrics.threshold_at_far_slinear(far, thr, 0.002) == pytest.approx(thr[4] + (1 / 3) * (thr[5] - thr[4]))
    assert insightface_metrics.threshold_at_far_slinear(far, thr, 1.0) == thr[-1]
    # a strictly increasing curve: plain linear interpolation, as scipy.interpolate.interp1d
    interp = pytest.importorskip("scipy.interpolate")
    x = np.sort(np.random.default_rng(0).random(50))
    y = np.arange(50) * 0.001
    for t in (x[3], 0.5 * (x[10] + x[11]), x[-1]):
        assert insightface_metrics.threshold_at_far_slinear(x, y, t) == pytest.approx(float(interp.interp1d(x, y, kind="slinear")(t)),
                                                                         abs=1e-15)
    # real FAR curves (plateaus everywhere) against the spline scipy built before it refused repeated x:
    # make_interp_spline's k=1 case, knots [x0, x, x_last], coefficients y
    rng = np.random.default_rng(1)
    grid = np.arange(0, 4, 0.001)
    for n in rng.integers(50, 3000, size=20):
        neg = np.round(rng.random(n) * 4, 3)
        curve = np.searchsorted(np.sort(neg), grid, side="left") / n
        for target in (1e-3, 1e-2, float(rng.random())):
            old = interp.BSpline.construct_fast(np.r_[curve[0], curve, curve[-1]], grid, 1)
            assert insightface_metrics.threshold_at_far_slinear(curve, grid, target) == pytest.approx(float(old(target)), abs=1e-12)


def test_sphereface_protocol_is_the_old_report(pairs600):
    f1, f2, same, folds = pairs600
    for mean_sub in (True, False):
        old = metrics.verification_report(f1, f2, same, folds, mean_sub=mean_sub)
        new = protocol_report("sphereface", f1, f2, same, folds, mean_sub=mean_sub)
        assert new["protocol"] == "sphereface"
        assert {k: new[k] for k in old} == old  # every number as before


def test_oracle_accuracy_is_the_best_threshold_on_the_test_pairs():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=400), 2)  # ties
    same = rng.random(400) < 0.4
    scores[same] += 0.7
    got = metrics.oracle_accuracy(scores, same)
    best = max([np.mean(same == (scores >= t)) for t in np.r_[np.unique(scores), np.inf]])
    assert got["accuracy"] == pytest.approx(best, abs=1e-15)
    assert np.mean(same == (scores >= got["threshold"])) == pytest.approx(best, abs=1e-15)


def test_defaults_and_cli(tmp_path, capsys):
    from eval.features import save_features_npz
    from sphereface_plus.cli import main

    assert DEFAULT_PROTOCOL["lfw"] == "sphereface" and DEFAULT_PROTOCOL["bin"] == "insightface"
    f1, f2, same = ref.realistic_pairs(200, seed=3)
    paths = [f"a/{i}.jpg" for i in range(400)]
    feats = np.empty((400, f1.shape[1]), np.float32)
    feats[0::2], feats[1::2] = f1, f2
    folds = ref.contiguous(200)
    (tmp_path / "p.txt").write_text("".join(f"{paths[2 * i]} {paths[2 * i + 1]} {int(s)} {k}\n"
                                            for i, (s, k) in enumerate(zip(same, folds))))
    from eval.features import CROP_MIRROR_LAYOUT

    save_features_npz(tmp_path / "f.npz", paths, feats, layout=CROP_MIRROR_LAYOUT)
    for protocol in PROTOCOLS:
        out = tmp_path / f"{protocol}.json"
        assert main(["verify", "pairs", "--features", str(tmp_path / "f.npz"), "--pairs", str(tmp_path / "p.txt"),
                     "--protocol", protocol, "--json", str(out)]) == 0
        rep = json.loads(out.read_text())
        assert rep["protocol"] == protocol and rep["pairs_from"] == "pairs"
        printed = capsys.readouterr().out
        assert f"protocol: {protocol}" in printed and "oracle-threshold accuracy" in printed
        if protocol == "insightface":
            accs, _ = ref.kfold(ref.distances(ref.embeddings(f1), ref.embeddings(f2)), same, folds)
            assert rep["fold_accuracies"] == accs and "VAL@FAR=0.001" in printed
    # without the layout record the rows are one feature each: no summing of halves
    save_features_npz(tmp_path / "g.npz", paths, feats)
    out = tmp_path / "g.json"
    assert main(["verify", "pairs", "--features", str(tmp_path / "g.npz"), "--pairs", str(tmp_path / "p.txt"),
                 "--protocol", "insightface", "--json", str(out)]) == 0
    accs, _ = ref.kfold(ref.distances(ref.embeddings(f1, False), ref.embeddings(f2, False)), same, folds)
    assert json.loads(out.read_text())["fold_accuracies"] == accs
    assert main(["verify", "pairs", "--features", str(tmp_path / "f.npz"), "--pairs", str(tmp_path / "p.txt"),
                 "--protocol", "insightface", "--no-mean-sub"]) == 2
    assert "--no-mean-sub" in capsys.readouterr().err
