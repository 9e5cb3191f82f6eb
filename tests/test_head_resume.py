"""Exact resume with each registered head's state: a run saved after 2 steps and resumed
continues bit for bit as the uninterrupted run (weights, the head's buffers such as A-Softmax's
iteration counter, momentum, losses, the head's logged terms). Also: the trainer logs a head's terms
generically, and a head's settings in force are recorded in the checkpoint's config."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sphereface_plus.face.config import load_config
from sphereface_plus.heads import head_parameters, list_heads
from sphereface_plus.face.trainer import FaceTrainer
from tests.trainer_stubs import TinyFaces

NUM_CLASSES, BATCH, STEPS, SAVE_AT = 8, 4, 4, 2


def batch(step: int):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(BATCH, 3, 112, 96, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def make_trainer(out, name: str) -> Trainer:
    cfg = load_config(None, [
        f"out_dir={out}", "model.backbone=sphere4", "model.embedding_dim=16", f"head.name={name}",
        "mhe.lambda_m=0.5", "optim.lr=0.05", "train.seed=2", f"train.batch_size={BATCH}", f"train.iterations={STEPS}",
        "train.tensorboard=false", "train.precision=fp32", "train.device=cpu", "checkpoint.every=100", "eval.pairs=",
    ])
    return FaceTrainer.from_config(cfg, TinyFaces(NUM_CLASSES))


def run(trainer: FaceTrainer, steps):
    out = []
    for step in steps:
        stats = trainer.train_step(*batch(step))
        assert stats["finite"]
        out.append((float(stats["loss"]), {k: float(v) for k, v in stats["terms"].items()}))
    return out


@pytest.mark.parametrize("name", list_heads())
def test_resume_is_exact_with_each_head(name, tmp_path):
    torch.set_num_threads(1)
    whole = make_trainer(tmp_path / "whole", name)
    want = run(whole, range(STEPS))
    first = make_trainer(tmp_path / "part", name)
    assert run(first, range(SAVE_AT)) == want[:SAVE_AT]
    first.save()
    resumed = make_trainer(tmp_path / "part", name)
    assert resumed.resume("auto") is not None and resumed.iteration == SAVE_AT
    assert run(resumed, range(SAVE_AT, STEPS)) == want[SAVE_AT:]
    a, b = resumed.state_dict(), whole.state_dict()
    for part in ("model", "head"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{name}: {part}.{k}"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), name
    # the settings in force are recorded (every setting the head keeps as an attribute)
    recorded = a["config"]["head"]
    for key in head_parameters(name):
        if isinstance(getattr(resumed.head, key, None), (bool, int, float, str)):
            assert recorded[key] == getattr(resumed.head, key), (name, key)
    # the head's main term is logged under its own name
    assert resumed.model.head.main_term in want[-1][1]


def test_a_checkpoint_of_the_union_head_config_resumes(tmp_path):
    """A checkpoint written before the heads owned their settings lists every head's keys, None where
    unset; its settings in force are today's defaults, so the run resumes (and a real change is refused)."""
    from sphereface_plus.engine.checkpoint import load_checkpoint, save_checkpoint
    from sphereface_plus.errors import UsageError

    trainer = make_trainer(tmp_path, "a_softmax")
    run(trainer, range(1))
    state = trainer.state_dict()
    state["config"]["head"] = {"name": "a_softmax", "m": 4, "s": None, "base": 1000.0, "gamma": 0.12, "power": 1.0,
                               "lambda_min": 5.0, "easy_margin": None, "gradient": None, "parallel": "replicated",
                               "sample_rate": 1.0}
    path = save_checkpoint(state, tmp_path)
    assert make_trainer(tmp_path, "a_softmax").resume(str(path)) == path
    state = load_checkpoint(path)
    state["config"]["head"]["m"] = 2
    save_checkpoint(state, tmp_path)
    with pytest.raises(UsageError, match=r"head\.m: 2 -> 4"):
        make_trainer(tmp_path, "a_softmax").resume(str(path))


def test_a_checkpoint_of_an_earlier_release_resumes_and_real_changes_are_still_refused():
    """A checkpoint written before settings were added (model.kwargs, train.dist_timeout, mhe.variant, ...) or
    renamed (train.amp -> train.precision) compares equal to the same run today; a setting that really
    differs is still named."""
    from sphereface_plus.engine.checkpoint import check_settings
    from sphereface_plus.errors import UsageError
    from sphereface_plus.face.trainer import saved_settings_in_force

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "face" / "cpu_smoke.yaml"))
    now = cfg.to_dict()
    old = {k: (dict(v) if isinstance(v, dict) else v) for k, v in now.items()}
    del old["model"]["kwargs"], old["train"]["dist_timeout"], old["mhe"]["variant"]
    old["train"]["amp"] = old["train"].pop("precision")
    check_settings(saved_settings_in_force(old), saved_settings_in_force(now), "old.pt")  # no error
    old["optim"] = {**old["optim"], "lr": now["optim"]["lr"] * 2}
    with pytest.raises(UsageError, match=r"optim\.lr: 0\.02 -> 0\.01"):
        check_settings(saved_settings_in_force(old), saved_settings_in_force(now), "old.pt")
