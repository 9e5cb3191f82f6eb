"""``sphereface-plus demo`` end to end on a tiny synthetic set, and the LFW fold split on real pairs.

The pipeline test runs the real thing (generation, the align command, the trainer, feature extraction,
the 10-fold protocol, the report) at a size that takes seconds; its numbers are checked against an
independent reference: the features are recomputed from ``model.pt`` with a plain loop (cv2 read,
(x - 127.5) / 128, crop + mirror) and the 10-fold accuracy without mean subtraction is recomputed by
brute force over the threshold grid.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sphereface_plus.cli import main
from shared_data import LFW


TINY = ["--iterations", "4", "--batch-size", "8", "--identities", "20", "--images", "6", "--pairs-per-fold", "6",
        "--workers", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = main(["demo", "--out", str(out), *TINY])
    assert rc == 0
    return out


def _features(model, root: Path, paths):
    """Crop + mirror embeddings of aligned crops, computed here without eval.features."""
    import cv2

    imgs = np.stack([cv2.imread(str(root / p), cv2.IMREAD_COLOR) for p in paths]).astype(np.float32)
    x = torch.from_numpy((imgs - 127.5) / 128.0).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        return torch.cat([model(x), model(torch.flip(x, dims=[3]))], dim=1).double().numpy()


def test_demo_writes_the_report_files(demo_run):
    for name in ("report.md", "report.json", "verification.json", "verification_roc.png", "config.yaml", "model.pt"):
        assert (demo_run / name).is_file(), name
    assert (demo_run / "verification_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((demo_run / "report.json").read_text())
    assert rep["data"]["synthetic"] is True
    md = (demo_run / "report.md").read_text()
    assert "SYNTHETIC" in md and "| 10 |" in md
    v = rep["verification"]
    accs = np.asarray(v["fold_accuracies"])
    assert accs.shape == (10,)
    assert ((accs >= 0) & (accs <= 1)).all()
    # 6 pairs per fold: every fold accuracy is a whole number of pairs
    assert np.allclose(accs * 6, np.round(accs * 6))
    assert v["mean_accuracy"] == pytest.approx(accs.mean())
    assert v["std_accuracy"] == pytest.approx(accs.std())
    assert 0 <= v["eer"] <= 1 and 0 <= v["auc"] <= 1
    assert v["num_pairs"] == 60 and v["num_positive"] == 30
    assert rep["training"]["iterations"] == 4
    assert rep["training"]["config"]["head"]["name"] == "a_softmax"
    assert rep["training"]["config"]["mhe"]["lambda_m"] > 0


def test_demo_model_checkpoint_and_accuracy_against_brute_force(demo_run):
    from eval.lfw import parse_pairs
    from eval.verification_metrics import THRESHOLDS
    from sphereface_plus.models import create_backbone

    rep = json.loads((demo_run / "report.json").read_text())
    ckpt = torch.load(demo_run / "model.pt", map_location="cpu", weights_only=True)
    for key in ("model", "head", "iteration", "config", "threshold"):
        assert key in ckpt
    assert ckpt["iteration"] == 4
    assert ckpt["threshold"] == pytest.approx(rep["compare_threshold"])
    assert ckpt["config"]["model"]["backbone"] == "sphere4"
    assert ckpt["config"]["data"]["template"] == "112x96"

    model = create_backbone(ckpt["config"]["model"]["backbone"], input_size=tuple(ckpt["config"]["model"]["input_size"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    # the test identities are other people than the training ones (another seed, separate folders)
    data = demo_run / "data"
    pairs = parse_pairs(data / "synthetic_test" / "pairs.txt")
    paths = sorted({p for q in pairs for p in (q.path1, q.path2)})
    feats = _features(model, data / "synthetic_test_112x96", paths)
    idx = {p: i for i, p in enumerate(paths)}
    f1 = feats[[idx[q.path1] for q in pairs]]
    f2 = feats[[idx[q.path2] for q in pairs]]
    s = (f1 * f2).sum(1) / np.linalg.norm(f1, axis=1) / np.linalg.norm(f2, axis=1)
    same = np.array([q.same for q in pairs])
    folds = np.array([q.fold for q in pairs])
    accs = []
    for k in range(10):
        tr, te = folds != k, folds == k
        train_acc = ((s[tr][None, :] > THRESHOLDS[:, None]) == same[tr][None, :]).mean(1)  # every threshold
        t = THRESHOLDS[train_acc == train_acc.max()].mean()
        accs.append(((s[te] > t) == same[te]).mean())
    # float32 vs float64 scores may move one pair across a threshold: allow one pair in 60
    assert np.mean(accs) == pytest.approx(rep["verification"]["accuracy_without_mean_sub"], abs=1 / 60 + 1e-9)
    # Beats chance: the features carry identity (a pairing bug or scrambled labels would give ~50 %).
    # This is a check of the pipeline, not of learning: 4 iterations change a random network little.
    assert rep["verification"]["auc"] > 0.65
    assert rep["verification"]["mean_accuracy"] > 0.6


def test_demo_rerun_resumes_and_refuses_other_settings(demo_run, capsys):
    before = json.loads((demo_run / "report.json").read_text())
    assert main(["demo", "--out", str(demo_run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "reusing the plan" in out and "120 crops (120 kept from an earlier run)" in out
    after = json.loads((demo_run / "report.json").read_text())
    assert after["training"]["iterations"] == 4
    assert after["verification"]["fold_accuracies"] == pytest.approx(before["verification"]["fold_accuracies"])
    assert after["compare_threshold"] == pytest.approx(before["compare_threshold"])
    assert after["training"]["loss"] == pytest.approx(before["training"]["loss"])  # stats of the real training

    changed = [a if a != "3" else "4" for a in TINY]  # another seed
    assert main(["demo", "--out", str(demo_run), *changed]) == 2
    assert "plan.json" in capsys.readouterr().err


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x"), "--iterations", "0"]) == 2
    assert "--iterations" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "x"), "--iterations", "5", "--minutes", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "x"), "--minutes", "-1"]) == 2
    assert "--minutes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    assert main(["demo", "--out", str(tmp_path / "y"), "--data", str(tmp_path / "nolfw"), "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert "pairs.txt" in err or "images" in err


def test_schedule_gamma_reaches_the_floor_at_the_chosen_iteration():
    from sphereface_plus.commands.demo import schedule_gamma

    g = schedule_gamma(300, base=1000.0, lambda_min=5.0, power=1.0, reach=0.5)
    assert 1000.0 * (1 + g * 150) ** -1.0 == pytest.approx(5.0)
    g2 = schedule_gamma(1000, base=1000.0, lambda_min=5.0, power=2.0, reach=0.25)
    assert 1000.0 * (1 + g2 * 250) ** -2.0 == pytest.approx(5.0)


@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason=f"real LFW not found at {LFW} (../shared/data/lfw)")
def test_lfw_fold_split_is_person_disjoint_and_complete():
    from eval.lfw import parse_pairs
    from eval.lfw import lfw_people_split

    pairs = parse_pairs(LFW / "pairs.txt")
    counts = {d: len(os.listdir(LFW / "images" / d)) for d in os.listdir(LFW / "images")}
    train, test = lfw_people_split(pairs, counts, test_fold=0, min_images=5)
    # brute force: people per fold from the raw lines of pairs.txt (fold k = lines 1 + 600k .. 600(k+1))
    lines = [ln.split() for ln in (LFW / "pairs.txt").read_text().splitlines()[1:] if ln.strip()]
    fold_people = [set() for _ in range(10)]
    for i, f in enumerate(lines):
        fold_people[i // 600].update([f[0]] if len(f) == 3 else [f[0], f[2]])
    others = set().union(*fold_people[1:])
    expect = sorted(n for n in others if counts[n] >= 5 and n not in fold_people[0])
    assert train == expect
    assert test == sorted(fold_people[0])
    assert not set(train) & set(test)
    assert len(train) > 300  # LFW: 423 people have >= 5 images


def test_untrained_reference_is_the_trainers_initial_network(demo_run):
    """The 'no training' line of the report uses exactly the weights the trainer starts from."""
    from sphereface_plus.face.config import FaceConfig as Config
    from sphereface_plus.commands.demo import untrained_backbone
    from sphereface_plus.commands.train import make_trainer

    cfg = Config.from_dict(json.loads((demo_run / "report.json").read_text())["training"]["config"])
    cfg.out_dir = str(demo_run / "unused")
    start = make_trainer(cfg).model.backbone.state_dict()
    mine = untrained_backbone(cfg.model.backbone, cfg.train.seed).state_dict()
    assert start.keys() == mine.keys()
    assert all(torch.equal(start[k], mine[k]) for k in start)
    rep = json.loads((demo_run / "report.json").read_text())
    assert 0 <= rep["untrained"]["mean_accuracy"] <= 1
