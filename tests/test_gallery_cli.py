"""``sphereface-plus gallery``: a gallery of random vectors searched through the command line against an independent
brute force, images enrolled with a checkpoint (against the model run by hand), another model's probes refused, a
killed ``add`` reported by the next command, and one-line errors."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval import gallery_store as S
from sphereface_plus.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_set(folder: Path, n=500, people=90, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, d))
    who = rng.integers(0, people, n)
    x = (centres[who] + 0.7 * rng.standard_normal((n, d))).astype(np.float32)
    np.save(folder / "E.npy", x)
    (folder / "IDS.txt").write_text("".join(f"person {w:03d}\n" for w in who))
    q = np.vstack([centres[:20] + 0.7 * rng.standard_normal((20, d)), rng.standard_normal((10, d)) * 3])
    np.save(folder / "Q.npy", q.astype(np.float32))
    return x.astype(np.float64), [f"person {w:03d}" for w in who], q.astype(np.float32).astype(np.float64)


def test_search_through_the_cli_equals_brute_force(tmp_path, capsys):
    x, ids, q = write_set(tmp_path)
    g = str(tmp_path / "g")
    assert main(["gallery", "build", "--gallery", g, "--embeddings", str(tmp_path / "E.npy"), "--ids",
                 str(tmp_path / "IDS.txt"), "--index", "exact", "--fpir", "0.02"]) == 0
    assert main(["gallery", "search", "--gallery", g, "--embeddings", str(tmp_path / "Q.npy"), "--top-k", "4",
                 "--json", str(tmp_path / "hits.json")]) == 0
    out = json.loads((tmp_path / "hits.json").read_text())
    # independent reference: per identity the best cosine over its vectors, float64
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    names = sorted(set(ids))
    best = np.stack([np.max(qn @ xn[[i for i, v in enumerate(ids) if v == n]].T, axis=1) for n in names], 1)
    assert [r["probe"] for r in out["results"]] == [f"Q.npy[{i}]" for i in range(30)]
    for r, row in zip(out["results"], best):
        order = np.argsort(-row)[:4]
        assert [m["identity"] for m in r["matches"]] == [names[o] for o in order]
        np.testing.assert_allclose([m["score"] for m in r["matches"]], row[order], atol=2e-6)
        assert r["decision"] == (names[order[0]] if row[order[0]] > out["threshold"] else "unknown")
    assert out["threshold_source"] == "calibrated" and out["fpir"] == 0.02
    table = capsys.readouterr().out
    assert "person" in table and "30 probes:" in table
    assert main(["gallery", "info", "--gallery", g, "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["num_vectors"] == 500 and info["num_identities"] == len(names) and info["model"] is None


@pytest.mark.parametrize("argv,text", [
    (["build", "--gallery", "{t}/g2", "--images", "{t}"], "--images needs --checkpoint"),
    (["build", "--gallery", "{t}/g2", "--embeddings", "{t}/E.npy", "--ids", "{t}/short.txt"], "2 lines for 500"),
    (["build", "--gallery", "{t}/g2", "--embeddings", "{t}/E.npy", "--ids", "{t}/IDS.txt", "--fpir", "2"], "--fpir"),
    (["build", "--gallery", "{t}/g2", "--embeddings", "{t}/E.npy", "--ids", "{t}/IDS.txt", "--index-param", "x=1"],
     "--index-param"),
    (["build", "--gallery", "{t}/g2", "--embeddings", "{t}/E.npy", "--ids", "{t}/IDS.txt", "--index", "exact",
      "--index-param", "M=8"], "not a setting of the exact index"),
    (["build", "--gallery", "{t}", "--embeddings", "{t}/E.npy", "--ids", "{t}/IDS.txt"], "is not empty"),
    (["search", "--gallery", "{t}", "--embeddings", "{t}/Q.npy"], "holds no gallery"),
    (["info", "--gallery", "{t}/nothing"], "holds no gallery"),
])
def test_mistakes_are_one_error_line(tmp_path, capsys, argv, text):
    write_set(tmp_path)
    (tmp_path / "short.txt").write_text("a\nb\n")
    assert main(["gallery"] + [a.format(t=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sphereface-plus gallery: error:") and text in err[0]
    assert not (tmp_path / "g2").exists()


def test_killed_add_is_reported_by_the_next_command(tmp_path, caplog):
    write_set(tmp_path)
    g = str(tmp_path / "g")
    assert main(["gallery", "build", "--gallery", g, "--embeddings", str(tmp_path / "E.npy"), "--ids",
                 str(tmp_path / "IDS.txt")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), S.FAULT_ENV: "segment:kill", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "sphereface_plus", "gallery", "add", "--gallery", g, "--embeddings",
                        str(tmp_path / "E.npy"), "--ids", str(tmp_path / "IDS.txt")], env=env, capture_output=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING):
        assert main(["gallery", "info", "--gallery", g]) == 0
    assert "the add (enrol 500 vectors" in caplog.text and "interrupted before it committed" in caplog.text
    assert "version 1, 500 vectors" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["gallery", "remove", "--gallery", g, "--id", "person 000"]) == 0
    assert "leftover file(s) removed" in caplog.text and not (tmp_path / "g" / S.JOURNAL).exists()


# --------------------------------------------------------------------------- images and models


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    torch = pytest.importorskip("torch")
    cv2 = pytest.importorskip("cv2")
    from sphereface_plus import create_backbone

    d = tmp_path_factory.mktemp("gallery-images")
    rng = np.random.default_rng(0)
    crops = {}
    for person in ("alice", "bob", "carol"):
        base = rng.integers(0, 256, (112, 96, 3))
        for k in range(2):
            crop = np.clip(base + rng.integers(-30, 30, (112, 96, 3)), 0, 255).astype(np.uint8)
            crops[f"{person}/{k}.png"] = crop
            (d / "enrol" / person).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / "enrol" / person / f"{k}.png"), crop)
    (d / "probes").mkdir()
    for name in ("alice/1.png", "carol/0.png"):
        cv2.imwrite(str(d / "probes" / name.replace("/", "_")), crops[name])
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_backbone("sphere4", input_size=(112, 96)).eval()
        ckpt = d / f"model{seed}.pt"
        torch.save({"model": model.state_dict(), "head": {}, "iteration": 1,
                    "config": {"model": {"backbone": "sphere4", "input_size": [112, 96]},
                               "data": {"template": "112x96"}}}, ckpt)
        ckpts.append((ckpt, model))
    return d, crops, ckpts


def test_images_are_enrolled_with_the_model_and_another_model_is_refused(images, tmp_path, capsys):
    import torch

    from sphereface_plus.utils import sha256_file

    d, crops, ckpts = images
    (ckpt, model), (other, _) = ckpts
    g = str(tmp_path / "g")
    common = ["--precision", "fp32"]
    assert main(["gallery", "build", "--gallery", g, "--checkpoint", str(ckpt), "--images", str(d / "enrol")]
                + common) == 0
    from eval.gallery import Gallery

    gal = Gallery.open(g)
    assert gal.names == ["alice", "bob", "carol"] and gal.num_vectors == 6
    model_id = gal.manifest["model"]
    assert model_id["sha256"] == sha256_file(ckpt) and model_id["flip"] == "concat" and model_id["dim"] == 1024
    # the stored vectors are the model run by hand: crop and mirror, concatenated, L2-normalised
    names = sorted(crops)
    x = torch.stack([(torch.from_numpy(crops[n]).permute(2, 0, 1).float() - 127.5) / 128 for n in names])
    with torch.no_grad():
        ref = torch.cat([model(x), model(x.flip(3))], 1).double().numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    stored = np.concatenate([np.asarray(s.vectors) for s in gal.segments])
    sources = [s.sources[i] for s in gal.segments for i in range(len(s.ids))]
    np.testing.assert_allclose(stored[[sources.index(n) for n in names]], ref, atol=1e-5)
    capsys.readouterr()
    # probes: embedded by the gallery's own model (no --checkpoint needed), found with score 1
    assert main(["gallery", "search", "--gallery", g, "--images", str(d / "probes"), "--json",
                 str(tmp_path / "s.json")] + common) == 0
    res = json.loads((tmp_path / "s.json").read_text())["results"]
    assert [(r["probe"], r["matches"][0]["identity"], r["matches"][0]["source"]) for r in res] == \
        [("alice_1.png", "alice", "alice/1.png"), ("carol_0.png", "carol", "carol/0.png")]
    assert all(abs(r["matches"][0]["score"] - 1) < 1e-5 for r in res)
    # another model's probes, or embeddings that do not say which model made them: one line, refused
    for argv, text in ((["--images", str(d / "probes"), "--checkpoint", str(other)], "model1.pt"),
                       (["--embeddings", str(tmp_path / "q.npy")], "do not say which model")):
        np.save(tmp_path / "q.npy", ref[:2].astype(np.float32))
        capsys.readouterr()
        assert main(["gallery", "search", "--gallery", g] + argv + common) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0] and "model0.pt" in err[0]
    # the same embeddings declared as made by the gallery's model are accepted, or recorded beside them
    assert main(["gallery", "search", "--gallery", g, "--embeddings", str(tmp_path / "q.npy"), "--checkpoint",
                 str(ckpt)]) == 0
    from eval.gallery_inputs import save_embeddings

    save_embeddings(tmp_path / "q.npy", ref[:2], model_id)
    assert (tmp_path / "q.model.json").is_file()
    assert main(["gallery", "search", "--gallery", g, "--embeddings", str(tmp_path / "q.npy")]) == 0
    save_embeddings(tmp_path / "q.npy", ref[:2], {**model_id, "sha256": "0" * 64, "file": "other.pt"})
    capsys.readouterr()
    assert main(["gallery", "search", "--gallery", g, "--embeddings", str(tmp_path / "q.npy")]) == 2
    assert "other.pt" in capsys.readouterr().err
