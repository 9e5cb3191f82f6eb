"""verify ijb on a synthetic IJB set in the official layout, against a float64 brute force written here.

The reference follows insightface's ijb_11.py step by step with plain loops: flip-summed face
features, optional per-face normalisation and detector-score weighting, media mean, template sum,
L2 normalisation, cosine per pair, sklearn's roc_curve and the nearest-FPR TAR rule.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")
sk_metrics = pytest.importorskip("sklearn.metrics")

from sphereface_plus.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
KEYS = ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


def write_ijb(root: Path, dataset: str = "IJBC", ids: int = 14, seed: int = 0):
    """A small IJB set: per identity 4 templates of 2-3 media with 1-3 faces each (rendered faces)."""
    from data_prep.synthetic_faces import identity_params, image_params, render_image

    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    tid_mid, pts, faces = [], [], []
    tid, mid, k = 0, 1000, 0
    template_subject = {}
    for s in range(ids):
        for _ in range(4):
            tid += 1
            template_subject[tid] = s
            for _ in range(int(rng.integers(2, 4))):
                mid += 1
                for _ in range(int(rng.integers(1, 4))):
                    k += 1
                    name = f"{k}.jpg"
                    image, lm = render_image(identity_params(seed, s), image_params(seed, s, k), 128)
                    lm = np.round(lm, 3)  # as written to the file
                    cv2.imwrite(str(root / "loose_crop" / name), image)
                    score = round(float(rng.uniform(0.3, 1.0)), 6)  # as written to the file
                    tid_mid.append(f"{name} {tid} {mid}")
                    pts.append(" ".join([name] + [f"{v:.3f}" for v in lm.ravel()] + [f"{score:.6f}"]))
                    faces.append((name, tid, mid, lm, score))
    tids = sorted(template_subject)
    pairs = [(a, b, int(template_subject[a] == template_subject[b])) for i, a in enumerate(tids) for b in tids[i + 1:]]
    ds = dataset.lower()
    (root / "meta" / f"{ds}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (root / "meta" / f"{ds}_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    (root / "meta" / f"{ds}_template_pair_label.txt").write_text("\n".join(f"{a} {b} {y}" for a, b, y in pairs) + "\n")
    return faces, pairs


def reference(faces, pairs, feats: dict, detector_score=False, normalize_faces=False):
    """insightface's pipeline in float64 loops: returns (scores, tar_at_far dict, bounded TAR dict)."""
    by_template = {}
    for name, tid, mid, _, score in faces:
        f = np.asarray(feats[name], dtype=np.float64)
        if normalize_faces:
            f = f / np.sqrt(np.sum(f ** 2))
        if detector_score:
            f = f * score
        by_template.setdefault(tid, {}).setdefault(mid, []).append(f)
    tfeat = {}
    for tid, media in by_template.items():
        total = np.zeros_like(next(iter(media.values()))[0])
        for vecs in media.values():
            total = total + np.mean(vecs, axis=0)
        tfeat[tid] = total / np.sqrt(np.sum(total ** 2))
    scores = np.array([float(np.dot(tfeat[a], tfeat[b])) for a, b, _ in pairs])
    labels = np.array([y for _, _, y in pairs])
    fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tar = {}
    for key, x in zip(KEYS, FARS):
        _, i = min(zip(abs(fpr - x), range(len(fpr))))
        tar[key] = float(tpr[i])
    bounded = {}
    gen, imp = scores[labels == 1], scores[labels == 0]
    for key, x in zip(KEYS, FARS):
        best = 0.0
        for t in np.r_[-np.inf, np.unique(scores)]:
            if (imp > t).sum() <= x * imp.size * (1 + 1e-12):
                best = max(best, float((gen > t).mean()))
        bounded[key] = best
    return scores, tar, bounded


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    faces, pairs = write_ijb(root)
    return root, faces, pairs


def test_synthetic_set_is_big_enough(ijb):
    root, faces, pairs = ijb
    media_per_template = {}
    for _, tid, mid, _, _ in faces:
        media_per_template.setdefault(tid, set()).add(mid)
    assert len(faces) >= 250 and min(len(m) for m in media_per_template.values()) >= 2
    assert sum(y for *_, y in pairs) >= 50 and len(pairs) > 1500


@pytest.mark.parametrize("detector_score,normalize_faces", [(False, False), (True, False), (True, True)])
def test_features_file_scores_match_brute_force(ijb, tmp_path, detector_score, normalize_faces):
    from eval.features import save_features_npz

    root, faces, pairs = ijb
    rng = np.random.default_rng(1)
    names = [f[0] for f in faces]
    # shared subject direction + noise, varied norms: genuine pairs score higher, norms matter in N1
    subject = {f[1]: None for f in faces}
    base = rng.standard_normal((len(subject) // 4 + 1, 24))
    feats = {}
    for name, tid, *_ in faces:
        feats[name] = ((base[(tid - 1) // 4] + 1.2 * rng.standard_normal(24)) * rng.uniform(0.2, 3.0)).astype(np.float32)
    order = rng.permutation(len(names))  # any order
    npz = tmp_path / "f.npz"
    save_features_npz(npz, [names[i] for i in order], np.stack([feats[names[i]] for i in order]))
    out = tmp_path / "r.json"
    argv = ["verify", "ijb", "--root", str(root), "--dataset", "IJBC", "--features", str(npz), "--json", str(out),
            "--plot", str(tmp_path / "roc.png")]
    argv += ["--detector-score"] * detector_score + ["--normalize-faces"] * normalize_faces
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    ref_scores, ref_tar, ref_bounded = reference(faces, pairs, feats, detector_score, normalize_faces)
    assert list(rep["tar_at_far"]) == KEYS
    assert rep["tar_at_far"] == pytest.approx(ref_tar, abs=0)
    assert rep["tar_at_far_bounded"] == pytest.approx(ref_bounded, abs=0)
    labels = np.array([y for *_, y in pairs])
    assert rep["auc"] == pytest.approx(sk_metrics.roc_auc_score(labels, ref_scores), abs=1e-9)
    assert rep["num_pairs"] == len(pairs) and rep["num_templates"] == len({f[1] for f in faces})
    assert (tmp_path / "roc.png").stat().st_size > 1000

    from eval.ijb import evaluate_ijb, load_ijb_meta

    _, scores = evaluate_ijb(load_ijb_meta(root, "IJBC"), [names[i] for i in order],
                             np.stack([feats[names[i]] for i in order]), detector_score, normalize_faces)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-12)


def test_model_run_aligns_embeds_and_saves_features(ijb, tmp_path):
    from data_prep import align_face
    from sphereface_plus import create_backbone

    root, faces, pairs = ijb
    torch.manual_seed(0)
    model = create_backbone("sphere4", input_size=(112, 96), embedding_dim=32).eval()
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 1,
                "config": {"model": {"backbone": "sphere4", "input_size": [112, 96], "embedding_dim": 32},
                           "data": {"template": "112x96"}}}, ckpt)
    crops = [align_face(cv2.imread(str(root / "loose_crop" / f[0])), f[3], template="112x96") for f in faces]
    x = torch.stack([(torch.from_numpy(c).permute(2, 0, 1).float() - 127.5) / 128 for c in crops])
    with torch.no_grad():
        ref_feats = (model(x) + model(x.flip(3))).double().numpy()
    feats = {f[0]: ref_feats[i] for i, f in enumerate(faces)}
    _, ref_tar, _ = reference(faces, pairs, feats, detector_score=True)

    j1, npz = tmp_path / "a.json", tmp_path / "f.npz"
    assert main(["verify", "ijb", "--root", str(root), "--checkpoint", str(ckpt), "--detector-score", "--json", str(j1),
                 "--save-features", str(npz), "--workers", "0", "--batch-size", "50"]) == 0
    rep = json.loads(j1.read_text())
    assert rep["tar_at_far"] == pytest.approx(ref_tar, abs=0)
    with np.load(npz) as z:
        saved = dict(zip(z["paths"], z["features"]))
    assert set(saved) == set(feats)
    np.testing.assert_allclose(np.stack([saved[f[0]] for f in faces]), ref_feats, rtol=1e-4, atol=1e-4)
    j2 = tmp_path / "b.json"
    assert main(["verify", "ijb", "--root", str(root), "--features", str(npz), "--detector-score", "--json", str(j2)]) == 0
    assert json.loads(j2.read_text())["tar_at_far"] == rep["tar_at_far"]


BAD_LINES = [
    ("ijbc_face_tid_mid.txt", 3, "5.jpg 2", "expected 3 fields"),
    ("ijbc_face_tid_mid.txt", 1, "1.jpg one 1001", "must be integers"),
    ("ijbc_template_pair_label.txt", 7, "1 2 5", "label must be 0 or 1"),
    ("ijbc_template_pair_label.txt", 2, "1 x 0", "must be integers"),
    ("ijbc_template_pair_label.txt", 4, "1 999 0", "has no face"),
    ("ijbc_name_5pts_score.txt", 5, "5.jpg 1 2 3", "expected a name and 11 numbers"),
]


def _corrupt(src: Path, dst: Path, fname: str, line_no: int, text: str) -> None:
    import shutil

    shutil.copytree(src / "meta", dst / "meta")
    os.symlink(src / "loose_crop", dst / "loose_crop")
    p = dst / "meta" / fname
    lines = p.read_text().splitlines()
    lines[line_no - 1] = text
    p.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fname,line_no,text,problem", BAD_LINES)
def test_bad_meta_line_is_one_clear_error(ijb, tmp_path, capsys, fname, line_no, text, problem):
    root, faces, _ = ijb
    bad = tmp_path / "IJBC"
    _corrupt(root, bad, fname, line_no, text)
    npz = tmp_path / "f.npz"
    from eval.features import save_features_npz

    save_features_npz(npz, [f[0] for f in faces], np.ones((len(faces), 4), dtype=np.float32))
    assert main(["verify", "ijb", "--root", str(bad), "--features", str(npz), "--detector-score"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1
    assert f"{fname}:{line_no}:" in err[0] and problem in err[0] and repr(text) in err[0]


def test_bad_meta_line_via_subprocess(ijb, tmp_path):
    root, faces, _ = ijb
    bad = tmp_path / "IJBC"
    _corrupt(root, bad, "ijbc_template_pair_label.txt", 7, "1 2 5")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "sphereface_plus", "verify", "ijb", "--root", str(bad), "--checkpoint",
                        str(tmp_path / "none.pt")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "ijbc_template_pair_label.txt:7:" in errors[0] and "Traceback" not in r.stderr
    # missing meta folder: one line naming the file and the fix
    r = subprocess.run([sys.executable, "-m", "sphereface_plus", "verify", "ijb", "--root", str(tmp_path / "nope"),
                        "--dataset", "IJBB", "--features", "f.npz"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "ijbb_face_tid_mid.txt does not exist" in errors[0]


def test_nearest_far_rule_matches_insightface_on_ties():
    from eval.verification_metrics import roc_curve, tar_at_nearest_far

    rng = np.random.default_rng(3)
    scores = np.round(rng.standard_normal(3000), 1)  # many ties -> vertical ROC segments
    labels = rng.random(3000) < 0.3
    scores[labels] += 0.8
    fpr, tpr, thr = roc_curve(scores, labels)
    sfpr, stpr, _ = sk_metrics.roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, sfpr)
    ffpr, ftpr = np.flipud(sfpr), np.flipud(stpr)
    for x in [1e-3, 1e-2, 0.05, 0.1, 0.3]:
        _, i = min(zip(abs(ffpr - x), range(len(ffpr))))
        assert tar_at_nearest_far(fpr, tpr, thr, x)["tar"] == ftpr[i]


# --------------------------------------------------------------------------- 1:N identification


def write_1n_lists(root: Path, faces, dataset: str = "IJBC", ids: int = 14):
    """Galleries: the first template of subjects 0..6 (G1) and 7..13 (G2); probes: the other templates."""
    ds = dataset.lower()
    g1, g2 = ("G1", "G2") if dataset == "IJBC" else ("S1", "S2")
    rows = {g1: [], g2: [], "probe": []}
    for name, tid, *_ in faces:
        subject = (tid - 1) // 4
        first = (tid - 1) % 4 == 0
        key = "probe" if not first else (g1 if subject < ids // 2 else g2)
        rows[key].append(f"{tid},{subject},img/{name},0")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
    for key, lines in rows.items():
        fname = f"{ds}_1N_probe_mixed.csv" if key == "probe" else f"{ds}_1N_gallery_{key}.csv"
        (root / "meta" / fname).write_text(header + "\n".join(lines) + "\n")
    return g1, g2


def _template_feats(faces, feats, detector_score):
    by_template = {}
    for name, tid, mid, _, score in faces:
        f = np.asarray(feats[name], dtype=np.float64) * (score if detector_score else 1.0)
        by_template.setdefault(tid, {}).setdefault(mid, []).append(f)
    out = {}
    for tid, media in by_template.items():
        total = sum(np.mean(v, axis=0) for v in media.values())
        out[tid] = total / np.sqrt(np.sum(total ** 2))
    return out


def brute_1n(tfeat, gallery, probes, fpirs=(1e-2, 1e-1), ranks=(1, 5, 10)):
    """Rank of the mate by sorting each probe's gallery scores; TPIR from the FPIR threshold over the
    non-mated searches' best scores (insightface's evaluation_1N, written as loops)."""
    mated_rank, mated_score, non_top = [], [], []
    for pt, ps in probes.items():
        scores = [(float(np.dot(tfeat[pt], tfeat[gt])), gs) for gt, gs in gallery.items()]
        ordered = sorted(scores, key=lambda x: -x[0])
        if ps in gallery.values():
            mated_rank.append(1 + [s for _, s in ordered].index(ps))
            mated_score.append([v for v, s in scores if s == ps][0])
        else:
            non_top.append(ordered[0][0])
    non_top = sorted(non_top, reverse=True)
    tpir = []
    for f in fpirs:
        t = non_top[max(int(len(non_top) * f) - 1, 0)]
        tpir.append(sum(1 for r, v in zip(mated_rank, mated_score) if r == 1 and v > t) / len(mated_rank))
    cmc = [sum(1 for r in mated_rank if r <= k) / len(mated_rank) for k in ranks]
    return tpir, cmc, len(mated_rank), len(non_top)


@pytest.mark.parametrize("dataset", ["IJBC", "IJBB"])
def test_1n_identification_matches_brute_force(tmp_path, dataset):
    from eval.features import save_features_npz

    root = tmp_path / dataset
    faces, _ = write_ijb(root, dataset=dataset, ids=14)
    g1, g2 = write_1n_lists(root, faces, dataset)
    rng = np.random.default_rng(7)
    base = rng.standard_normal((14, 24))
    feats = {name: ((base[(tid - 1) // 4] + 1.6 * rng.standard_normal(24)) * rng.uniform(0.3, 2.0)).astype(np.float32)
             for name, tid, *_ in faces}
    names = [f[0] for f in faces]
    save_features_npz(tmp_path / "f.npz", names, np.stack([feats[n] for n in names]))
    out = tmp_path / "r.json"
    assert main(["verify", "ijb", "--root", str(root), "--dataset", dataset, "--features", str(tmp_path / "f.npz"),
                 "--task", "1:N", "--detector-score", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["task"] == "1:N" and "tar_at_far" not in rep and rep["protocol"] == "insightface"
    galleries = rep["identification"]["galleries"]
    assert list(galleries) == [g1, g2]  # scored and reported separately
    tfeat = _template_feats(faces, {n: feats[n].astype(np.float64) for n in names}, detector_score=True)
    subject = {tid: (tid - 1) // 4 for _, tid, *_ in faces}
    probes = {t: s for t, s in subject.items() if (t - 1) % 4}
    for g, lo, hi in ((g1, 0, 7), (g2, 7, 14)):
        gallery = {t: s for t, s in subject.items() if (t - 1) % 4 == 0 and lo <= s < hi}
        tpir, cmc, n_mated, n_non = brute_1n(tfeat, gallery, probes)
        got = galleries[g]
        assert (got["num_mated"], got["num_nonmated"], got["num_gallery_templates"]) == (n_mated, n_non, 7)
        assert [got["tpir_at_fpir"][k] for k in ("1e-2", "1e-1")] == pytest.approx(tpir, abs=1e-15)
        assert [got["rank"][k] for k in ("1", "5", "10")] == pytest.approx(cmc, abs=1e-15)
    assert 0 < galleries[g1]["rank"]["1"] < 1  # informative: neither trivial nor hopeless


def test_1n_both_tasks_and_bad_gallery(ijb, tmp_path, capsys):
    import shutil

    from eval.features import save_features_npz

    root, faces, pairs = ijb
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    os.symlink(root / "loose_crop", bad / "loose_crop")
    write_1n_lists(bad, faces)
    rng = np.random.default_rng(0)
    save_features_npz(tmp_path / "f.npz", [f[0] for f in faces], rng.standard_normal((len(faces), 8)).astype(np.float32))
    out = tmp_path / "r.json"
    assert main(["verify", "ijb", "--root", str(bad), "--features", str(tmp_path / "f.npz"), "--task", "both",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["num_pairs"] == len(pairs) and set(rep["identification"]["galleries"]) == {"G1", "G2"}
    printed = capsys.readouterr().out
    assert "1:N identification (galleries scored separately" in printed and "TPIR@1e-2" in printed
    # a template listed with two subjects: one error line naming the file and line
    p = bad / "meta" / "ijbc_1N_gallery_G2.csv"
    lines = p.read_text().splitlines()
    t = lines[1].split(",")
    lines.insert(2, f"{t[0]},999,x.jpg,0")
    p.write_text("\n".join(lines) + "\n")
    assert main(["verify", "ijb", "--root", str(bad), "--features", str(tmp_path / "f.npz"), "--task", "1:N"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "ijbc_1N_gallery_G2.csv:3:" in err[0] and "one subject" in err[0]
