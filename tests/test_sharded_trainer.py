"""The face trainer with ``head.parallel=sharded`` against the replicated single-process trainer.

The reference is a replicated 1-process run (A-Softmax + SphereFace+ MHE, gradient clipping on). Both
layouts draw the same initial classifier (world-size independent): the fixture checks that
the sharded run's initial state equals the replicated one's, bit for bit, and still loads it into the
reference (a check that a sharded checkpoint is a plain replicated one). The runs train in float64
(``train.float64``): the 2- and 3-process runs add the same numbers in other orders, which float32
turns into differences above 1e-5 within a few steps; in float64 they stay below the bound analysed
in tests/test_train.py (FLOAT64_ATOL). Every run trains on the same global batches of 6; a W-process
run feeds rank r its slice ``[r * 6 / W, (r + 1) * 6 / W)``. One spawned gloo job per world size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sphereface_plus.face.config import load_config
from sphereface_plus.engine.dist import DistInfo
from sphereface_plus.face.trainer import FaceTrainer
from tests.trainer_stubs import TinyFaces

NUM_CLASSES, GLOBAL_BATCH, STEPS, SAVE_AT = 12, 6, 4, 2
ATOL = 1e-9  # float64 training: the bound analysed at tests/test_train.py FLOAT64_ATOL


def batch(step: int, world: int = 1, rank: int = 0):
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 112, 96, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)
    b = GLOBAL_BATCH // world
    return images[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]


def make_trainer(out, parallel: str, info: DistInfo = None) -> Trainer:
    cfg = load_config(None, [
        f"out_dir={out}", "model.backbone=sphere4", "model.embedding_dim=16", f"head.parallel={parallel}",
        "head.name=a_softmax", "mhe.lambda_m=0.5", "mhe.mode=batch_vs_all", "optim.clip_grad_norm=0.5",
        "optim.lr=0.05", "train.seed=1", f"train.batch_size={GLOBAL_BATCH}", f"train.iterations={STEPS}",
        "train.tensorboard=false", "train.precision=off", "train.float64=true", "train.device=cpu", "checkpoint.every=2", "checkpoint.keep=0",
        "eval.pairs=",
    ])
    return FaceTrainer.from_config(cfg, TinyFaces(NUM_CLASSES), info)


def run_steps(trainer: FaceTrainer, steps, world: int = 1, rank: int = 0, save_at=()):
    losses = []
    for step in steps:
        stats = trainer.train_step(*batch(step, world, rank))
        losses.append(float(stats["loss"]))
        assert stats["correct"].item() <= stats["count"]
        if trainer.iteration in save_at:
            trainer.save()
    return losses


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(got, want, what):
    assert got["iteration"] == want["iteration"], what
    for part in ("model", "head"):
        assert got[part].keys() == want[part].keys(), f"{what}: {part} keys"
        for k in want[part]:
            assert got[part][k].shape == want[part][k].shape, f"{what}: {part}.{k} shape"
            torch.testing.assert_close(got[part][k].double(), want[part][k].double(), atol=ATOL, rtol=0,
                                       msg=f"{what}: {part}.{k}")
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys(), what
    for idx, st in want["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][idx]["momentum_buffer"], st["momentum_buffer"],
                                   atol=ATOL, rtol=0, msg=f"{what}: momentum of parameter {idx}")


def _worker(rank: int, world: int, init_file: str, out: str, resume_from) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = make_trainer(out, "sharded", DistInfo(rank=rank, world_size=world))
        if resume_from:
            trainer.resume(resume_from)
        start = trainer.iteration
        losses = run_steps(trainer, range(start, STEPS), world, rank, save_at=(SAVE_AT, STEPS))
        if rank == 0:
            Path(out, f"losses_{world}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def spawn(world: int, out, resume_from=None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, str(Path(out) / "init"), str(out), resume_from), nprocs=world, join=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sharded_ref")
    sharded = make_trainer(out / "s1", "sharded")
    init = sharded.state_dict()
    assert init["head"]["weight"].shape == (NUM_CLASSES, 16)
    replicated = make_trainer(out / "r1", "replicated")
    same = replicated.state_dict()
    for part in ("model", "head"):  # the same seed gives the same model whatever head.parallel
        for k, v in init[part].items():
            assert torch.equal(same[part][k], v), f"{part}.{k}"
    replicated.load_state_dict(init)
    losses = run_steps(replicated, range(STEPS), save_at=(SAVE_AT,))
    return {"init": init, "losses": losses, "final": replicated.state_dict(), "sharded_1": sharded, "out": out}


def test_sharded_one_process_equals_replicated(reference):
    """On one process the sharded classifier runs the head's own forward: the replicated run, exactly."""
    trainer = reference["sharded_1"]
    losses = run_steps(trainer, range(STEPS))
    assert losses == reference["losses"]
    final = trainer.state_dict()
    for part in ("model", "head"):
        for k, v in reference["final"][part].items():
            assert torch.equal(final[part][k], v), f"{part}.{k}"


@pytest.fixture(scope="module")
def two_process_run(reference):
    out = reference["out"] / "w2"
    out.mkdir()
    spawn(2, out)
    return out


def test_two_processes_equal_the_replicated_run_and_save_the_whole_head(reference, two_process_run):
    losses = json.loads((two_process_run / "losses_2.json").read_text())
    assert losses == pytest.approx(reference["losses"], abs=ATOL)
    final = _load(two_process_run / "checkpoints" / "last.pt")
    assert final["head"]["weight"].shape == (NUM_CLASSES, 16)  # gathered whole, not rank 0's rows
    assert_same_state(final, reference["final"], "2 processes")


def test_two_process_checkpoint_resumes_on_three_processes(reference, two_process_run, tmp_path):
    spawn(3, tmp_path, resume_from=str(two_process_run / "checkpoints" / f"ckpt_{SAVE_AT:07d}.pt"))
    losses = json.loads((tmp_path / "losses_3.json").read_text())
    assert losses == pytest.approx(reference["losses"][SAVE_AT:], abs=ATOL)
    assert_same_state(_load(tmp_path / "checkpoints" / "last.pt"), reference["final"], "resumed on 3 processes")


@pytest.mark.parametrize("parallel", ["sharded", "replicated"])
def test_two_process_checkpoint_resumes_on_one_process(reference, two_process_run, tmp_path, parallel):
    trainer = make_trainer(tmp_path, parallel)
    trainer.resume(str(two_process_run / "checkpoints" / f"ckpt_{SAVE_AT:07d}.pt"))
    losses = run_steps(trainer, range(SAVE_AT, STEPS))
    assert losses == pytest.approx(reference["losses"][SAVE_AT:], abs=ATOL)
    assert_same_state(trainer.state_dict(), reference["final"], f"resumed on 1 process ({parallel})")


def test_head_settings_are_checked():
    from sphereface_plus.config import ConfigError

    with pytest.raises(ConfigError, match="head.parallel"):
        load_config(None, ["head.parallel=tensor"])
    with pytest.raises(ConfigError, match=r"head.sample_rate=1.5 must be in \(0, 1\]"):
        load_config(None, ["head.parallel=sharded", "head.sample_rate=1.5"])
    with pytest.raises(ConfigError, match="needs head.parallel=sharded"):
        load_config(None, ["head.sample_rate=0.5"])


def test_cli_train_with_a_sharded_head_on_one_process(tmp_path):
    """`sphereface-plus train ... head.parallel=sharded` (one process): trains, writes a whole-head checkpoint
    and records the layout in config.yaml."""
    pytest.importorskip("data_prep.datasets")
    import yaml

    from sphereface_plus.cli import main

    smoke = Path(__file__).resolve().parents[1] / "configs" / "face" / "cpu_smoke.yaml"
    args = ["train", "--config", str(smoke), f"out_dir={tmp_path / 'run'}", "train.iterations=2", "train.batch_size=4",
            "model.embedding_dim=16", f"data.synthetic.cache_dir={tmp_path / 'cache'}", "data.synthetic.num_identities=20",
            "data.synthetic.images_per_identity=2", "data.synthetic.pairs_per_fold=2", "train.tensorboard=false",
            "eval.pairs=", "head.parallel=sharded", "mhe.mode=full"]
    assert main(args) == 0
    state = _load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["head"]["weight"].shape == (20, 16) and state["iteration"] == 2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["head"]["parallel"] == "sharded"


def test_sharded_rollback_to_the_start_state_and_to_a_checkpoint(tmp_path):
    """The NaN guard with a sharded head: the start state is this rank's own (no collective), a
    checkpoint is cut to this rank's rows; both restore the exact weights and momentum."""
    trainer = make_trainer(tmp_path, "sharded")
    trainer.loop.patience = 1  # the guard of the loop (train.nan_patience, read when the trainer is built)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    images, labels = batch(0)
    bad = torch.full_like(images, float("nan"))
    assert trainer.train_step(bad, labels)["rolled_back"] and trainer.iteration == 0
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    for step in range(2):
        assert trainer.train_step(*batch(step))["finite"]
    trainer.save()
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state_dict()["state"].values()]
    assert trainer.train_step(*batch(2))["finite"]
    assert trainer.train_step(bad, labels)["rolled_back"] and trainer.iteration == 2
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for got, want in zip(trainer.optimizer.state_dict()["state"].values(), momentum):
        assert torch.equal(got["momentum_buffer"], want)
