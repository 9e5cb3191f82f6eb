"""``verify packs`` on small packs that ``pack-bin`` writes from real LFW crops, against a hand computation
(model on the middle 96 columns of each 112x112 crop and on its mirror) and the float64 transcription of
insightface's protocol (tests/protocol_reference.py); the size rule and its error."""
from __future__ import annotations

import json

import numpy as np
import pytest

import protocol_reference as ref
from shared_data import LFW

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

needs_lfw = pytest.mark.skipif(not (LFW / "pairs.txt").is_file() or not (LFW / "lfw_landmark.txt").is_file(),
                               reason=f"real LFW not found at {LFW} (../shared/data/lfw)")


def _checkpoint(path, size=(112, 96)):
    from sphereface_plus import create_backbone

    torch.manual_seed(0)
    model = create_backbone("sphere4", input_size=size, embedding_dim=32).eval()
    cfg = {"model": {"backbone": "sphere4", "input_size": list(size), "embedding_dim": 32},
           "data": {"template": f"{size[0]}x{size[1]}"}}
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 1, "config": cfg}, path)
    return model


@pytest.fixture(scope="module")
def lfw_packs(tmp_path_factory):
    """Two packs (lfw: 60 pairs of fold 1, cfp_fp: 60 pairs of fold 2) of 112x112 LFW crops, by pack-bin."""
    from data_prep import align_face
    from data_prep.landmarks import read_landmarks
    from eval.pairs import parse_lfw_pairs
    from sphereface_plus.cli import main

    d = tmp_path_factory.mktemp("packs")
    pairs = parse_lfw_pairs(LFW / "pairs.txt")
    marks = read_landmarks(LFW / "lfw_landmark.txt")
    chosen = {"lfw": [p for p in pairs if p.fold == 0 and p.same][:30] + [p for p in pairs if p.fold == 0 and not p.same][:30],
              "cfp_fp": [p for p in pairs if p.fold == 1 and p.same][:30] + [p for p in pairs if p.fold == 1 and not p.same][:30]}
    (d / "crops").mkdir()
    (d / "packs").mkdir()
    for name, ps in chosen.items():
        for p in ps:
            for rel in (p.path1, p.path2):
                out = d / "crops" / rel
                if not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    crop = align_face(cv2.imread(str(LFW / "images" / rel)), marks[rel], template="112x112")
                    cv2.imwrite(str(out), crop)
        (d / f"{name}.txt").write_text("".join(f"{p.path1} {p.path2} {int(p.same)}\n" for p in ps))
        assert main(["pack-bin", "--pairs", str(d / f"{name}.txt"), "--format", "pairs", "--root", str(d / "crops"),
                     "--out", str(d / "packs" / f"{name}.bin")]) == 0
    return d


@needs_lfw
def test_verify_packs_matches_hand_computation(lfw_packs, tmp_path, capsys):
    from eval.pairs import load_bin_pack
    from sphereface_plus.cli import main

    model = _checkpoint(tmp_path / "ck.pt")
    out, npz = tmp_path / "r.json", tmp_path / "f.npz"
    assert main(["verify", "packs", "--dir", str(lfw_packs / "packs"), "--checkpoint", str(tmp_path / "ck.pt"),
                 "--json", str(out), "--save-features", str(npz), "--workers", "0", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["protocol"] == "insightface" and list(rep["packs"]) == ["lfw", "cfp_fp"]  # standard order
    with np.load(npz) as z:
        names, saved = list(z["paths"]), z["features"]
    for name, n_pairs in (("lfw", 60), ("cfp_fp", 60)):
        images, issame = load_bin_pack(lfw_packs / "packs" / f"{name}.bin")
        crops = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in images]
        assert crops[0].shape == (112, 112, 3)
        x = torch.stack([(torch.from_numpy(c[:, 8:104].copy()).permute(2, 0, 1).float() - 127.5) / 128 for c in crops])
        with torch.no_grad():
            hand = torch.cat([model(x), model(x.flip(3))], 1).numpy()
        rows = np.array([i for i, n in enumerate(names) if n.startswith(name + "/")])
        np.testing.assert_allclose(saved[rows], hand, rtol=1e-4, atol=1e-4)
        f = saved[rows].astype(np.float64)
        folds = ref.contiguous(n_pairs)
        accs, thrs = ref.kfold(ref.distances(ref.embeddings(f[0::2]), ref.embeddings(f[1::2])), issame, folds)
        got = rep["packs"][name]
        assert got["num_pairs"] == n_pairs and got["fold_accuracies"] == accs and got["fold_thresholds"] == thrs
        assert f"{name:<10} {n_pairs:>6}  {100 * np.mean(accs):7.2f}% +- {100 * np.std(accs):5.2f}" in printed
    assert rep["mean_accuracy"] == pytest.approx(np.mean([rep["packs"][n]["mean_accuracy"] for n in rep["packs"]]))
    assert f"{'mean':<10} {'':>6}  {100 * rep['mean_accuracy']:7.2f}%" in printed and "protocol: insightface" in printed


@needs_lfw
def test_pack_selection_and_protocol_switch(lfw_packs):
    from eval.packs import load_packs, pack_paths, score_packs

    paths = pack_paths(lfw_packs / "packs", ["cfp_fp"])
    assert list(paths) == ["cfp_fp"]
    packs = load_packs(pack_paths(lfw_packs / "packs"))
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(len(p.images), 16)).astype(np.float32) for p in packs]
    rep = score_packs(packs, feats, "sphereface", 10, flip_halves=True)
    assert rep["protocol"] == "sphereface" and all(r["protocol"] == "sphereface" for r in rep["packs"].values())
    assert rep["packs"]["lfw"]["num_pairs"] == 60


@needs_lfw
def test_pack_size_without_rule_is_refused(lfw_packs, tmp_path, capsys):
    from eval.pairs import load_bin_pack, save_bin_pack
    from sphereface_plus.cli import main

    _checkpoint(tmp_path / "ck.pt", size=(112, 112))
    images, issame = load_bin_pack(lfw_packs / "packs" / "cfp_fp.bin")
    small = [cv2.imencode(".jpg", cv2.resize(cv2.imdecode(np.frombuffer(b, np.uint8), 1), (100, 100)))[1].tobytes()
             for b in images]
    (tmp_path / "p").mkdir()
    save_bin_pack(tmp_path / "p" / "agedb_30.bin", small, issame)
    out = tmp_path / "r.json"
    assert main(["verify", "packs", "--dir", str(tmp_path / "p"), "--checkpoint", str(tmp_path / "ck.pt"),
                 "--json", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "agedb_30.bin: its images are 100x100 (HxW) and the model takes 112x112: no rule fits" in err
    assert not out.exists()  # nothing written
    assert main(["verify", "packs", "--dir", str(tmp_path / "p"), "--checkpoint", str(tmp_path / "ck.pt"),
                 "--packs", "agedb30"]) == 2
    assert "did you mean 'agedb_30'" in capsys.readouterr().err
    assert main(["verify", "packs", "--dir", str(tmp_path), "--checkpoint", str(tmp_path / "ck.pt")]) == 2
    assert "holds none of the standard packs" in capsys.readouterr().err
