"""The MHE CIFAR experiments: pickle loaders, recipe pieces and the ``cifar`` command (docs/theory.md#cifar-setup).

References used here, all independent of the code under test: the raw bytes of the pickles walked with
``pickletools`` (pixel decode), ``np.pad(mode='symmetric')`` (augmentation), a float64 loop (loss, MHE),
the nearly-orthogonal MHE values of docs/theory.md#mhe-energy and the saturated loss 9.2094 of the published logs.
Training runs use small CIFAR-10 files cut from ``../shared/data/cifar10-subset`` and small batches.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.cifar import CifarDataError, load_cifar, load_cifar_class_names, load_cifar_split
from sphereface_plus import cifar
from sphereface_plus.commands.cifar import config_from_args, results_table, train_cifar
from data_prep.cifar import random_pad_crop_flip
from sphereface_plus.engine.optim import lr_factor
from sphereface_plus.losses import smoothed_cross_entropy
from sphereface_plus.mhe import DEFAULT_COEFFICIENTS
from sphereface_plus.cli import main as cli_main
from sphereface_plus.safe_pickle import UnsafePickleError
from shared_data import CIFAR_SUBSET, needs_cifar_subset as needs_subset

SUBSET = CIFAR_SUBSET
SUBSET_BATCHES = SUBSET / "cifar-10-batches-py"


def _rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> N x 3072 channel-planar rows, the CIFAR file layout (written independently)."""
    out = np.empty((len(images), 3072), dtype=np.uint8)
    for c in range(3):
        out[:, c * 1024 : (c + 1) * 1024] = images[:, :, :, c].reshape(len(images), 1024)
    return out


def _write_cifar10(folder: Path, train_x, train_y, test_x, test_y) -> Path:
    """CIFAR-10 python files (Python-2 style bytes keys, protocol 2), the training set split in 5 batches."""
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(train_x)), 5), start=1):
        blob = {b"batch_label": b"b", b"labels": [int(v) for v in train_y[part]], b"data": _rows(train_x[part])}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(blob, protocol=2))
    blob = {b"batch_label": b"t", b"labels": [int(v) for v in test_y], b"data": _rows(test_x)}
    (root / "test_batch").write_bytes(pickle.dumps(blob, protocol=2))
    return folder


@pytest.fixture(scope="module")
def subset():
    if not (SUBSET_BATCHES / "test_batch").is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {SUBSET_BATCHES} (../shared/data is absent)")
    return load_cifar(SUBSET, "cifar10")


@pytest.fixture(scope="module")
def small_cifar10(subset, tmp_path_factory):
    """1,000 training and 100 test images of the real subset, written back in the CIFAR-10 format."""
    folder = tmp_path_factory.mktemp("c10small")
    return _write_cifar10(
        folder, subset["train_images"][:1000], subset["train_labels"][:1000],
        subset["test_images"][:100], subset["test_labels"][:100],
    )


# ---------------------------------------------------------------------------------------------------
# loaders


def _raw_arrays_from_opcodes(path: Path):
    """Independent decode: walk the pickle's opcodes; the pixel buffer is the one 2M+ byte string and
    the labels are the integers that follow the ``labels`` key."""
    data = path.read_bytes()
    labels, pixels, in_labels = [], None, False
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINSTRING", "BINSTRING", "SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINBYTES", "BINBYTES"):
            text = arg if isinstance(arg, str) else arg.decode("latin1")
            if len(text) > 100000:
                pixels = arg.encode("latin1") if isinstance(arg, str) else arg
            in_labels = text == "labels"
        elif in_labels and op.name in ("BININT1", "BININT2", "BININT"):
            labels.append(arg)
    return pixels, labels


@needs_subset
def test_loader_pixels_match_raw_bytes(subset):
    images, labels = load_cifar_split(SUBSET, "cifar10", "test")
    assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.shape == (2000,)
    raw, raw_labels = _raw_arrays_from_opcodes(SUBSET_BATCHES / "test_batch")
    assert len(raw) == 2000 * 3072
    assert labels.tolist() == raw_labels
    # planar RGB: byte i*3072 + c*1024 + y*32 + x is pixel (y, x) of channel c of image i
    rng = np.random.default_rng(0)
    for i, y, x, c in zip(rng.integers(0, 2000, 500), rng.integers(0, 32, 500), rng.integers(0, 32, 500),
                          rng.integers(0, 3, 500)):
        assert images[i, y, x, c] == raw[i * 3072 + c * 1024 + y * 32 + x]
    full = np.frombuffer(raw, dtype=np.uint8).reshape(2000, 3, 32, 32)
    np.testing.assert_array_equal(images, full.transpose(0, 2, 3, 1))
    # training batches are concatenated in order 1..5
    tr_raw, tr_labels = _raw_arrays_from_opcodes(SUBSET_BATCHES / "data_batch_3")
    np.testing.assert_array_equal(
        subset["train_images"][4000:6000], np.frombuffer(tr_raw, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    )
    assert subset["train_labels"][4000:6000].tolist() == tr_labels
    assert np.bincount(subset["train_labels"]).tolist() == [1000] * 10
    assert load_cifar_class_names(SUBSET, "cifar10")[:3] == ["airplane", "automobile", "bird"]


@pytest.mark.parametrize("style", ["python2_bytes_keys", "python3_str_keys"])
def test_cifar100_files_both_encodings(tmp_path, style):
    rng = np.random.default_rng(1)
    images = {s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for s, n in (("train", 30), ("test", 12))}
    fine = {s: rng.integers(0, 100, len(images[s])) for s in images}
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    key = (lambda k: k.encode()) if style == "python2_bytes_keys" else (lambda k: k)
    protocol = 2 if style == "python2_bytes_keys" else 4
    for s in images:
        blob = {
            key("data"): _rows(images[s]),
            key("fine_labels"): [int(v) for v in fine[s]],
            key("coarse_labels"): [int(v) // 5 for v in fine[s]],  # must not be picked up
            key("filenames"): [key(f"{s}_{i}.png") for i in range(len(images[s]))],
        }
        (folder / s).write_bytes(pickle.dumps(blob, protocol=protocol))
    names = [key(f"class{i:02d}") for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({key("fine_label_names"): names}, protocol=protocol))
    for root in (tmp_path, folder):  # the archive folder or its parent
        got = load_cifar(root, "cifar100")
        for s in images:
            np.testing.assert_array_equal(got[f"{s}_images"], images[s])
            np.testing.assert_array_equal(got[f"{s}_labels"], fine[s])
            assert got[f"{s}_labels"].dtype == np.int64
    assert load_cifar_class_names(tmp_path, "cifar100")[7] == "class07"


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({"data": Evil(), "fine_labels": [0]}, protocol=2))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle global"):
        load_cifar(tmp_path, "cifar100")
    assert not marker.exists()


def test_missing_dataset_names_the_expected_files(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(CifarDataError) as err:
        load_cifar(tmp_path, "cifar10")
    msg = str(err.value)
    assert "data_batch_5" in msg and "test_batch" in msg and "cifar-10-batches-py" in msg
    with pytest.raises(CifarDataError, match=r"train, test .*cifar-100-python"):
        load_cifar(tmp_path / "nowhere", "cifar100")


def test_cli_reports_missing_data(tmp_path, capsys):
    rc = cli_main(["cifar", "--data", str(tmp_path), "--iterations", "1", "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cifar100 not found" in err and "cifar-100-python" in err and "train, test" in err


# ---------------------------------------------------------------------------------------------------
# recipe pieces


def test_augmentation_is_a_symmetric_pad_crop_flip():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    out = random_pad_crop_flip(torch.from_numpy(images), torch.Generator().manual_seed(3)).numpy()
    assert out.shape == images.shape and out.dtype == np.uint8
    seen = set()
    for b in range(len(images)):
        padded = np.pad(images[b], ((4, 4), (4, 4), (0, 0)), mode="symmetric")
        matches = [
            (oy, ox, flip)
            for oy in range(9)
            for ox in range(9)
            for flip in (False, True)
            if np.array_equal(out[b], (lambda c: c[:, ::-1] if flip else c)(padded[oy : oy + 32, ox : ox + 32]))
        ]
        assert len(matches) == 1, f"image {b}: output is not one symmetric-pad crop ({matches})"
        seen.add(matches[0])
    assert len({m[2] for m in seen}) == 2 and len({m[:2] for m in seen}) > 20


def test_loss_matches_float64_loop_and_the_published_saturation():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 100, generator=g) * 3
    labels = torch.randint(0, 100, (6,), generator=g)
    got = float(smoothed_cross_entropy(logits, labels))
    ref, lab = 0.0, labels.tolist()
    for b in range(6):
        z = logits[b].double().numpy()
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        for j in range(100):
            t = 0.99 * (j == lab[b]) + 0.01 / 100
            ref -= t * math.log(p[j] + 1e-4)
    assert got == pytest.approx(ref / 6, rel=1e-5)
    # a batch entirely wrong and saturated: (1 - 0.0001) * -log(1e-4) = 9.2094, as in the reference logs
    sat = torch.full((128, 100), -50.0)
    sat[:, 0] = 50.0
    assert float(smoothed_cross_entropy(sat, torch.ones(128, dtype=torch.long))) == pytest.approx(9.2094, abs=1e-4)
    # log_eps=0 is the ordinary smoothed cross-entropy
    plain = float(smoothed_cross_entropy(logits, labels, log_eps=0.0))
    t = torch.full((6, 100), 1e-4).scatter_(1, labels[:, None], 0.99 + 1e-4)
    assert plain == pytest.approx(float(-(t * torch.log_softmax(logits.double(), 1)).sum(1).mean()), rel=1e-6)


def test_schedule_milestones_and_lr():
    assert cifar.scaled_milestones(42500) == (20000, 30000, 37500)
    assert cifar.scaled_milestones(4250) == (2000, 3000, 3750)
    ms = cifar.scaled_milestones(42500)
    # the engine's multistep factor: the update whose index equals a milestone already uses the new rate
    assert 0.1 * lr_factor(19999, ms, 0.1) == pytest.approx(0.1)
    assert 0.1 * lr_factor(20000, ms, 0.1) == pytest.approx(0.01)
    assert 0.1 * lr_factor(42499, ms, 0.1) == pytest.approx(1e-4)


def _brute_energy(weight: torch.Tensor, power: str, half_space: bool) -> float:
    """float64 reference for one layer: explicit normalisation, the N(N-1)/2 pairs i < j, the kernel of
    docs/theory.md#mhe-kernels."""
    w = weight.detach().double().reshape(weight.shape[0], -1).numpy()
    if half_space:
        w = np.concatenate([w, -w])
    w = w / np.sqrt((w * w).sum(1, keepdims=True) + 1e-4)
    n = len(w)
    i, j = np.triu_indices(n, 1)
    c = (w @ w.T)[i, j]
    if power == "2":
        e = 1.0 / (2.0 - 2.0 * c)
    elif power == "0":
        e = -np.log(2.0 - 2.0 * c)
    elif power == "a0":
        e = -np.log(np.arccos(np.clip(c, -1 + 1e-5, 1 - 1e-5)) / np.pi + 1e-4)
    else:
        raise ValueError(power)
    assert len(e) == n * (n - 1) // 2
    return float(e.sum()) / (n * (n - 1) / 2)


def _brute_terms(model, power, half_space, coef_h, coef_o):
    hidden = sum(_brute_energy(dict(model.named_modules())[n].weight, power, half_space) for n in cifar.HIDDEN_LAYERS)
    return coef_h * hidden, coef_o * _brute_energy(model.score.weight, power, False)


# (model_name, power, nearly-orthogonal value per layer from docs/theory.md#mhe-energy)
@pytest.mark.parametrize("model_name,power,sanity", [("mhe", "2", 0.5), ("half_mhe", "2", 0.5), ("mhe", "a0", 0.693)])
def test_mhe_terms_at_initialisation(model_name, power, sanity):
    cfg = cifar.CifarConfig(model_name=model_name, mhe_power=power, dataset="cifar100")
    model = cifar.build_model(100, seed=5)
    reg = cifar.build_regularizer(model, cfg)
    assert reg.hidden_layers == list(cifar.HIDDEN_LAYERS) and reg.output_layers == ["score"]
    snap = cifar.mhe_snapshot(reg)
    ref_h, ref_o = _brute_terms(model, power, model_name == "half_mhe", *DEFAULT_COEFFICIENTS[power])
    assert snap["mhe_hidden"] == pytest.approx(ref_h, rel=1e-4)
    assert snap["mhe_output"] == pytest.approx(ref_o, rel=1e-4)
    # random He-normal filters are nearly orthogonal: ~10 layers x sanity x λ_h, ~sanity x λ_o
    coef_h, coef_o = DEFAULT_COEFFICIENTS[power]
    assert snap["mhe_hidden"] == pytest.approx(10 * sanity * coef_h, rel=0.03)
    assert snap["mhe_output"] == pytest.approx(sanity * coef_o, rel=0.03)
    loss, _ = reg()
    assert float(loss.detach()) == pytest.approx(ref_h + ref_o, rel=1e-4)


def test_half_space_doubles_the_neurons():
    model = cifar.build_model(10, seed=6)
    w = model.features.conv1_1.weight  # 64 filters of 27 weights
    full = cifar.build_regularizer(model, cifar.CifarConfig(model_name="mhe", mhe_power="2"))
    half = cifar.build_regularizer(model, cifar.CifarConfig(model_name="half_mhe", mhe_power="2"))
    e_full = cifar.mhe_snapshot(full)["mhe_layers"]["features.conv1_1"]
    e_half = cifar.mhe_snapshot(half)["mhe_layers"]["features.conv1_1"]
    assert e_full == pytest.approx(_brute_energy(w, "2", False), rel=1e-5)
    assert e_half == pytest.approx(_brute_energy(w, "2", True), rel=1e-5)
    # the 128 neurons [W; -W]: 64 antipodal pairs at energy 1/4 among 128*127/2, the rest mirror W's
    ww = w.detach().double().reshape(64, -1).numpy()
    ww = ww / np.sqrt((ww * ww).sum(1, keepdims=True) + 1e-4)
    c = ww @ ww.T
    iu = np.triu_indices(64, 1)
    same = (1 / (2 - 2 * c[iu])).sum()
    anti = (1 / (2 + 2 * c[iu])).sum() * 2 + (1 / (2 + 2 * np.diag(c))).sum()
    assert e_half == pytest.approx((2 * same + anti) / (128 * 127 / 2), rel=1e-5)
    # the output layer stays full-space under half_mhe
    assert cifar.mhe_snapshot(half)["mhe_layers"]["score"] == pytest.approx(
        cifar.mhe_snapshot(full)["mhe_layers"]["score"], rel=1e-6
    )


def test_sweep_table_sits_next_to_the_published_numbers():
    assert len(cifar.SWEEP_SETTINGS) == 13
    md = results_table({"half_mhe_2": {"final_accuracy": 0.5}}, "cifar100", 42500)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert "50.00 / 73.99" in rows["half_mhe"] and "- / 69.74" in rows["baseline"]
    assert rows["mhe"].count(" / ") == 6 and "- / 71.97" in rows["mhe"]


# ---------------------------------------------------------------------------------------------------
# the command


def _read_metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_metrics_logs_and_checkpoint(small_cifar10, tmp_path):
    out = tmp_path / "run"
    rc = cli_main([
        "cifar", "--model_name", "half_mhe", "--power_s", "2", "--dataset", "cifar10", "--data", str(small_cifar10),
        "--iterations", "3", "--out", str(out), "--batch_size", "16", "--eval_every", "2", "--log_every", "1",
        "--seed", "7", "--device", "cpu",
    ])
    assert rc == 0
    rows = _read_metrics(out)
    assert [r["iteration"] for r in rows] == [0, 2, 3]
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert all(math.isfinite(r[k]) for k in ("loss", "mhe_hidden", "mhe_output", "test_loss"))
        assert r["test_accuracy"] * 100 == pytest.approx(round(r["test_accuracy"] * 100))  # k / 100 images
    # iteration 0 is before any update: the weighted terms of the seed's initial weights
    ref_h, ref_o = _brute_terms(cifar.build_model(10, seed=7), "2", True, 1.0, 10.0)
    assert rows[0]["mhe_hidden"] == pytest.approx(ref_h, rel=1e-4)
    assert rows[0]["mhe_output"] == pytest.approx(ref_o, rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(rows[0]["task_loss"] + ref_h + ref_o, rel=1e-4)
    assert rows[-1]["mhe_hidden"] != rows[0]["mhe_hidden"]  # the weights moved
    train_log = (out / "log_train.txt").read_text().splitlines()
    assert train_log[0].startswith("model_name: half_mhe, power_s: 2") and len(train_log) == 4
    assert "mhe_hidden" in train_log[1] and "lr 0.1" in train_log[1]
    assert len((out / "log_test.txt").read_text().splitlines()) == 4
    assert list((out / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["config"]["model_name"] == "half_mhe"
    # an existing run is not overwritten without --resume
    assert cli_main(["cifar", "--dataset", "cifar10", "--data", str(small_cifar10), "--model_name", "half_mhe",
                     "--power_s", "2", "--iterations", "3", "--out", str(out), "--seed", "7", "--batch_size", "16",
                     "--eval_every", "2", "--log_every", "1"]) == 2


def test_resume_retraces_the_uninterrupted_run(small_cifar10, tmp_path):
    common = ["cifar", "--model_name", "mhe", "--power_s", "0", "--dataset", "cifar10", "--data", str(small_cifar10),
              "--iterations", "4", "--batch_size", "8", "--eval_every", "2", "--seed", "3", "--device", "cpu"]
    assert cli_main(common + ["--out", str(tmp_path / "a")]) == 0
    cfg = cifar.CifarConfig(model_name="mhe", mhe_power="0", dataset="cifar10", data=str(small_cifar10),
                            iterations=4, batch_size=8, eval_every=2, seed=3)
    part = train_cifar(cfg, tmp_path / "b", device="cpu", stop_after=3)
    assert part["stopped"] and part["iterations"] == 3
    assert cli_main(common + ["--out", str(tmp_path / "b")]) == 2  # refuses to overwrite
    assert cli_main(common + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    ra, rb = _read_metrics(tmp_path / "a"), _read_metrics(tmp_path / "b")
    assert [r["iteration"] for r in rb] == [0, 2, 4]
    for x, y in zip(ra, rb):
        for k in ("test_accuracy", "loss", "mhe_hidden", "mhe_output"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6)
    # a different setting cannot resume the folder
    assert cli_main(common[:4] + ["2"] + common[5:] + ["--out", str(tmp_path / "b"), "--resume"]) == 2


@needs_subset
def test_short_run_learns(subset, tmp_path):
    # The exact recipe (lr 0.1) sits at chance for its first ~2,000 iterations (docs/theory.md#cifar-loss): its
    # loss log(p + 1e-4) stops pulling samples the saturated softmax gets confidently wrong. This short
    # run lowers the learning rate and uses a faster BN running average (--bn_momentum 0.1, so that the
    # inference-mode statistics have caught up after 40 updates); everything else is the recipe,
    # including the proportionally scaled lr steps (at 19, 28, 35).
    folder = _write_cifar10(
        tmp_path / "data", subset["train_images"][:2000], subset["train_labels"][:2000],
        subset["test_images"][:200], subset["test_labels"][:200],
    )
    out = tmp_path / "run"
    rc = cli_main([
        "cifar", "--model_name", "half_mhe", "--power_s", "2", "--dataset", "cifar10", "--data", str(folder),
        "--iterations", "40", "--batch_size", "32", "--lr", "0.002", "--bn_momentum", "0.1", "--eval_every", "40",
        "--seed", "0", "--out", str(out), "--device", "cpu",
    ])
    assert rc == 0
    rows = _read_metrics(out)
    assert [r["iteration"] for r in rows] == [0, 40]
    # chance is 0.10 with a binomial sd of 0.021 on 200 test images (20 per class); 0.20 is ~5 sd above
    assert rows[0]["test_accuracy"] < 0.16, rows[0]
    assert rows[-1]["test_accuracy"] >= 0.20, rows[-1]


def test_amp_setting_runs_the_network_in_bf16_and_keeps_loss_and_mhe_float32():
    """bf16 for CIFAR: ``precision`` is checked against engine.precision.SETTINGS; under bf16 the network's
    convolutions run in bf16, the logits reach the loss in float32, and the MHE terms equal their
    float32 value on the same weights."""
    from sphereface_plus import cifar as C
    from sphereface_plus.engine.precision import resolve_precision

    from sphereface_plus.config import ConfigError

    with pytest.raises(ConfigError, match="precision 'half'.*auto, fp32, bf16, fp16, off"):
        C.CifarConfig(precision="half")
    if resolve_precision("bf16", "cpu") != "bf16":
        pytest.skip("this CPU has no bf16")
    cfg = C.CifarConfig(model_name="mhe", mhe_power="0", dataset="cifar10", precision="bf16")
    model = C.build_model(cfg.num_classes, 0)
    reg = C.build_regularizer(model, cfg)
    x = torch.randn(4, 3, 32, 32)
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    logits = C.forward(model, x, "bf16")
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
    ref = C.forward(model, x, "fp32")
    assert torch.allclose(logits, ref, atol=0.1 * ref.abs().max().item())  # bf16 is close, not equal
    before, _ = reg()
    opt = C.build_optimizer(model, cfg)
    vals = C.train_step(model, reg, opt, x, torch.tensor([0, 1, 2, 3]), cfg, "bf16")
    assert vals["loss"] == pytest.approx(vals["task_loss"] + vals["mhe_hidden"] + vals["mhe_output"], rel=1e-6)
    assert before.dtype == torch.float32
