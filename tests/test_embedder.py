"""FaceEmbedder and `sphereface-plus compare` on real LFW images, against the model run by hand."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from sphereface_plus.cli import main  # noqa: E402
from shared_data import LFW

pytestmark = pytest.mark.skipif(not (LFW / "lfw_landmark.txt").is_file(), reason=f"real LFW not found at {LFW}")

IMAGES = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
          "Abdullah_Gul/Abdullah_Gul_0001.jpg"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_prep import align_face
    from sphereface_plus import create_backbone

    d = tmp_path_factory.mktemp("embedder")
    torch.manual_seed(0)
    model = create_backbone("sphere4", input_size=(112, 96)).eval()
    marks = {}
    for line in (LFW / "lfw_landmark.txt").read_text().splitlines():
        f = line.split()
        if f and f[0] in IMAGES:
            marks[f[0]] = np.array(f[1:], dtype=np.float64).reshape(5, 2)
    crops = {}
    for rel in IMAGES:
        crops[rel] = align_face(cv2.imread(str(LFW / "images" / rel)), marks[rel], template="112x96")
        cv2.imwrite(str(d / Path(rel).name.replace(".jpg", ".png")), crops[rel])
    x = torch.stack([(torch.from_numpy(crops[r]).permute(2, 0, 1).float() - 127.5) / 128 for r in IMAGES])
    with torch.no_grad():
        ref = torch.cat([model(x), model(x.flip(3))], 1).double().numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    sim = float(ref[0] @ ref[1])
    ckpt = d / "ck.pt"
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 5, "threshold": sim - 0.01,
                "config": {"model": {"backbone": "sphere4", "input_size": [112, 96]}, "data": {"template": "112x96"}}},
               ckpt)
    return d, ckpt, crops, ref


def test_embed_aligned_batch_matches_model(setup):
    from eval.embedder import FaceEmbedder

    d, ckpt, crops, ref = setup
    emb = FaceEmbedder(ckpt, precision="fp32")  # bit-level reference; bf16: tests/test_precision.py
    got = emb.embed([crops[r] for r in IMAGES], aligned=True)
    assert got.shape == (3, 1024) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert emb.threshold == pytest.approx(float(ref[0] @ ref[1]) - 0.01)


def test_compare_cli_on_lfw_crops(setup, capsys):
    d, ckpt, crops, ref = setup
    a, b, c = (str(d / Path(r).name.replace(".jpg", ".png")) for r in IMAGES)
    sim = float(ref[0] @ ref[1])
    assert main(["compare", a, b, "--checkpoint", str(ckpt), "--aligned", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"cosine similarity: (-?[\d.]+)", out).group(1))
    assert printed == pytest.approx(sim, abs=1e-4)
    assert "same person" in out and "from the checkpoint" in out  # stored threshold = sim - 0.01
    assert main(["compare", a, c, "--checkpoint", str(ckpt), "--aligned", "--threshold", str(sim + 0.5),
                 "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"cosine similarity: (-?[\d.]+)", out).group(1)) == pytest.approx(ref[0] @ ref[2], abs=1e-4)
    assert "different people" in out and "given" in out
    assert main(["compare", a, str(d / "nope.png"), "--checkpoint", str(ckpt), "--aligned"]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_detect_align_embed_raw_lfw(setup, capsys):
    from eval.embedder import FaceEmbedder

    d, ckpt, crops, ref = setup
    emb = FaceEmbedder(ckpt, detector="mtcnn")
    try:
        emb.detector
    except Exception as e:  # weights not fetched on this machine
        pytest.skip(f"MTCNN unavailable: {e}")
    raw = [cv2.imread(str(LFW / "images" / r)) for r in IMAGES[:2]]
    aligned = [emb.align(im) for im in raw]
    assert aligned[0].shape == (112, 96, 3)
    # MTCNN landmarks are within a few pixels of the file's: the crops look alike
    assert np.abs(aligned[0].astype(float) - crops[IMAGES[0]].astype(float)).mean() < 40
    feats = emb.embed(aligned, aligned=True)
    # detect + align + embed through the command equals embedding the crops the detector aligns
    assert main(["compare", str(LFW / "images" / IMAGES[0]), str(LFW / "images" / IMAGES[1]),
                 "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"cosine similarity: (-?[\d.]+)", out).group(1)) == pytest.approx(
        float(feats[0] @ feats[1]), abs=1e-4)
