"""sphereface-plus export: ONNX and TorchScript files of a (briefly) trained model against PyTorch on real LFW crops.

The exported files are run with onnxruntime / torch.jit directly (not through the toolkit's
wrapper) at batch sizes 1 and 17; verification through the toolkit with the .onnx file must give
the same LFW fold accuracies as the checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from sphereface_plus.cli import main  # noqa: E402
from shared_data import LFW

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (LFW / "lfw_landmark.txt").is_file(), reason=f"real LFW not found at {LFW}")
TOL = 1e-4


def _prep(crops):
    return torch.stack([(torch.from_numpy(c).permute(2, 0, 1).float() - 127.5) / 128 for c in crops])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A sphere4 trained 6 iterations with the toolkit's trainer, a 40-pair LFW subset and its crops."""
    from data_prep import align_face
    from eval.features import load_embedding_model, read_landmarks
    from eval.pairs import parse_lfw_pairs
    from sphereface_plus.commands.train import train

    d = tmp_path_factory.mktemp("export")
    summary = train(str(REPO / "configs" / "face" / "cpu_smoke.yaml"),
                    overrides=[f"out_dir={d / 'run'}", "train.iterations=6", "checkpoint.every=6", "train.log_every=3"])
    ckpt = Path(summary["checkpoint"])
    backbone, info = load_embedding_model(ckpt)
    assert info["threshold"] is not None  # the trainer stored a compare threshold
    pairs = parse_lfw_pairs(LFW / "pairs.txt")
    subset = []
    for fold in range(10):  # 2 matched + 2 mismatched pairs from every fold
        same = [p for p in pairs if p.fold == fold and p.same][:2]
        diff = [p for p in pairs if p.fold == fold and not p.same][:2]
        subset += same + diff
    (d / "pairs.txt").write_text("".join(f"{p.path1} {p.path2} {int(p.same)} {p.fold}\n" for p in subset))
    paths = list(dict.fromkeys([p.path1 for p in subset] + [p.path2 for p in subset]))
    marks = read_landmarks(LFW / "lfw_landmark.txt")
    crops = [align_face(cv2.imread(str(LFW / "images" / p)), marks[p], template="112x96") for p in paths]
    check_dir = d / "check"
    check_dir.mkdir()
    for i, c in enumerate(crops[:17]):
        cv2.imwrite(str(check_dir / f"{i:02d}.png"), c)
    onnx_path, ts_path = d / "m.onnx", d / "m.ts"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path),
                 "--check-images", str(check_dir), "--check-count", "17"]) == 0
    from eval.export import export_model

    result = export_model(ckpt, ts_path, "torchscript")  # the synthetic fallback crops
    assert "synthetic" in result["check_images"]
    return {"dir": d, "ckpt": ckpt, "backbone": backbone, "info": info, "paths": paths, "crops": crops,
            "onnx": onnx_path, "torchscript": ts_path, "check_dir": check_dir}


def _run_file(fmt, path, x):
    """(embedding, feature) of the exported file, run by onnxruntime / torch.jit directly."""
    if fmt == "onnx":
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        emb, feat = s.run(["embedding", "feature"], {"input": x.numpy()})
        return emb, feat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return m(x).numpy(), m.features(x).numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("batch", [1, 17])
def test_export_matches_pytorch_on_lfw_crops(setup, fmt, batch):
    x = _prep(setup["crops"][20:20 + batch])  # other crops than the export check's
    with torch.no_grad():
        ref = setup["backbone"](x).double().numpy()
    emb, feat = _run_file(fmt, setup[fmt], x)
    assert emb.shape == feat.shape == (batch, 128)
    ref_emb = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(emb - ref_emb).max() <= TOL
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (np.abs(feat - ref) / np.linalg.norm(ref, axis=1, keepdims=True)).max() <= TOL


def test_onnx_model_gives_same_lfw_fold_accuracies(setup):
    d = setup["dir"]
    reports, feats = {}, {}
    for name in ("ckpt", "onnx"):
        out, npz = d / f"{name}.json", d / f"{name}.npz"
        assert main(["verify", "pairs", "--checkpoint", str(setup[name]), "--root", str(LFW / "images"),
                     "--landmarks", str(LFW / "lfw_landmark.txt"), "--pairs", str(d / "pairs.txt"),
                     "--json", str(out), "--save-features", str(npz), "--workers", "0", "--batch-size", "17",
                     "--precision", "fp32"]) == 0  # ONNX runs in float32: compare like with like
        reports[name] = json.loads(out.read_text())
        with np.load(npz) as z:
            feats[name] = z["features"]
    assert reports["onnx"]["num_pairs"] == 40 and reports["onnx"]["num_folds"] == 10
    assert reports["onnx"]["fold_accuracies"] == reports["ckpt"]["fold_accuracies"]
    scale = np.linalg.norm(feats["ckpt"], axis=1, keepdims=True)
    assert (np.abs(feats["onnx"] - feats["ckpt"]) / scale).max() <= TOL


def test_torchscript_model_gives_same_lfw_fold_accuracies(setup):
    from eval.features import ArrayImages, extract_from_dataset
    from eval.lfw import evaluate_features
    from eval.pairs import parse_pairs_file

    class Features(torch.nn.Module):  # the exported file's features() through the toolkit's batching + flip
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.features(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(setup["torchscript"]), map_location="cpu")
    pairs = parse_pairs_file(setup["dir"] / "pairs.txt")
    data = ArrayImages(setup["crops"], (112, 96))
    ref = evaluate_features(setup["paths"], extract_from_dataset(setup["backbone"], data, 17), pairs)
    got = evaluate_features(setup["paths"], extract_from_dataset(Features(ts), data, 17), pairs)
    assert got["fold_accuracies"] == ref["fold_accuracies"]


def test_embedder_and_compare_accept_onnx(setup, capsys):
    from eval.embedder import FaceEmbedder

    crops = setup["crops"][:5]
    a = FaceEmbedder(setup["ckpt"], precision="fp32").embed(crops, aligned=True)  # ONNX runs in float32
    emb = FaceEmbedder(setup["onnx"])
    b = emb.embed(crops, aligned=True)
    assert np.abs(a - b).max() <= TOL
    assert emb.threshold == setup["info"]["threshold"] and emb.template == "112x96"
    p1, p2 = (str(setup["check_dir"] / f"{i:02d}.png") for i in (0, 1))
    sims = []
    for model in ("ckpt", "onnx"):
        assert main(["compare", p1, p2, "--checkpoint", str(setup[model]), "--aligned", "--precision", "fp32"]) == 0
        out = capsys.readouterr().out
        sims.append(float(re.search(r"cosine similarity: (-?[\d.]+)", out).group(1)))
        assert "from the checkpoint" in out
    assert sims[0] == pytest.approx(sims[1], abs=2e-4)


def test_metadata_round_trips(setup):
    from eval.onnx_model import info_from_metadata, read_export_metadata

    sha = hashlib.sha256(setup["ckpt"].read_bytes()).hexdigest()
    onnx_meta = {p.key: p.value for p in onnx.load(str(setup["onnx"])).metadata_props}
    ort_meta = ort.InferenceSession(str(setup["onnx"]), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert ort_meta.custom_metadata_map == onnx_meta
    with zipfile.ZipFile(setup["torchscript"]) as z:
        (name,) = [n for n in z.namelist() if n.endswith("extra/sphereface_plus.json")]
        ts_meta = json.loads(z.read(name))
    for meta, fmt in ((onnx_meta, "onnx"), (ts_meta, "torchscript")):
        assert meta["format"] == fmt
        assert meta["template"] == "112x96" and meta["input_size"] == "112x96"
        assert float(meta["threshold"]) == setup["info"]["threshold"]
        assert meta["preprocessing"].startswith("BGR uint8 crop, (x - 127.5) / 128")
        assert meta["flip_policy"].startswith("concat")
        assert meta["source_sha256"] == sha and meta["backbone"] == "sphere4" and meta["embedding_dim"] == "128"
        assert float(meta["check_max_abs_diff_embedding"]) <= TOL
        assert read_export_metadata(setup[fmt]) == meta
        info = info_from_metadata(meta, fmt)
        for key in ("backbone", "input_size", "template", "threshold", "iteration"):
            assert info[key] == setup["info"][key]
    assert onnx_meta["check_images"] == f"17 crops from {setup['check_dir']}"
    assert ts_meta["check_images"].startswith("32 synthetic crops")


def test_check_refuses_an_export_that_differs(setup, tmp_path):
    from eval.export import ExportCheckError, check_batch, check_export, export_model

    wrong = copy.deepcopy(setup["backbone"])
    with torch.no_grad():
        wrong.fc5.weight.mul_(1.01)  # 1 % off: far beyond 1e-4 but close to the right model
    out = tmp_path / "m.ts"
    out.write_bytes(b"previous")
    with pytest.raises(ExportCheckError, match="nothing was written"):
        export_model(setup["ckpt"], out, "torchscript", check_images=setup["check_dir"], reference=wrong)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.ts"]  # no temporary left
    batch, where = check_batch(setup["info"], setup["check_dir"], 17)
    data = setup["onnx"].read_bytes()
    assert check_export("onnx", data, batch, setup["backbone"])["embedding"] <= TOL
    with pytest.raises(ExportCheckError, match="differs from PyTorch"):
        check_export("onnx", data, batch, wrong, where=where)


def test_export_cli_errors_are_one_line(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sphereface_plus", "export", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    r = subprocess.run(cmd + ["--checkpoint", str(tmp_path / "none.pt")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "none.pt does not exist" in errors[0]
    assert main(["export", "--checkpoint", str(setup["ckpt"]), "--out", str(tmp_path / "m.onnx"),
                 "--check-images", str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "m.onnx").exists()
