"""The inference runtime (eval.runtime): onnxruntime on the checkpoint's cached export, against PyTorch.

Parity: the features of the onnxruntime runtime (crop + mirror, the batch cut into per-thread slices,
and a batch of one) are within 1e-5 of PyTorch's float32 features, on real LFW crops when present
(else synthetic faces), for a network without and with batch norm and depthwise convolutions. The
cache: keyed by the checkpoint's sha256, reused as is, rebuilt (not trusted) when damaged, changed or
written by other versions; a failed export falls back to PyTorch under ``auto`` and is an error under
``onnxruntime``. The notice: one line naming the runtime.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from eval import runtime as R  # noqa: E402
from eval.features import embed_batch, inference_setup, preprocess  # noqa: E402
from sphereface_plus.errors import ToolkitError, UsageError  # noqa: E402
from shared_data import LFW  # noqa: E402

PARITY = 1e-5
NETS = {  # name -> (backbone, builder arguments): no BN (PReLU), and BN + depthwise convolutions + PReLU
    "sphere4": ("sphere4", {"input_size": [112, 96], "embedding_dim": 32}),
    "mobilefacenet": ("mobilefacenet", {"input_size": [112, 96], "embedding_dim": 32, "scale": 1,
                                        "blocks": [1, 1, 1, 1]}),
}


def _checkpoint(path: Path, backbone: str, kwargs, seed: int = 0) -> Path:
    from sphereface_plus.models import create_backbone

    torch.manual_seed(seed)
    model = create_backbone(backbone, **kwargs).eval()
    for m in model.modules():  # batch-norm statistics that are not the identity, so that folding them matters
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model_cfg = {"backbone": backbone, **{k: v for k, v in kwargs.items() if k in ("input_size", "embedding_dim")},
                 "kwargs": {k: v for k, v in kwargs.items() if k not in ("input_size", "embedding_dim")}}
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 0, "threshold": 0.3,
                "config": {"model": model_cfg, "data": {"template": "112x96"}}}, path)
    return path


def _crops(count: int):
    """Aligned 112x96 crops: real LFW faces when the shared data is here, else synthetic ones."""
    if (LFW / "lfw_landmark.txt").is_file():
        import cv2

        from data_prep import align_face
        from eval.features import read_landmarks

        marks = read_landmarks(LFW / "lfw_landmark.txt")
        names = sorted(marks)[:count]
        return [align_face(cv2.imread(str(LFW / "images" / n)), marks[n], template="112x96") for n in names]
    from eval.export import synthetic_crops

    return synthetic_crops("112x96", count)


@pytest.fixture(scope="module")
def crops():
    return _crops(5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each network's checkpoint, loaded once through the onnxruntime runtime (its export made and cached)."""
    d = tmp_path_factory.mktemp("runtime")
    out = {}
    for key, (backbone, kwargs) in NETS.items():
        ckpt = _checkpoint(d / f"{key}.pt", backbone, kwargs)
        model, info = R.load_inference_model(ckpt, precision="fp32", runtime="onnxruntime", cache=d / "cache")
        out[key] = (ckpt, model, info, d / "cache")
    return out


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two feature batches, relative to each reference row's norm."""
    a, b = a.double(), b.double()
    return float(((a - b).abs().amax(1) / b.norm(dim=1)).max())


@pytest.mark.parametrize("key", list(NETS))
def test_onnxruntime_features_match_pytorch(exported, crops, key):
    from eval.features import load_embedding_model
    from eval.onnx_model import OnnxModel

    ckpt, model, info, _ = exported[key]
    assert isinstance(model, OnnxModel) and info["runtime"] == "onnxruntime" and model.lanes == torch.get_num_threads()
    assert info["threshold"] == pytest.approx(0.3) and info["input_size"] == (112, 96)
    reference, _ = load_embedding_model(ckpt)
    x = torch.stack([preprocess(c) for c in crops])
    with torch.inference_mode():
        for batch in (x, x[:1]):  # cut into per-thread slices; one image and its mirror; one image alone
            ref = embed_batch(reference, batch, flip=True, precision="fp32")
            assert _rel_diff(embed_batch(model, batch, flip=True, precision="fp32"), ref) <= PARITY
        one = embed_batch(model, x[:1], flip=False, precision="fp32")  # a batch of one: the wide session
        assert _rel_diff(one, reference(x[:1])) <= PARITY
        # whole images per slice: the sliced run is the one-session run of the same images
        sliced = model(x)
        whole = torch.from_numpy(model._run(model.session, x.numpy()))
        assert _rel_diff(sliced, whole) <= 1e-6


def test_onnxruntime_model_runs_float32_whatever_the_precision(exported):
    _, model, _, _ = exported["sphere4"]
    assert inference_setup(model, "bf16") == ("fp32", False)


def test_cache_is_keyed_by_the_checkpoint_and_reused(exported, caplog, tmp_path):
    from sphereface_plus.utils import sha256_file

    ckpt, _, _, cache = exported["sphere4"]
    sha = sha256_file(ckpt)
    onnx_path, record_path = cache / f"{sha}.onnx", cache / f"{sha}.json"
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok" and record["onnx_sha256"] == sha256_file(onnx_path)
    assert max(record["check"]["max_abs_diff_embedding"], record["check"]["max_rel_diff_feature"]) <= PARITY
    mtime = onnx_path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="eval.runtime"):
        _, info = R.load_inference_model(ckpt, precision="fp32", runtime="auto", cache=cache)
    notices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("runtime:")]
    assert len(notices) == 1 and notices[0].startswith("runtime: onnxruntime") and "cached export" in notices[0]
    assert info["runtime"] == "onnxruntime" and onnx_path.stat().st_mtime_ns == mtime  # not exported again
    # another checkpoint (other weights): another key, nothing of the first one touched
    other = _checkpoint(tmp_path / "other.pt", *NETS["sphere4"], seed=1)
    assert sha256_file(other) != sha and not (cache / f"{sha256_file(other)}.json").exists()


@pytest.mark.parametrize("damage", ["onnx-bytes", "record-json", "no-record", "other-versions", "other-checkpoint"])
def test_a_damaged_cache_entry_is_not_trusted(exported, damage):
    from sphereface_plus.utils import sha256_file

    ckpt, _, _, cache = exported["sphere4"]
    sha = sha256_file(ckpt)
    onnx_path, record_path = cache / f"{sha}.onnx", cache / f"{sha}.json"
    assert R._record_problem(record_path, onnx_path, sha) is None
    saved = {p: p.read_bytes() for p in (onnx_path, record_path)}
    try:
        if damage == "onnx-bytes":  # one byte in the weights: the graph would still parse
            data = bytearray(saved[onnx_path])
            data[len(data) // 2] ^= 0xFF
            onnx_path.write_bytes(bytes(data))
        elif damage == "record-json":
            record_path.write_bytes(saved[record_path][:40])
        elif damage == "no-record":
            record_path.unlink()
        else:
            record = json.loads(saved[record_path])
            if damage == "other-versions":
                record["versions"]["torch"] = "0.0.1"
            else:
                record["checkpoint_sha256"] = "0" * 64
            record_path.write_text(json.dumps(record))
        assert R._record_problem(record_path, onnx_path, sha) is not None
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def test_a_damaged_graph_is_exported_again(exported, crops, caplog):
    from eval.features import load_embedding_model
    from sphereface_plus.utils import sha256_file

    ckpt, _, _, cache = exported["sphere4"]
    onnx_path = cache / f"{sha256_file(ckpt)}.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="eval.runtime"):
        model, _ = R.load_inference_model(ckpt, precision="fp32", runtime="onnxruntime", cache=cache)
    assert any("does not match its recorded sha256" in r.getMessage() for r in caplog.records)
    assert R._record_problem(cache / f"{sha256_file(ckpt)}.json", onnx_path, sha256_file(ckpt)) is None
    reference, _ = load_embedding_model(ckpt)
    x = torch.stack([preprocess(c) for c in crops])
    with torch.inference_mode():
        assert _rel_diff(model(x), reference(x)) <= PARITY


def test_a_failed_export_falls_back_to_pytorch_under_auto(tmp_path, monkeypatch, caplog):
    import eval.export as E

    ckpt = _checkpoint(tmp_path / "ck.pt", *NETS["sphere4"])
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("aten::made_up_op has no ONNX symbolic")

    monkeypatch.setattr(E, "export_checked", failing)
    with caplog.at_level(logging.INFO, logger="eval.runtime"):
        model, info = R.load_inference_model(ckpt, precision="fp32", runtime="auto", cache=tmp_path / "c")
    assert isinstance(model, torch.nn.Module) and info["runtime"] == "torch" and len(calls) == 1
    assert any("running PyTorch instead" in r.getMessage() and "made_up_op" in r.getMessage() for r in caplog.records)
    notices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("runtime:")]
    assert len(notices) == 1 and notices[0].startswith("runtime: torch")
    # remembered: auto does not try again with these versions; an explicit onnxruntime does, and fails loudly
    _, info = R.load_inference_model(ckpt, precision="fp32", runtime="auto", cache=tmp_path / "c")
    assert info["runtime"] == "torch" and len(calls) == 1
    with pytest.raises(R.ExportFailed, match="made_up_op"):
        R.load_inference_model(ckpt, precision="fp32", runtime="onnxruntime", cache=tmp_path / "c")
    assert len(calls) == 2 and issubclass(R.ExportFailed, ToolkitError)


@pytest.mark.parametrize("runtime,precision,device,missing,expected", [
    ("auto", "fp32", "cpu", (), ("onnxruntime", "fp32")),
    ("auto", "fp32", "cpu", ("onnxscript",), ("torch", "fp32")),
    ("auto", "fp32", "cuda", (), ("torch", "fp32")),
    ("torch", "fp32", "cpu", (), ("torch", "fp32")),
    ("onnxruntime", "auto", "cpu", (), ("onnxruntime", "fp32")),  # auto precision: the float32 graph
])
def test_choose_runtime(monkeypatch, runtime, precision, device, missing, expected):
    monkeypatch.setattr(R, "missing_packages", lambda: missing)
    assert R.choose_runtime(runtime, precision, device)[:2] == expected


def test_auto_keeps_bf16_in_pytorch(monkeypatch):
    from sphereface_plus.engine.precision import resolve_precision

    monkeypatch.setattr(R, "missing_packages", lambda: ())
    bf16 = resolve_precision("bf16", "cpu") == "bf16"
    assert R.choose_runtime("auto", "bf16", "cpu")[:2] == (("torch", "bf16") if bf16 else ("onnxruntime", "fp32"))


def test_runtime_usage_errors(monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="drop --precision bf16"):
        R.choose_runtime("onnxruntime", "bf16", "cpu")
    with pytest.raises(UsageError, match="choose one of auto, torch, onnxruntime"):
        R.choose_runtime("tensorrt", "fp32", "cpu")
    monkeypatch.setattr(R, "missing_packages", lambda: ("onnxruntime",))
    with pytest.raises(UsageError, match="pip install onnxruntime"):
        R.choose_runtime("onnxruntime", "fp32", "cpu")
    monkeypatch.setenv(R.RUNTIME_ENV, "fast")
    with pytest.raises(UsageError, match="SPHEREFACE_PLUS_RUNTIME"):
        R.default_runtime()
    monkeypatch.setenv(R.RUNTIME_ENV, "onnxruntime")
    assert R.default_runtime() == "onnxruntime"
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(UsageError, match="--runtime torch cannot run"):
        R.load_inference_model(onnx_file, runtime="torch")


def test_compare_command_with_onnxruntime(exported, crops, tmp_path, capsys, monkeypatch):
    import cv2

    from sphereface_plus.cli import main

    ckpt, _, _, cache = exported["sphere4"]
    monkeypatch.setenv(R.CACHE_ENV, str(cache))
    paths = []
    for i in (0, 1):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], crops[i])
    sims = {}
    for runtime in ("torch", "onnxruntime"):
        assert main(["compare", *paths, "--checkpoint", str(ckpt), "--aligned", "--precision", "fp32",
                     "--runtime", runtime]) == 0
        out = capsys.readouterr().out
        sims[runtime] = float(out.split("cosine similarity:")[1].split()[0])
    assert sims["onnxruntime"] == pytest.approx(sims["torch"], abs=2e-4)  # printed with 4 decimals
    assert main(["compare", *paths, "--checkpoint", str(ckpt), "--aligned", "--precision", "bf16",
                 "--runtime", "onnxruntime"]) == 2
    assert "drop --precision bf16" in capsys.readouterr().err


def test_an_unwritable_cache_falls_back_to_pytorch_under_auto(tmp_path, monkeypatch, caplog):
    import eval.export as E

    ckpt = _checkpoint(tmp_path / "ck.pt", *NETS["sphere4"])
    (tmp_path / "a-file").write_text("not a folder")
    summary = {"check_images": "-", "max_abs_diff_embedding": 0.0, "max_rel_diff_feature": 0.0}
    monkeypatch.setattr(E, "export_checked", lambda *a, **k: (b"graph", summary))  # the write is what fails
    with caplog.at_level(logging.WARNING, logger="eval.runtime"):
        _, info = R.load_inference_model(ckpt, precision="fp32", runtime="auto", cache=tmp_path / "a-file" / "c")
    assert info["runtime"] == "torch"
    assert any("cannot write the cache folder" in r.getMessage() for r in caplog.records)
    with pytest.raises(R.ExportFailed, match="SPHEREFACE_PLUS_ONNX_CACHE"):
        R.load_inference_model(ckpt, precision="fp32", runtime="onnxruntime", cache=tmp_path / "a-file" / "c")
