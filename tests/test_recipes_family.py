"""The published recipes of the SphereFace family and the field (configs/face/*_vggface2.yaml, *_ms1mv3.yaml, *_ms1m.yaml) train two
iterations through the CLI on synthetic identities, each with its own head, MHE and optimiser settings and
a tiny backbone (SFNet-20 at widths 4-16, or sphere4 in place of iResNet-100), and config.yaml records the
recipe's head settings. A recipe whose backbone is not registered is skipped with the reason.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = [
    "sphereface_sfnet20_vggface2.yaml",
    "sphereface2c_sfnet20_vggface2.yaml",
    "spherefacer_h_v2_sfnet20_vggface2.yaml",
    "arcface_sfnet20_vggface2.yaml",
    "cosface_sfnet20_vggface2.yaml",
    "spherefaceplus_v0_sfnet20_vggface2.yaml",
    "arcface_iresnet100_ms1mv3.yaml",
    "spherefaceplus_v0_iresnet100_ms1m.yaml",
]


def _tiny(backbone):
    """The tiny stand-in for a recipe's backbone (the recipe's head, MHE, optimiser and data settings stay):
    SFNet-20 at widths 4-16 through ``model.kwargs`` (full width takes ~25 s a run on a CPU), sphere4 in
    place of iResNet-100 (which has no width option)."""
    from sphereface_plus.face.config import ModelConfig

    has_kwargs = hasattr(ModelConfig(), "kwargs")
    if backbone.startswith("sfnet") and has_kwargs:
        return ["model.kwargs={channels: [4, 8, 8, 16]}"]
    return ["model.backbone=sphere4"] + (["model.kwargs={}"] if has_kwargs else [])


_CACHE = {}


def _synthetic(tmp_path_factory):
    """20 synthetic identities aligned at 112x112, made once per module (after the skip checks)."""
    if "root" not in _CACHE:
        from data_prep.training_set import prepare_synthetic

        root = tmp_path_factory.mktemp("synthetic112")
        prepare_synthetic(root, 20, 3, 0, "112x112", pairs_per_fold=2)
        _CACHE["root"] = root
    return _CACHE["root"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_iterations(recipe, tmp_path_factory, tmp_path):
    from sphereface_plus.cli import main
    from sphereface_plus.models import list_backbones

    path = REPO / "configs" / "face" / recipe
    raw = yaml.safe_load(path.read_text())
    backbone = raw["model"]["backbone"]
    if backbone not in list_backbones():
        pytest.skip(f"{recipe}: backbone {backbone!r} is not registered")
    cache = _synthetic(tmp_path_factory)
    out = tmp_path / "run"
    args = ["train", "--config", str(path), *_tiny(backbone), "model.embedding_dim=32",
            "train.iterations=2", "train.batch_size=4", "train.precision=fp32", f"out_dir={out}",
            "data.source=synthetic", f"data.synthetic.cache_dir={cache}", "data.synthetic.num_identities=20",
            "data.synthetic.images_per_identity=3", "data.synthetic.pairs_per_fold=2", "data.num_workers=0",
            "checkpoint.every=2", "train.log_every=1", "train.tensorboard=false", "eval.pairs="]
    assert main(args) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    for key, value in raw["head"].items():  # the recipe's head settings are the ones in force
        assert written["head"][key] == pytest.approx(value) if isinstance(value, float) else written["head"][key] == value
    assert written["mhe"] == {**written["mhe"], **raw.get("mhe", {})}
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
