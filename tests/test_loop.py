"""The engine's one training loop (sphereface_plus.engine.loop) on a task small enough to check by hand:
least squares by SGD, whose every update is recomputed here in float64 numpy."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch

from sphereface_plus.engine.checkpoint import load_checkpoint, resume_run_state
from sphereface_plus.engine.loop import Cadence, Loop, StepOutcome, Task
from sphereface_plus.engine.sampler import ResumableSampler
from sphereface_plus.errors import TrainingDiverged


@dataclass
class Recipe:
    iterations: int = 12
    batch: int = 4
    lr: float = 0.1
    seed: int = 0
    every: int = 3


def _data(n=32, d=3, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    return x, x @ np.array([1.0, -2.0, 0.5]) + 0.1 * g.normal(size=n)


class LeastSquares(Task):
    """w <- w - lr * grad of the batch's mean squared error; the docs' example of a task (docs/interfaces.md)."""

    def __init__(self, cfg: Recipe, out, poison_at=(), **loop_kw):
        x, y = _data()
        self.cfg, self.iteration, self.poison_at = cfg, 0, set(poison_at)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.w = torch.zeros(3, dtype=torch.float64)
        self.sampler = ResumableSampler(len(x), cfg.batch, cfg.iterations, seed=cfg.seed, flip=False, drop_last=True)
        self.rows, self.evaluations = [], []
        self.loop = Loop(self, Cadence(cfg.iterations, checkpoint_every=cfg.every, log_every=cfg.every,
                                       eval_every=2 * cfg.every), out, **loop_kw)

    def batches(self, start, restarts):
        return (self.sampler.batch_indices(it) for it in range(start, self.cfg.iterations))

    def step(self, idx):
        x, y = self.x[idx], self.y[idx]
        r = x @ self.w - y
        loss = float((r ** 2).mean())
        if self.iteration in self.poison_at:
            loss = math.nan
        else:
            self.w = self.w - self.cfg.lr * 2 * x.T @ r / len(idx)
        self.iteration += 1
        return StepOutcome(math.isfinite(loss), {"loss": loss}, message="the loss became nan")

    def log(self, iteration, means, steps, seconds):
        self.rows.append((iteration, means["loss"], steps))

    def evaluate(self, iteration, means):
        self.evaluations.append((iteration, means.get("loss")))

    def state_dict(self):
        return {"w": self.w.clone(), "iteration": self.iteration, "config": asdict(self.cfg), "rows": list(self.rows)}

    def load_state_dict(self, state):
        self.w, self.iteration, self.rows = state["w"].clone(), int(state["iteration"]), list(state["rows"])


def _reference(cfg: Recipe):
    """Every update in float64 numpy, and the mean loss of each log window."""
    x, y = _data()
    sampler = ResumableSampler(len(x), cfg.batch, cfg.iterations, seed=cfg.seed, flip=False, drop_last=True)
    w, losses = np.zeros(3), []
    for it in range(cfg.iterations):
        idx = sampler.batch_indices(it).numpy()
        r = x[idx] @ w - y[idx]
        losses.append(np.mean(r ** 2))
        w = w - cfg.lr * 2 * x[idx].T @ r / len(idx)
    rows = [(k, float(np.mean(losses[k - cfg.every:k])), cfg.every) for k in range(cfg.every, cfg.iterations + 1, cfg.every)]
    return w, rows


def test_a_run_is_the_float64_reference_and_its_cadences_hold(tmp_path):
    cfg = Recipe()
    task = LeastSquares(cfg, tmp_path)
    summary = task.loop.run()
    w, rows = _reference(cfg)
    np.testing.assert_allclose(task.w.numpy(), w, rtol=1e-12)
    assert [(i, n) for i, _, n in task.rows] == [(i, n) for i, _, n in rows]
    np.testing.assert_allclose([m for _, m, _ in task.rows], [m for _, m, _ in rows], rtol=1e-12)
    assert [i for i, _ in task.evaluations] == [6, 12]  # every 6 and at the end (12 is both: once)
    # the evaluation sees the mean since the previous evaluation: the mean of the log windows it spans
    assert task.evaluations[0][1] == pytest.approx((rows[0][1] + rows[1][1]) / 2, rel=1e-12)
    assert summary["iterations"] == 12 and not summary["stopped"]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 12 and torch.equal(state["w"], task.w)


def test_stop_after_then_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = Recipe()
    whole = LeastSquares(cfg, tmp_path / "whole")
    whole.loop.run()
    part = LeastSquares(cfg, tmp_path / "part", stop_after=4)  # stops between two checkpoint cadences
    assert part.loop.run()["stopped"] and part.iteration == 4
    again = LeastSquares(cfg, tmp_path / "part")
    found = resume_run_state(tmp_path / "part", "auto", asdict(cfg))
    again.loop.restore(found[1])
    assert again.iteration == 4
    again.loop.run()
    assert torch.equal(again.w, whole.w)
    assert again.rows == whole.rows  # the log window in force at the stop was in the checkpoint


def test_stop_policy_ends_the_run_with_one_line(tmp_path):
    task = LeastSquares(Recipe(), tmp_path, poison_at={5}, nan_policy="stop", divergence_fix="lower lr")
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at iteration 6; lower lr"):
        task.loop.run()


def test_rollback_policy_skips_then_restores_the_newest_checkpoint(tmp_path):
    cfg = Recipe()
    task = LeastSquares(cfg, tmp_path, poison_at={4, 5}, nan_policy="rollback", patience=2, max_rollbacks=1)
    task.loop.capture_start_state()
    for it in range(4):
        task.loop.guarded_step(task.sampler.batch_indices(it))
    task.loop.save()  # a checkpoint at iteration 4
    w4 = task.w.clone()
    first = task.loop.guarded_step(task.sampler.batch_indices(4))  # skipped: nothing changes
    assert not first["finite"] and not first["rolled_back"] and task.loop.skipped_steps == 1
    assert torch.equal(task.w, w4)
    second = task.loop.guarded_step(task.sampler.batch_indices(5))  # second in a row: roll back
    assert second["rolled_back"] and task.loop.rollbacks == 1 and task.iteration == 4
    np.testing.assert_array_equal(task.w.numpy(), w4.numpy())  # the checkpoint's weights
    task.loop.guarded_step(task.sampler.batch_indices(4))  # the same two again: one rollback too many
    with pytest.raises(TrainingDiverged, match="after 1 rollbacks"):
        task.loop.guarded_step(task.sampler.batch_indices(5))


def test_an_unhealthy_state_is_never_saved(tmp_path):
    class Unhealthy(LeastSquares):
        def healthy(self):
            return self.iteration < 3

    task = Unhealthy(Recipe(iterations=3, every=3), tmp_path, nan_policy="rollback", patience=1, max_rollbacks=0)
    with pytest.raises(TrainingDiverged, match="out of bounds"):
        task.loop.run()
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
