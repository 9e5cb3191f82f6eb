"""Validation on standard packs during training (eval.packs / eval.pack_dir), through a tiny CLI run:
metrics.jsonl rows, checkpoints/best.pt kept by the mean, the reports equal to ``verify packs`` on best.pt."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

from sphereface_plus.cli import main  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "face" / "cpu_smoke.yaml"


def _packs(folder: Path, names=("lfw", "cfp_fp"), pairs=12):
    """Tiny packs of blurred noise crops (112x112, cut to the 112x96 model input)."""
    from eval.pairs import save_bin_pack

    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        centres = [cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (0, 0), 4)
                   for _ in range(pairs)]
        images, same = [], []
        for i in range(pairs):
            s = i % 2 == 0
            a = centres[i]
            b = a if s else centres[(i + 1) % pairs]
            for c in (a, b):
                noisy = np.clip(c.astype(np.int16) + rng.integers(-20, 21, c.shape), 0, 255).astype(np.uint8)
                images.append(cv2.imencode(".png", noisy)[1].tobytes())
            same.append(s)
        save_bin_pack(folder / f"{name}.bin", images, same)


def _argv(out, packs, cache, *extra):
    return ["train", "--config", str(SMOKE), f"out_dir={out}", "train.iterations=4", "train.batch_size=4",
            "train.precision=fp32", "train.log_every=2", "train.tensorboard=false", "checkpoint.every=2",
            "model.embedding_dim=32", f"data.synthetic.cache_dir={cache}", "data.synthetic.num_identities=20",
            "data.synthetic.images_per_identity=2", "data.synthetic.pairs_per_fold=2", "eval.pairs=",
            f"eval.pack_dir={packs}", "eval.every=2", *extra]


def test_training_validates_on_packs_and_keeps_best(tmp_path, capsys):
    packs, out = tmp_path / "packs", tmp_path / "run"
    _packs(packs)
    assert main(_argv(out, packs, tmp_path / "cache", "eval.packs=[lfw,cfp_fp]")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["iteration"] for r in evals] == [2, 4]
    for r in evals:
        e = r["eval"]
        assert set(e) == {"mean_accuracy", "lfw", "cfp_fp"}
        assert e["mean_accuracy"] == pytest.approx((e["lfw"] + e["cfp_fp"]) / 2)
        report = json.loads((out / "eval" / f"verify_{r['iteration']:07d}.json").read_text())
        assert report["protocol"] == "insightface" and report["accuracies"] == {"lfw": e["lfw"], "cfp_fp": e["cfp_fp"]}
    best_row = max(evals, key=lambda r: (r["eval"]["mean_accuracy"], -r["iteration"]))  # ties keep the earlier
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert best["iteration"] == best_row["iteration"]
    assert best["best_accuracy"] == best_row["eval"]["mean_accuracy"]
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["best_accuracy"] == best["best_accuracy"] and "threshold" in last
    # the same numbers from `verify packs` on best.pt (same precision, same features)
    capsys.readouterr()
    assert main(["verify", "packs", "--dir", str(packs), "--checkpoint", str(out / "checkpoints" / "best.pt"),
                 "--json", str(tmp_path / "v.json"), "--workers", "0", "--precision", "fp32"]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["accuracies"] == {"lfw": best_row["eval"]["lfw"], "cfp_fp": best_row["eval"]["cfp_fp"]}


def test_pack_settings_are_checked_before_anything_is_written(tmp_path, capsys):
    packs, out = tmp_path / "packs", tmp_path / "run"
    _packs(packs, names=("lfw",), pairs=4)
    assert main(_argv(out, packs, tmp_path / "cache", "eval.packs=[lfw,agedb30]")) == 2
    assert "did you mean 'agedb_30'" in capsys.readouterr().err
    assert main(_argv(out, packs, tmp_path / "cache", "eval.packs=[lfw,agedb_30]")) == 2
    assert "has no agedb_30.bin" in capsys.readouterr().err
    assert main(_argv(out, packs, tmp_path / "cache", "eval.packs=[lfw]", "eval.pairs=auto")) == 2
    assert "eval.pairs and eval.packs are both set" in capsys.readouterr().err
    assert not out.exists()


def test_two_processes_validate_on_rank0_and_keep_best(tmp_path):
    """torchrun, 2 gloo processes, a sharded head (its state is gathered collectively for best.pt): rank 0
    validates, the other waits; the rows and best.pt as with one process."""
    import os
    import subprocess
    import sys

    packs, out = tmp_path / "packs", tmp_path / "run"
    _packs(packs, pairs=8)
    argv = _argv(out, packs, tmp_path / "cache", "eval.packs=[lfw,cfp_fp]", "head.parallel=sharded")[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sphereface_plus", "train", *argv]
    res = subprocess.run(cmd, cwd=SMOKE.parents[1], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [r["iteration"] for r in evals] == [2, 4]  # once each, from rank 0
    best_row = max(evals, key=lambda r: (r["eval"]["mean_accuracy"], -r["iteration"]))
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert best["iteration"] == best_row["iteration"] and best["best_accuracy"] == best_row["eval"]["mean_accuracy"]
    assert best["head"]["weight"].shape[0] == 20  # the whole classifier, gathered from both ranks
    assert main(["verify", "packs", "--dir", str(packs), "--checkpoint", str(out / "checkpoints" / "best.pt"),
                 "--json", str(tmp_path / "v.json"), "--workers", "0", "--precision", "fp32"]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["accuracies"] == {"lfw": best_row["eval"]["lfw"], "cfp_fp": best_row["eval"]["cfp_fp"]}
