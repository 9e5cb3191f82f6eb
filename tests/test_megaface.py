"""eval.megaface: devkit feature files, the scorer against brute force, export/score round trip."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from eval.megaface import evaluate, feature_bytes, read_feature, read_image_list, write_feature
from shared_data import LFW



def test_reader_on_file_written_byte_by_byte(tmp_path):
    values = [0.5, -0.25, 1.0, 3.0e-3, -7.5]
    raw = b""
    for v in (5, 1, 4, 5):  # rows = D, cols = 1, row stride 4 bytes, CV_32F
        raw += bytes([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF, (v >> 24) & 0xFF])
    for v in values:
        raw += struct.pack("<f", v)
    f = tmp_path / "a.jpg_x.bin"
    f.write_bytes(raw)
    np.testing.assert_array_equal(read_feature(f), np.array(values, dtype=np.float32))
    # and the writer produces exactly these bytes
    write_feature(tmp_path / "b.bin", values)
    assert (tmp_path / "b.bin").read_bytes() == raw
    # a row vector (1 x D, stride 4D) as OpenCV would also write it
    row = struct.pack("<4i", 1, 5, 20, 5) + np.array(values, "<f4").tobytes()
    (tmp_path / "c.bin").write_bytes(row)
    np.testing.assert_array_equal(read_feature(tmp_path / "c.bin"), np.array(values, dtype=np.float32))


def test_writer_normalises_and_reader_rejects_bad_files(tmp_path):
    write_feature(tmp_path / "n.bin", [3.0, 4.0], normalize=True)
    np.testing.assert_allclose(read_feature(tmp_path / "n.bin"), [0.6, 0.8], rtol=1e-7)
    good = feature_bytes([1.0, 2.0, 3.0])
    (tmp_path / "t.bin").write_bytes(good[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_feature(tmp_path / "t.bin")
    (tmp_path / "i.bin").write_bytes(struct.pack("<4i", 3, 1, 4, 4) + good[16:])
    with pytest.raises(ValueError, match="type 4"):
        read_feature(tmp_path / "i.bin")


def _synthetic(rng, n_ids=15, dim=12, n_dist=300):
    labels, feats = [], []
    for k in range(n_ids):
        centre = rng.normal(size=dim)
        for _ in range(int(rng.integers(2, 6))):
            feats.append(centre + 0.9 * rng.normal(size=dim))
            labels.append(f"id{k}")
    return np.array(feats), np.array(labels), rng.normal(size=(n_dist, dim))


def _brute(P, labels, D, n, far):
    P = P / np.linalg.norm(P, axis=1, keepdims=True)
    D = D / np.linalg.norm(D, axis=1, keepdims=True)
    hits = trials = 0
    for i in range(len(P)):
        dmax = max(float(P[i] @ d) for d in D[:n])
        for j in range(len(P)):
            if i != j and labels[i] == labels[j]:
                trials += 1
                hits += float(P[i] @ P[j]) > dmax
    gen = [float(P[i] @ P[j]) for i in range(len(P)) for j in range(i + 1, len(P)) if labels[i] == labels[j]]
    imp = (P @ D.T).ravel()
    gen = np.array(gen)
    best = 0.0
    # thresholds below the 100th-largest impostor score let in > 100 false accepts: never valid here
    cand = np.unique(np.r_[gen, imp])
    for t in np.r_[-np.inf, cand[cand >= np.sort(imp)[-min(100, imp.size)]]]:
        if (imp > t).sum() <= far * imp.size * (1 + 1e-12):
            best = max(best, float((gen > t).mean()))
    return hits / trials, best


@pytest.mark.parametrize("far", [1e-6, 1e-3])
def test_evaluate_matches_brute_force(far):
    rng = np.random.default_rng(0)
    P, labels, D = _synthetic(rng)
    sizes = [10, 100, 300]
    # a small block forces chunks that straddle the size boundaries
    res = evaluate(P, labels, D, far=far, sizes=sizes, block_elements=7 * len(P), dtype=np.float64)
    for n in sizes:
        rank1, tar = _brute(P, labels, D, n, far)
        assert res["rank1_by_size"][str(n)] == rank1
    assert res["rank1"] == res["rank1_by_size"]["300"]
    assert res["tar"] == tar  # tar from the n = 300 brute force
    assert 0.05 < res["rank1_by_size"]["300"] < res["rank1_by_size"]["10"] <= 1.0
    # the same from an iterable of uneven chunks
    chunks = [D[:37], D[37:38], D[38:250], D[250:]]
    res2 = evaluate(P, labels, iter(chunks), far=far, sizes=sizes, num_distractors=300, dtype=np.float64)
    assert res2["rank1_by_size"] == res["rank1_by_size"] and res2["tar"] == res["tar"]


def test_image_lists(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"path": ["x/1.jpg", "y/2.jpg"], "id": ["x", "y"]}))
    assert read_image_list(tmp_path / "a.json") == (["x/1.jpg", "y/2.jpg"], ["x", "y"])
    (tmp_path / "b.txt").write_text("x/1.jpg\ny/2.jpg\n")
    assert read_image_list(tmp_path / "b.txt") == (["x/1.jpg", "y/2.jpg"], None)


@pytest.mark.skipif(not LFW.is_dir(), reason=f"real LFW not found at {LFW}")
def test_export_score_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from data_prep import align_face
    from sphereface_plus import create_backbone
    from sphereface_plus.cli import main

    torch.manual_seed(0)
    model = create_backbone("sphere4", input_size=(112, 96)).eval()
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 0,
                "config": {"model": {"backbone": "sphere4", "input_size": [112, 96]}, "data": {"template": "112x96"}}},
               ckpt)
    probes = [f"{n}/{n}_{i:04d}.jpg" for n in ("Aaron_Peirsol", "Abdullah_Gul") for i in (1, 2, 3)]
    dist = [f"{n}/{n}_0001.jpg" for n in ("Aaron_Eckhart", "Aaron_Guiel", "Abba_Eban", "Abbas_Kiarostami")]
    marks = {}
    for line in (LFW / "lfw_landmark.txt").read_text().splitlines():
        f = line.split()
        if f and f[0] in probes + dist:
            marks[f[0]] = line
    (tmp_path / "lm.txt").write_text("\n".join(marks.values()) + "\n")
    (tmp_path / "probes.txt").write_text("\n".join(probes) + "\n")
    (tmp_path / "dist.json").write_text(json.dumps({"path": dist}))
    out = tmp_path / "feats"
    common = ["--checkpoint", str(ckpt), "--root", str(LFW / "images"), "--landmarks", str(tmp_path / "lm.txt"),
              "--workers", "0", "--batch-size", "4", "--suffix", "_t.bin", "--precision", "fp32"]
    assert main(["megaface", "export", "--list", str(tmp_path / "probes.txt"), "--out", str(out / "p")] + common) == 0
    assert main(["megaface", "export", "--list", str(tmp_path / "dist.json"), "--out", str(out / "d")] + common) == 0
    # reference: the model run by hand on landmark-aligned crops, crop + mirror, L2-normalised
    import cv2

    for rel in probes[:2] + dist[:1]:
        lm = np.array(marks[rel].split()[1:], dtype=float).reshape(5, 2)
        crop = align_face(cv2.imread(str(LFW / "images" / rel)), lm, template="112x96")
        x = (torch.from_numpy(crop).permute(2, 0, 1).float()[None] - 127.5) / 128
        with torch.no_grad():
            ref = torch.cat([model(x), model(x.flip(3))], 1)[0].double().numpy()
        ref /= np.linalg.norm(ref)
        sub = "p" if rel in probes else "d"
        np.testing.assert_allclose(read_feature(out / sub / f"{rel}_t.bin"), ref, atol=2e-5)
    # resume: nothing recomputed; a deleted file is redone alone
    victim = out / "p" / f"{probes[4]}_t.bin"
    stamp = (out / "p" / f"{probes[0]}_t.bin").stat().st_mtime_ns
    victim.unlink()
    assert main(["megaface", "export", "--list", str(tmp_path / "probes.txt"), "--out", str(out / "p")] + common) == 0
    assert victim.is_file() and (out / "p" / f"{probes[0]}_t.bin").stat().st_mtime_ns == stamp
    # score from the files = evaluate on the features read back
    rj = tmp_path / "mf.json"
    assert main(["megaface", "score", "--probe-list", str(tmp_path / "probes.txt"), "--probe-dir", str(out / "p"),
                 "--distractor-list", str(tmp_path / "dist.json"), "--distractor-dir", str(out / "d"),
                 "--suffix", "_t.bin", "--sizes", "2,4", "--far", "0.1", "--chunk", "3", "--json", str(rj)]) == 0
    got = json.loads(rj.read_text())
    P = np.stack([read_feature(out / "p" / f"{p}_t.bin") for p in probes])
    D = np.stack([read_feature(out / "d" / f"{p}_t.bin") for p in dist])
    labels = [p.split("/")[0] for p in probes]
    for n in (2, 4):
        rank1, tar = _brute(P.astype(np.float64), labels, D.astype(np.float64), n, 0.1)
        assert got["rank1_by_size"][str(n)] == pytest.approx(rank1)
    assert got["tar"] == pytest.approx(tar)
    assert got["num_trials"] == 12 and got["num_distractors"] == 4
