"""`sphereface-plus verify`: lfw/pairs/bin/folder through the real CLI, reports checked against a
brute-force reference of the protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval.features import save_features_npz
from sphereface_plus.cli import main
from shared_data import ATT



def _reference(f1, f2, issame, folds, mean_sub=True):
    """The protocol by brute force: explicit fold means, a thresholds x pairs comparison matrix."""
    thr = np.arange(-10000, 10001) / 10000.0
    accs = []
    for k in range(folds.max() + 1):
        test, train = folds == k, folds != k
        mu = np.concatenate([f1[train], f2[train]]).mean(0) if mean_sub else 0.0
        a, b = f1 - mu, f2 - mu
        s = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
        c = (s[train][None] > thr[:, None])[:, issame[train]].sum(1) + \
            (s[train][None] < thr[:, None])[:, ~issame[train]].sum(1)
        t = thr[c == c.max()].mean()
        accs.append(((s[test][issame[test]] > t).sum() + (s[test][~issame[test]] < t).sum()) / test.sum())
    return np.array(accs)


@pytest.fixture()
def lfw_like(tmp_path):
    """An LFW-format pairs file (10 folds x (20 + 20)) over made-up people, and features for it."""
    rng = np.random.default_rng(0)
    lines, centres = ["10\t20"], {}
    for k in range(10):
        for i in range(20):
            lines.append(f"P{k}_{i}\t1\t2")
        for i in range(20):
            lines.append(f"Q{k}_{i}\t1\tR{k}_{i}\t3")
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    from eval.pairs import pairs_to_arrays, parse_lfw_pairs

    pairs = parse_lfw_pairs(tmp_path / "pairs.txt")
    paths, i1, i2, issame, folds = pairs_to_arrays(pairs)
    feats = []
    for p in paths:
        person = p.split("/")[0]
        if person not in centres:
            centres[person] = rng.normal(size=24)
        feats.append(centres[person] + 1.1 * rng.normal(size=24) + 0.4)
    feats = np.array(feats, dtype=np.float32)
    save_features_npz(tmp_path / "f.npz", paths, feats)
    return tmp_path, paths, feats, (i1, i2, issame, folds)


@pytest.mark.parametrize("mean_sub", [True, False])
def test_verify_lfw_features_json_and_plot(lfw_like, mean_sub, capsys):
    d, paths, feats, (i1, i2, issame, folds) = lfw_like
    out = d / f"r{mean_sub}.json"
    argv = ["verify", "lfw", "--features", str(d / "f.npz"), "--pairs", str(d / "pairs.txt"), "--json", str(out),
            "--plot", str(d / "roc.png")] + ([] if mean_sub else ["--no-mean-sub"])
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    ref = _reference(feats[i1].astype(np.float64), feats[i2].astype(np.float64), issame, folds, mean_sub)
    assert rep["fold_accuracies"] == ref.tolist()
    assert rep["mean_accuracy"] == pytest.approx(ref.mean()) and rep["std_accuracy"] == pytest.approx(ref.std())
    assert 0.6 < rep["mean_accuracy"] < 1.0
    assert set(rep["tar_at_far"]) == {"1e-2", "1e-3", "1e-4"}
    assert 0 < rep["eer"] < 0.5 and 0.5 < rep["auc"] <= 1
    assert rep["mean_sub"] is mean_sub
    assert (d / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"{100 * ref.mean():7.2f}%" in printed


def test_verify_errors_name_what_is_missing(lfw_like, capsys):
    d, paths, feats, _ = lfw_like
    save_features_npz(d / "g.npz", paths[3:], feats[3:])
    assert main(["verify", "lfw", "--features", str(d / "g.npz"), "--pairs", str(d / "pairs.txt")]) == 2
    err = capsys.readouterr().err
    assert f"3 of {len(paths)} images are missing from {d / 'g.npz'}" in err and paths[0] in err
    text = (d / "pairs.txt").read_text().splitlines()
    text[5] = "Someone 1"
    (d / "bad.txt").write_text("\n".join(text) + "\n")
    assert main(["verify", "lfw", "--features", str(d / "f.npz"), "--pairs", str(d / "bad.txt")]) == 2
    assert f"{d / 'bad.txt'}:6: expected 3 fields" in capsys.readouterr().err
    assert main(["verify", "lfw", "--checkpoint", "x.pt", "--pairs", str(d / "pairs.txt")]) == 2
    assert "--root" in capsys.readouterr().err


def test_verify_generic_pairs_file(lfw_like):
    d, paths, feats, (i1, i2, issame, folds) = lfw_like
    # the same pairs as a CSV with explicit folds give the same report
    rows = [f"{paths[a]},{paths[b]},{int(s)},{k}" for a, b, s, k in zip(i1, i2, issame, folds)]
    (d / "p.csv").write_text("path1,path2,same,fold\n" + "\n".join(rows) + "\n")
    assert main(["verify", "pairs", "--features", str(d / "f.npz"), "--pairs", str(d / "p.csv"),
                 "--json", str(d / "a.json")]) == 0
    assert main(["verify", "lfw", "--features", str(d / "f.npz"), "--pairs", str(d / "pairs.txt"),
                 "--json", str(d / "b.json")]) == 0
    a, b = json.loads((d / "a.json").read_text()), json.loads((d / "b.json").read_text())
    assert a["fold_accuracies"] == b["fold_accuracies"] and a["auc"] == b["auc"]


@pytest.mark.skipif(not ATT.is_dir(), reason=f"AT&T faces not found under {ATT}")
def test_verify_folder_with_features(tmp_path):
    from eval.pairs import folder_pairs, list_identity_folder

    rng = np.random.default_rng(1)
    ids = list_identity_folder(ATT)
    paths, feats = [], []
    for name, files in ids.items():
        c = rng.normal(size=16)
        for f in files:
            paths.append(f)
            feats.append(c + 0.8 * rng.normal(size=16))
    feats = np.array(feats)
    save_features_npz(tmp_path / "att.npz", paths, feats)
    assert main(["verify", "folder", "--root", str(ATT), "--features", str(tmp_path / "att.npz"), "--num-pairs",
                 "400", "--seed", "2", "--json", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    pairs = folder_pairs(ATT, num_pairs=400, seed=2)
    index = {p: i for i, p in enumerate(paths)}
    f1 = feats[[index[p.path1] for p in pairs]].astype(np.float32).astype(np.float64)
    f2 = feats[[index[p.path2] for p in pairs]].astype(np.float32).astype(np.float64)
    ref = _reference(f1, f2, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]))
    assert rep["fold_accuracies"] == ref.tolist() and rep["num_pairs"] == 400


def test_verify_bin_pack_with_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    import cv2

    from eval.pairs import save_bin_pack
    from sphereface_plus import create_backbone

    torch.manual_seed(0)
    model = create_backbone("sphere4", input_size=(112, 96), embedding_dim=64).eval()
    cfg = {"model": {"backbone": "sphere4", "input_size": [112, 96], "embedding_dim": 64}, "data": {"template": "112x96"}}
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 1, "config": cfg}, tmp_path / "ck.pt")
    rng = np.random.default_rng(0)
    # 112x112 crops (the insightface template): the middle 96 columns feed the 112x96 model
    crops = [cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 3) for _ in range(16)]
    images = [cv2.imencode(".png", c)[1].tobytes() for c in crops]
    issame = [True, False] * 4
    save_bin_pack(tmp_path / "t.bin", images, issame)
    assert main(["verify", "bin", "--checkpoint", str(tmp_path / "ck.pt"), "--pack", str(tmp_path / "t.bin"),
                 "--folds", "2", "--workers", "0", "--save-features", str(tmp_path / "feat.npz"),
                 "--json", str(tmp_path / "r.json"), "--precision", "fp32"]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len(rep["fold_accuracies"]) == 2 and rep["num_pairs"] == 8
    # features: the model on the decoded middle crop and its mirror, by hand
    with np.load(tmp_path / "feat.npz") as z:
        got = z["features"]
    x = torch.stack([(torch.from_numpy(c[:, 8:104].copy()).permute(2, 0, 1).float() - 127.5) / 128 for c in crops])
    with torch.no_grad():
        ref = torch.cat([model(x), model(x.flip(3))], 1).numpy()
    assert got.shape == (16, 128)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _reference_outcomes(f1, f2, issame, folds):
    """Every pair's test score and its fold's threshold by brute force (as _reference), and how far on the
    wrong side of it the score lies."""
    thr = np.arange(-10000, 10001) / 10000.0
    score, t_of = np.zeros(len(issame)), np.zeros(len(issame))
    for k in range(folds.max() + 1):
        test, train = folds == k, folds != k
        mu = np.concatenate([f1[train], f2[train]]).mean(0)
        a, b = f1 - mu, f2 - mu
        s = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
        c = (s[train][None] > thr[:, None])[:, issame[train]].sum(1) + \
            (s[train][None] < thr[:, None])[:, ~issame[train]].sum(1)
        score[test], t_of[test] = s[test], thr[c == c.max()].mean()
    return score, t_of, np.where(issame, t_of - score, score - t_of)


def test_verify_report_dir_shows_the_hardest_errors(lfw_like, capsys):
    """report.md lists, and hardest_errors.png shows, exactly the k false accepts and false rejects scored
    furthest on the wrong side of their fold's threshold (a brute-force reference picks them)."""
    import cv2

    from eval.export import synthetic_crops

    d, paths, feats, (i1, i2, issame, folds) = lfw_like
    crops = synthetic_crops("112x96", 5)
    for n, p in enumerate(paths):  # crops to show (any aligned image will do: the scores come from the .npz)
        (d / "crops" / p).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / "crops" / p), crops[n % 5])
    score, thr, wrong = _reference_outcomes(feats[i1].astype(np.float64), feats[i2].astype(np.float64), issame, folds)
    k = 4
    argv = ["verify", "lfw", "--features", str(d / "f.npz"), "--pairs", str(d / "pairs.txt"), "--hardest", str(k)]
    assert main(argv + ["--root", str(d / "crops"), "--report-dir", str(d / "rep")]) == 0
    md = (d / "rep" / "report.md").read_text()
    assert (d / "rep" / "hardest_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![hardest errors](hardest_errors.png)" in md and "![ROC](roc.png)" in md
    assert json.loads((d / "rep" / "report.json").read_text())["fold_accuracies"] == _reference(
        feats[i1].astype(np.float64), feats[i2].astype(np.float64), issame, folds).tolist()
    for title, same in (("False accepts", False), ("False rejects", True)):
        errors = np.flatnonzero((wrong >= 0) & (issame == same))
        want = errors[np.argsort(-wrong[errors], kind="stable")][:k]
        assert f"### {title} ({len(errors)} in all, {len(want)} shown)" in md
        section = md.split(f"### {title}")[1].split("###")[0]
        rows = [r.split("|") for r in section.splitlines() if r.startswith("| ") and r[2].isdigit()]
        assert len(want) == k
        assert [(r[2].strip(" `"), r[3].strip(" `")) for r in rows] == [(paths[i1[i]], paths[i2[i]]) for i in want]
        assert [float(r[5]) for r in rows] == pytest.approx(score[want], abs=5e-5)
        assert [float(r[6]) for r in rows] == pytest.approx(thr[want], abs=5e-5)
    # without images: the same tables, no grid; an existing report is never overwritten
    assert main(argv + ["--report-dir", str(d / "rep2")]) == 0
    assert "No image grid" in (d / "rep2" / "report.md").read_text()
    assert not (d / "rep2" / "hardest_errors.png").exists()
    capsys.readouterr()
    assert main(argv + ["--report-dir", str(d / "rep")]) == 2
    assert "already holds a report.md" in capsys.readouterr().err


def test_verify_bin_report_dir_draws_the_pack_images(tmp_path, capsys):
    """verify bin --report-dir: the grid is drawn from the pack's own images (a model embeds them), the pairs
    listed are the k worst of the features the run saved (brute force), named by their pack index."""
    import cv2
    import torch

    from eval.export import synthetic_crops
    from eval.features import load_features_npz
    from eval.pairs import save_bin_pack
    from sphereface_plus.models import create_backbone

    crops = synthetic_crops("112x96", 8)
    rng = np.random.default_rng(1)
    issame = np.arange(40) % 2 == 0
    images = []
    for _ in issame:  # labels that the images do not follow: errors of both kinds for an untrained model
        a, b = rng.choice(8, 2, replace=False)
        images += [cv2.imencode(".png", crops[a])[1].tobytes(), cv2.imencode(".png", crops[b])[1].tobytes()]
    save_bin_pack(tmp_path / "p.bin", images, issame)
    torch.save(create_backbone("sphere4").state_dict(), tmp_path / "s4.pth")
    assert main(["import", "--from", "pytorch", str(tmp_path / "s4.pth"), "--backbone", "sphere4",
                 "--out", str(tmp_path / "s4.pt")]) == 0
    k = 3
    assert main(["verify", "bin", "--checkpoint", str(tmp_path / "s4.pt"), "--pack", str(tmp_path / "p.bin"),
                 "--protocol", "sphereface", "--precision", "fp32", "--workers", "0", "--hardest", str(k),
                 "--save-features", str(tmp_path / "f.npz"), "--report-dir", str(tmp_path / "rep"),
                 "--save-model", str(tmp_path / "s4_thr.pt")]) == 0
    # the copy with the threshold keeps the imported model's input convention
    assert torch.load(tmp_path / "s4_thr.pt", weights_only=True)["preprocessing"] == \
        torch.load(tmp_path / "s4.pt", weights_only=True)["preprocessing"]
    paths, feats = load_features_npz(tmp_path / "f.npz")
    f = feats.astype(np.float64)
    folds = np.repeat(np.arange(10), 4)
    _, _, wrong = _reference_outcomes(f[0::2], f[1::2], issame, folds)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "hardest_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for title, same in (("False accepts", False), ("False rejects", True)):
        errors = np.flatnonzero((wrong >= 0) & (issame == same))
        want = errors[np.argsort(-wrong[errors], kind="stable")][:k]
        section = md.split(f"### {title}")[1].split("###")[0]
        rows = [r.split("|") for r in section.splitlines() if r.startswith("| ") and r[2].isdigit()]
        assert len(want) == k and [r[2].strip(" `") for r in rows] == [f"pack image {2 * i}" for i in want]
