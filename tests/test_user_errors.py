"""Each everyday mistake ends in one clear 'error:' line (exit 2, no traceback), and broken
training data is skipped and named, never trained on. Every case runs through the real command line
(``python -m sphereface_plus`` in a subprocess, this tree on ``PYTHONPATH``)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shared_data import LFW

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SMALL = ["model.backbone=sphere4", "model.embedding_dim=16", "train.iterations=1", "train.batch_size=4",
               "train.tensorboard=false", "data.num_workers=0", "train.device=cpu", "eval.pairs="]


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPHEREFACE_PLUS_")}
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SPHEREFACE_PLUS_COMPILE_AUTO="eager", **(env or {}))
    return subprocess.run([sys.executable, "-m", "sphereface_plus", *map(str, args)], capture_output=True,
                          text=True, env=e, cwd=cwd or ROOT, timeout=300)


def main_inproc(capsys, *args):
    """The same command line in this process (for the happy paths: no interpreter start-up per run)."""
    from sphereface_plus.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one 'error:' line holding every fragment; returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _jpg(img: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return enc.tobytes()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Aligned 112x96 crops (8 identities x 3), raw 250x250 photos, a pairs file and a tiny checkpoint."""
    from sphereface_plus import create_backbone

    d = tmp_path_factory.mktemp("usererr")
    rng = np.random.default_rng(0)
    crops, raw = d / "crops", d / "raw"
    for k in range(8):
        base = rng.integers(0, 256, (112, 96, 3)).astype(np.int16)
        for j in range(3):
            img = np.clip(base + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
            (crops / f"id{k}").mkdir(parents=True, exist_ok=True)
            (crops / f"id{k}" / f"{j}.jpg").write_bytes(_jpg(img))
            (raw / f"id{k}").mkdir(parents=True, exist_ok=True)
            (raw / f"id{k}" / f"{j}.jpg").write_bytes(_jpg(cv2.resize(img, (250, 250))))
    lines = []
    for fold in range(2):  # two equal folds of 4 + 4 pairs
        ids = range(4 * fold, 4 * fold + 4)
        lines += [f"id{k}/0.jpg id{k}/1.jpg 1 {fold}" for k in ids]
        lines += [f"id{k}/2.jpg id{(k + 1) % 4 + 4 * fold}/2.jpg 0 {fold}" for k in ids]
    pairs = d / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    model = create_backbone("sphere4", input_size=(112, 96), embedding_dim=16)
    ckpt = d / "model.pt"
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 1,
                "config": {"model": {"backbone": "sphere4", "input_size": [112, 96], "embedding_dim": 16},
                           "data": {"template": "112x96"}}}, ckpt)
    image_list = d / "images.txt"
    image_list.write_text("".join(f"id{k}/{j}.jpg\n" for k in range(2) for j in range(3)))
    garbage = d / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all\n" * 10)
    truncated = d / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return {"dir": d, "crops": crops, "raw": raw, "pairs": pairs, "list": image_list, "ckpt": ckpt, "garbage": garbage,
            "truncated": truncated}


@pytest.fixture()
def broken_tree(tmp_path):
    """A training folder with a truncated JPEG, a 0-byte file, a text file named .jpg and an empty folder."""
    rng = np.random.default_rng(1)
    root = tmp_path / "train"
    good = {}
    for k in range(3):
        (root / f"p{k}").mkdir(parents=True)
        for j in range(3):
            img = rng.integers(0, 256, (112, 96, 3), dtype=np.uint8)
            ok, enc = cv2.imencode(".png", img)  # lossless: batches can be matched to these pixels
            (root / f"p{k}" / f"{j}.png").write_bytes(enc.tobytes())
            good[f"p{k}/{j}.png"] = img
    full = _jpg(rng.integers(0, 256, (112, 96, 3), dtype=np.uint8))
    (root / "p0" / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (root / "p1" / "empty.jpg").write_bytes(b"")
    (root / "p2" / "notes.jpg").write_text("this is a text file named .jpg\n")
    (root / "p3_empty").mkdir()
    bad = {str(root / "p0" / "trunc.jpg"): "truncated JPEG", str(root / "p1" / "empty.jpg"): "empty file",
           str(root / "p2" / "notes.jpg"): "not an image file"}
    return root, good, bad


# ------------------------------------------------------------------------- the general rule, case 10
def test_version_debug_and_env():
    from sphereface_plus import __version__

    p = cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"sphereface-plus {__version__}"
    missing = ["verify", "lfw", "--features", ROOT / "no-such.npz", "--pairs", ROOT / "pairs.txt"]
    one_error(cli(*missing), "no-such.npz", "--features")
    for p in (cli("--debug", *missing), cli(*missing, env={"SPHEREFACE_PLUS_DEBUG": "1"})):
        assert p.returncode == 2 and "Traceback" in p.stderr and "error:" in p.stderr.splitlines()[-1]


# ----------------------------------------------------------------------------------- case 1 (trainer)
def test_case1_eval_pairs_auto_without_synthetic_pairs(data, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        rc, _, err = main_inproc(capsys, "train", "--config", ROOT / "configs/face/cpu_smoke.yaml", "data.source=folder",
                                 f"data.root={data['crops']}", f"out_dir={out}",
                                 *[a for a in TRAIN_SMALL if not a.startswith("eval.pairs")])
    assert rc == 0, err
    assert "no verification during training" in caplog.text


# --------------------------------------------------------------------------------------------- case 2
@pytest.mark.parametrize("what", ["missing", "empty", "only-missing-list"])
def test_case2_bad_training_root(data, tmp_path, what):
    out = tmp_path / "run"
    extra = []
    if what == "missing":
        root = tmp_path / "nowhere"
        expect = "nowhere"
    elif what == "empty":
        root = tmp_path / "emptytree"
        (root / "someone").mkdir(parents=True)
        expect = "holds no images"
    else:
        root = data["crops"]
        lst = tmp_path / "list.txt"
        lst.write_text("ghost/1.jpg 0\nghost/2.jpg 1\n")
        extra = ["data.source=list", f"data.list_file={lst}"]
        expect = "list.txt"
    p = cli("train", f"out_dir={out}", "data.source=folder", f"data.root={root}", *extra, *TRAIN_SMALL)
    line = one_error(p, expect)
    assert "data.root" in line or "list file" in line
    assert not out.exists()


def test_case2_list_with_some_missing_images_skips_and_names_them(data, tmp_path):
    from data_prep.datasets import ListDataset

    lst = tmp_path / "list.txt"
    lst.write_text("id0/0.jpg 0\nghost/1.jpg 0\nid1/0.jpg 1\n")
    ds = ListDataset(data["crops"], lst)
    assert len(ds) == 2 and ds.paths == ["id0/0.jpg", "id1/0.jpg"]
    assert ds.bad_images == [{"path": str(data["crops"] / "ghost/1.jpg"), "reason": "missing file"}]


@pytest.mark.parametrize("flag", ["--resume", "train.init_from="])
def test_case2_missing_resume_or_init_file_writes_nothing(tmp_path, flag):
    out = tmp_path / "run"
    missing = tmp_path / "nope.pt"
    args = ["--resume", missing] if flag == "--resume" else [f"train.init_from={missing}"]
    p = cli("train", "--config", "configs/face/cpu_smoke.yaml", f"out_dir={out}", "train.iterations=1", *args)
    one_error(p, "nope.pt")
    assert not out.exists()


# --------------------------------------------------------------------------------------------- case 3
def _no_weights_only_advice(p):
    text = (p.stdout + p.stderr).lower().replace("_", " ")
    assert "weights only" not in text and "file an issue" not in text, p.stderr


def test_case3_bad_checkpoint(data, tmp_path):
    bad = data["garbage"]
    runs = {
        "truncated": cli("verify", "pairs", "--checkpoint", data["truncated"], "--root", data["crops"], "--pairs",
                         data["pairs"]),
        "verify": cli("verify", "pairs", "--checkpoint", bad, "--root", data["crops"], "--pairs", data["pairs"]),
        "compare": cli("compare", data["crops"] / "id0/0.jpg", data["crops"] / "id0/1.jpg", "--checkpoint", bad,
                       "--aligned"),
        "megaface": cli("megaface", "export", "--checkpoint", bad, "--list", data["list"], "--root",
                        data["crops"], "--out", tmp_path / "feats"),
        "resume": cli("train", "--resume", bad, f"out_dir={tmp_path / 'run'}", "data.source=folder",
                      f"data.root={data['crops']}", *TRAIN_SMALL),
    }
    for name, p in runs.items():
        one_error(p, data[name].name if name == "truncated" else bad.name,
                  "not a valid checkpoint (truncated or not written by this toolkit)")
        _no_weights_only_advice(p)
    assert not (tmp_path / "feats").exists()


# --------------------------------------------------------------------------------------------- case 4
def test_case4_raw_photos(data, tmp_path):
    out = tmp_path / "run"
    line = one_error(cli("train", f"out_dir={out}", "data.source=folder", f"data.root={data['raw']}", *TRAIN_SMALL),
                     "250x250", "96x112", "sphereface-plus align")
    assert not out.exists() and "raw" in line
    one_error(cli("verify", "pairs", "--checkpoint", data["ckpt"], "--root", data["raw"], "--pairs", data["pairs"],
                  "--workers", "2"), "250x250", "112x96", "sphereface-plus align")
    line = one_error(cli("compare", data["raw"] / "id0/0.jpg", data["raw"] / "id0/1.jpg", "--checkpoint",
                         data["ckpt"], "--aligned"), "250x250", "--aligned")
    assert "--landmarks" not in line


# ------------------------------------------------------------------------------------- case 5 (data)
@pytest.mark.parametrize("scan_limit", [None, 1], ids=["checked-up-front", "checked-in-loader"])
def test_case5_broken_training_folder(broken_tree, scan_limit, caplog):
    from torch.utils.data import DataLoader

    from data_prep.datasets import ImageFolderDataset

    root, good, bad = broken_tree
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root, scan_limit=scan_limit)
    assert ds.num_classes == 3 and ds.classes == ["p0", "p1", "p2"]  # the empty folder is not a class
    assert "p3_empty" in caplog.text and ds.empty_folders == ["p3_empty"]
    expected_inputs = {tuple(((np.transpose(img, (2, 0, 1)).astype(np.float32) - 127.5) / 128).ravel()[:64])
                       for img in good.values()}
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    seen, replaced = 0, 0
    for images, labels, n_bad in loader:
        for x, y in zip(images, labels):
            assert tuple(x.numpy().ravel()[:64]) in expected_inputs  # only good crops reach a batch
        seen += len(labels)
        replaced += int(n_bad.sum())
    assert seen == len(ds)
    if scan_limit is None:  # all found up front and left out
        assert len(ds) == len(good) and replaced == 0
    else:  # found by the loader workers, each replaced by the next good sample
        assert len(ds) == len(good) + len(bad) and replaced == len(bad)
    found = {b["path"]: b["reason"] for b in ds.bad_images}
    assert set(found) == set(bad) and all(isinstance(b, dict) and set(b) == {"path", "reason"}
                                          for b in ds.bad_images)
    for path, frag in bad.items():
        assert frag in found[path], (path, found[path])


def test_case5_summary_reports_classes_and_bad_images(broken_tree, tmp_path, capsys, caplog):
    root, good, bad = broken_tree
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        rc, _, err = main_inproc(capsys, "train", f"out_dir={out}", "data.source=folder", f"data.root={root}",
                                 *TRAIN_SMALL)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_classes"] == 3
    assert sorted(b["path"] for b in summary["bad_images"]) == sorted(bad)
    assert all(frag in b["reason"] for b in summary["bad_images"] for p, frag in bad.items() if b["path"] == p)
    assert "trunc.jpg" in caplog.text  # reported at start-up


# --------------------------------------------------------------------------------------------- case 6
@pytest.mark.skipif(not (LFW / "lfw_landmark.txt").is_file(), reason=f"real LFW not found at {LFW}")
def test_case6_align_subset_with_the_whole_landmark_file(tmp_path, capsys):
    inp = tmp_path / "subset"
    inp.mkdir()
    for name in ("Aaron_Peirsol", "Abdullah_Gul"):
        (inp / name).symlink_to(LFW / "images" / name, target_is_directory=True)
    (inp / "README").write_text("a dataset readme, not an image\n")
    n = sum(1 for name in ("Aaron_Peirsol", "Abdullah_Gul") for _ in (LFW / "images" / name).iterdir())
    out = tmp_path / "out"
    rc, stdout, err = main_inproc(capsys, "align", "--input", inp, "--output", out, "--landmarks",
                                  LFW / "lfw_landmark.txt", "--workers", "1")
    assert rc == 0, stdout + err
    total = sum(1 for line in open(LFW / "lfw_landmark.txt") if line.strip())
    assert f"aligned {n} (" in stdout and "failed 0 of " + str(n) in stdout
    assert f"{total - n} entries of lfw_landmark.txt name no image" in stdout
    assert "ignored:  1 non-image files" in stdout and "README" in stdout
    man = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(man) == n and all(r["status"] == "aligned" for r in man)


# --------------------------------------------------------------------------------------------- case 7
def test_case7_save_model_threshold_and_compare(data, tmp_path, capsys):
    a, b = data["crops"] / "id0/0.jpg", data["crops"] / "id0/1.jpg"
    rc, stdout, _ = main_inproc(capsys, "compare", a, b, "--checkpoint", data["ckpt"], "--aligned")
    assert rc == 0 and "no threshold" in stdout and "--save-model" in stdout
    out = tmp_path / "with_threshold.pt"
    report = tmp_path / "plain.json"
    common = ["verify", "pairs", "--checkpoint", data["ckpt"], "--root", data["crops"], "--pairs", data["pairs"],
              "--folds", "2", "--workers", "0"]
    assert main_inproc(capsys, *common, "--save-model", out)[0] == 0
    # compare scores plain cosine: the stored threshold is the one of the plain-cosine protocol
    assert main_inproc(capsys, *common, "--no-mean-sub", "--json", report)[0] == 0
    expected = json.loads(report.read_text())["threshold"]
    state = torch.load(out, map_location="cpu", weights_only=True)
    original = torch.load(data["ckpt"], map_location="cpu", weights_only=True)
    assert state["threshold"] == pytest.approx(expected, abs=1e-12) and isinstance(state["threshold_source"], str)
    assert state["config"] == original["config"] and state["iteration"] == original["iteration"]
    for k, v in original["model"].items():
        assert torch.equal(state["model"][k], v)
    rc, stdout, _ = main_inproc(capsys, "compare", a, b, "--checkpoint", out, "--aligned")
    assert rc == 0 and f"threshold {expected:.4f} from the checkpoint" in stdout
    one_error(cli(*common, "--save-model", data["ckpt"]), "--save-model")  # never replaces the input


# --------------------------------------------------------------------------------------------- case 8
def test_case8_megaface_resume_redoes_damaged_files(data, tmp_path, capsys):
    from eval.megaface import read_feature

    out = tmp_path / "feats"
    args = ["megaface", "export", "--checkpoint", data["ckpt"], "--list", data["list"], "--root", data["crops"], "--out", out,
            "--workers", "0"]
    assert main_inproc(capsys, *args)[0] == 0
    victim = out / "id1/2.jpg_sphereface.bin"
    good = victim.read_bytes()
    good_feature = read_feature(victim)
    victim.write_bytes(good[: len(good) - 7])
    rc, stdout, _ = main_inproc(capsys, *args)
    assert rc == 0 and "wrote 1 feature files" in stdout and "--overwrite" in stdout, stdout
    redone = read_feature(victim)
    # the redo embeds this one image in a batch of 1 where the first run had a batch of 6: the CPU
    # convolution kernels are chosen by batch shape, so the float32 sums agree to rounding (a few ulp of
    # each layer, ~1e-6 relative after 4 layers), not bit for bit; the header and size are exact
    assert len(victim.read_bytes()) == len(good) and victim.read_bytes()[:16] == good[:16]
    assert redone.shape == (32,)
    np.testing.assert_allclose(redone, good_feature, rtol=1e-4, atol=1e-5 * float(np.abs(good_feature).max()))
    rc, stdout, _ = main_inproc(capsys, *args)
    assert rc == 0 and "already in" in stdout and "--overwrite" in stdout


# --------------------------------------------------------------------------------------------- case 9
def test_case9_progress_logs_when_not_on_a_terminal(monkeypatch, caplog):
    from sphereface_plus import utils

    monkeypatch.delenv("SPHEREFACE_PLUS_PROGRESS", raising=False)
    monkeypatch.setenv("SPHEREFACE_PLUS_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="sphereface_plus.progress"):
        items = list(utils.progress(range(5), desc="work", unit="img"))
    assert items == list(range(5))
    lines = [r.getMessage() for r in caplog.records if r.name == "sphereface_plus.progress"]
    assert lines[0].startswith("work: 1/5 (20%)") and "img/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("work: 5/5 (100%)") and "done in" in lines[-1]
    bar = utils.progress(total=10, initial=4, desc="train", unit="it")
    bar.update(2)
    bar.set_postfix({"loss": "1.0"})
    assert bar.line().startswith("train: 6/10 (60%)") and bar.line().endswith("[loss=1.0]")
    monkeypatch.setenv("RANK", "1")  # other ranks stay silent
    assert getattr(utils.progress(range(3)), "disable", False) is True


# -------------------------------------------------------------------------------------------- case 10
def test_case10_pack_bin_round_trip(data, tmp_path, capsys):
    pack = tmp_path / "mine.bin"
    rc, _, err = main_inproc(capsys, "pack-bin", "--pairs", data["pairs"], "--format", "pairs", "--root",
                             data["crops"], "--out", pack)
    assert rc == 0, err
    from eval.pairs import load_bin_pack, parse_pairs_file

    images, issame = load_bin_pack(pack)
    pairs = parse_pairs_file(data["pairs"])
    assert list(issame) == [q.same for q in pairs]  # the file is already fold by fold
    assert images[0] == (data["crops"] / pairs[0].path1).read_bytes()  # stored as they are
    common = ["--checkpoint", data["ckpt"], "--folds", "2", "--workers", "0"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    # the same pairs under the same protocol give the same report (bin defaults to insightface, pairs to sphereface)
    assert main_inproc(capsys, "verify", "bin", "--pack", pack, "--json", a, "--protocol", "sphereface", *common)[0] == 0
    assert main_inproc(capsys, "verify", "pairs", "--pairs", data["pairs"], "--root", data["crops"], "--json", b,
                       *common)[0] == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["protocol"] == rb["protocol"] == "sphereface"
    assert ra["fold_accuracies"] == rb["fold_accuracies"] and ra["threshold"] == rb["threshold"]
    bad = tmp_path / "bad.txt"
    bad.write_text("id0/0.jpg ghost/9.jpg 1\n")
    one_error(cli("pack-bin", "--pairs", bad, "--format", "pairs", "--root", data["crops"], "--out",
                  tmp_path / "x.bin"), "ghost/9.jpg")
    assert not (tmp_path / "x.bin").exists()
