"""The ``sphereface-plus gan`` runner on real CIFAR-10 images: files, exact resume, finiteness, CLI errors.

The run is tiny (batch 8, 4 iterations, FID/KID on 4 generated images against 4 real ones) so that the
file takes seconds on a busy CPU; the library's numbers themselves are checked in ``tests/test_gan.py``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sphereface_plus.commands.gan import train_gan
from sphereface_plus.gan.config import GanConfig
from sphereface_plus.engine.checkpoint import load_checkpoint
from sphereface_plus.gan import inception_metrics as M
from shared_data import CIFAR_SUBSET, needs_cifar_subset as needs_subset, needs_inception

ROOT = Path(__file__).resolve().parents[1]
SUBSET = CIFAR_SUBSET


def cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPHEREFACE_PLUS_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sphereface_plus", "gan", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def _cfg(tmp_path, **kw) -> GanConfig:
    base = dict(sn=True, mhe=1e-7, data=str(SUBSET), iterations=2, batch_size=8, eval_every=1,
                eval_samples=0, real_limit=4, stats_cache=str(tmp_path / "stats"))
    base.update(kw)
    return GanConfig(**base)


pytestmark = pytest.mark.usefixtures("two_torch_threads")


def _rows(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@needs_subset
def test_run_writes_the_documented_files_and_resumes_exactly(tmp_path):
    cfg = _cfg(tmp_path)
    full, split = tmp_path / "full", tmp_path / "split"
    train_gan(cfg, full, device="cpu")
    # documented outputs
    rows = _rows(full)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    keys = {"iteration", "d_loss", "g_loss", "mhe", "elapsed_s"}
    for r in rows:
        assert keys <= set(r), r
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    # iteration 0 is before any update: its losses are those of an untrained pair (log 2 and 2 log 2)
    assert abs(rows[0]["g_loss"] - math.log(2)) < 0.05 and abs(rows[0]["d_loss"] - 2 * math.log(2)) < 0.1
    assert rows[0]["mhe"] > 0
    for it in (0, 1, 2):
        img = Image.open(full / f"samples_{it:07d}.png")
        assert img.size == (64 * 32 // 8, 8 * 32)  # 64 images, 8 x 8
    assert list((full / "tb").iterdir())
    assert GanConfig(**__import__("yaml").safe_load((full / "config.yaml").read_text())) == cfg
    state = load_checkpoint(full / "checkpoints" / "last.pt")  # weights_only
    assert state["iteration"] == 2
    # a run stopped at 1 and resumed equals the uninterrupted one: weights, optimiser, metrics
    first = train_gan(cfg, split, device="cpu", stop_after=1)
    assert first["stopped"] and first["iterations"] == 1
    with pytest.raises(Exception, match="--resume"):
        train_gan(cfg, split, device="cpu")
    train_gan(cfg, split, device="cpu", resume=True)
    other = load_checkpoint(split / "checkpoints" / "last.pt")
    for part in ("generator", "discriminator"):
        for k, v in state[part].items():
            torch.testing.assert_close(other[part][k], v, rtol=0, atol=0, msg=f"{part}.{k}")
    for part in ("opt_g", "opt_d"):
        for pid, st in state[part]["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(other[part]["state"][pid][k], v, rtol=0, atol=0)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(_rows(split)) == strip(rows)
    # a changed setting is refused on resume
    with pytest.raises(Exception, match="mhe"):
        train_gan(_cfg(tmp_path, mhe=1e-6), split, device="cpu", resume=True)


@needs_subset
def test_mhe_term_and_spectral_norm_reach_the_discriminator(tmp_path):
    """With MHE off the logged term is 0; with it on, it equals gan_mhe_loss on the checkpoint's raw weights."""
    from sphereface_plus.gan import Discriminator, gan_mhe_loss

    off = train_gan(_cfg(tmp_path, mhe=0.0, sn=False, iterations=1, eval_every=1, eval_samples=0), tmp_path / "off",
                    device="cpu")
    assert all(r["mhe"] == 0.0 for r in off["rows"])
    on = train_gan(_cfg(tmp_path, mhe=1e-6, sn=False, iterations=1, eval_every=1, eval_samples=0), tmp_path / "on",
                   device="cpu")
    d = Discriminator(spectral_norm=False)
    d.load_state_dict(load_checkpoint(tmp_path / "on" / "checkpoints" / "last.pt")["discriminator"])
    # iteration 0's row is the term at the initial weights, the next at the weights before the update;
    # after the update the term moved only by the (tiny) step
    expected = float(gan_mhe_loss(d, 1e-6).detach())
    assert on["rows"][0]["mhe"] == pytest.approx(on["rows"][1]["mhe"], rel=1e-6)
    assert on["rows"][1]["mhe"] == pytest.approx(expected, rel=1e-3)


def main_inproc(capsys, *args):
    """The real command line (``sphereface_plus.cli.main``) in this process: no interpreter start-up per case."""
    from sphereface_plus.cli import main

    capsys.readouterr()
    try:
        rc = main(["gan", *map(str, args)])
    except SystemExit as exc:  # argparse's own errors (a flag's type)
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
@needs_subset
@needs_inception
def test_evaluation_rows_score_against_both_splits(tmp_path):
    """``real_stats=test,train``: fid/kid against the test images, fid_train/kid_train against the train ones,
    from one pass over the samples; row 0 equals ``fid_kid`` of the initial G's samples computed apart.
    (Inception on CPU: 2 evaluations x 4 images + 2 x 4 real ones, then the reference; ~20-60 s.)"""
    from data_prep.cifar import load_cifar_split
    from sphereface_plus.gan import steps
    from sphereface_plus.gan.models import Generator

    out = tmp_path / "run"
    cfg = _cfg(tmp_path, eval_samples=4, iterations=1, real_stats="test,train")
    res = train_gan(cfg, out, device="cpu")
    assert [r["iteration"] for r in res["rows"]] == [0, 1]
    for r in res["rows"]:
        for key in ("fid", "kid", "kid_std", "fid_train", "kid_train", "kid_std_train"):
            assert math.isfinite(r[key]), (key, r)
        assert r["fid"] > 0 and r["fid_train"] > 0 and r["fid"] != r["fid_train"], r
    assert len(list((tmp_path / "stats").glob("inception-pool3-*.npz"))) == 2  # both real sets cached
    assert _rows(out) == res["rows"]

    torch.manual_seed(cfg.seed)  # the runner builds G first after seeding: the same initial weights
    fake = steps.generate_images(Generator(), 4, show_progress=False)
    net = M.InceptionPool3()
    for split, suffix in (("test", ""), ("train", "_train")):
        ref = M.fid_kid(load_cifar_split(str(SUBSET), "cifar10", split)[0][:4], fake, extractor=net)
        assert res["rows"][0][f"fid{suffix}"] == pytest.approx(ref["fid"], rel=1e-6), split
        assert res["rows"][0][f"kid{suffix}"] == pytest.approx(ref["kid"], rel=1e-6, abs=1e-9), split


def test_cli_accepts_the_original_flags_in_both_spellings(capsys):
    import yaml

    rc, out, err = main_inproc(capsys, "--config", ROOT / "configs" / "gan" / "mhe.yaml", "--no-sn", "--mhe", "2e-6",
                               "--batch_size", "32", "--eval-every", "7", "--eval_samples", "10", "--iterations", "9",
                               "--seed", "5", "--real_stats", "train", "lr=2.0e-4", "--print-config")
    assert rc == 0, err
    got = yaml.safe_load(out)
    assert got["sn"] is False and got["mhe"] == 2e-6 and got["batch_size"] == 32 and got["eval_every"] == 7
    assert got["eval_samples"] == 10 and got["iterations"] == 9 and got["seed"] == 5 and got["real_stats"] == "train"
    assert got["lr"] == 2e-4
    rc, out, _ = main_inproc(capsys, "--sn", "--seed", "1", "--print-config")
    assert rc == 0 and yaml.safe_load(out)["sn"] is True
    # the four recipes are the published rows
    for name, sn, mhe in (("baseline", False, 0), ("sn", True, 0), ("mhe", False, 1e-6), ("sn_mhe", True, 1e-7)):
        rc, out, _ = main_inproc(capsys, "--config", ROOT / "configs" / "gan" / f"{name}.yaml", "--print-config")
        c = yaml.safe_load(out)
        assert (rc, c["sn"], c["mhe"], c["iterations"], c["batch_size"]) == (0, sn, mhe, 200000, 64), name


def test_help_explains_why_there_is_no_built_in_inception_score():
    proc = cli("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "Why no built-in Inception Score" in text and "1008-class" in text and "--inception-weights" in text


def _one_error(rc, err, *fragments):
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("args,fragments", [
    (["--mhe", "-1"], ["mhe", "-1"]),
    (["--real-stats", "val"], ["real_stats", "val"]),
    (["--mhe-power", "7"], ["mhe_power", "7"]),
    (["--eval_samples", "1"], ["eval_samples"]),
    (["no_such_key=1"], ["no_such_key"]),
    (["--iterations", "many"], ["iterations", "many"]),
    (["--precision", "fp8"], ["precision", "fp8"]),
    (["mhe_half_space=true"], ["mhe_half_space"]),
])
def test_cli_bad_values_give_one_error_line(tmp_path, capsys, args, fragments):
    rc, _, err = main_inproc(capsys, "--out", tmp_path / "run", "--data", tmp_path, *args)
    _one_error(rc, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_cli_missing_data_is_one_error_exit_2_before_anything_is_written(tmp_path):
    proc = cli("--out", tmp_path / "run", "--data", tmp_path / "nowhere", "--iterations", "1", "--eval_samples", "0")
    _one_error(proc.returncode, proc.stderr, "nowhere")
    assert not (tmp_path / "run").exists()
