"""The engine every trainer shares: sampler layouts, running means and the metrics logger, checkpoints
with the settings check, parameter groups and schedules, device resolution."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.device import resolve_device
from sphereface_plus.engine.run_log import MetricsLogger, RunningMeans, read_jsonl
from sphereface_plus.engine.optim import build_adam, build_sgd, lr_factor, multistep_scheduler, param_groups
from sphereface_plus.engine.sampler import ResumableSampler, derive_seed, step_generator
from sphereface_plus.errors import CheckpointError, UsageError


def _reference_epoch_batches(n, batch, seed, update):
    """The original CIFAR BatchSchedule, transcribed: epoch permutation from SeedSequence([seed, 1, epoch])."""
    per_epoch = n // batch
    epoch, pos = divmod(update, per_epoch)
    state = np.random.SeedSequence([seed, 1, epoch]).generate_state(1, np.uint64)[0] >> 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(state)))
    return perm[pos * batch : (pos + 1) * batch]


@pytest.mark.parametrize("n, batch", [(10, 3), (12, 4), (7, 7)])
def test_drop_last_epochs_are_the_cifar_schedule(n, batch):
    s = ResumableSampler(n, batch, 50, seed=5, flip=False, drop_last=True, epoch_seed=lambda e: derive_seed(5, 1, e))
    per_epoch = n // batch
    for update in range(3 * per_epoch):
        assert torch.equal(s.batch_indices(update), _reference_epoch_batches(n, batch, 5, update))
    # an epoch uses floor(N/B) whole batches of distinct images; the remainder is dropped
    epoch = torch.cat([s.batch_indices(u) for u in range(per_epoch)])
    assert len(set(epoch.tolist())) == per_epoch * batch
    # iterating yields the same indices, and 2 ranks split each global batch
    assert [i for i, _ in s][: 2 * batch] == torch.cat([s.batch_indices(0), s.batch_indices(1)]).tolist()


def test_drop_last_ranks_split_the_global_batch():
    full = ResumableSampler(20, 4, 10, seed=1, drop_last=True)
    parts = [ResumableSampler(20, 4, 10, rank=r, world_size=2, seed=1, drop_last=True) for r in range(2)]
    for it in range(8):
        assert torch.cat([p.batch_indices(it) for p in parts]).tolist() == full.batch_indices(it).tolist()


def test_flip_off_keeps_the_data_order():
    on, off = ResumableSampler(9, 3, 6, seed=2, flip=True), ResumableSampler(9, 3, 6, seed=2, flip=False)
    assert [i for i, _ in on] == [i for i, _ in off] and not any(f for _, f in off)
    with pytest.raises(UsageError, match="larger than the training set"):
        ResumableSampler(3, 4, 1, drop_last=True)


def test_step_generators_are_pure_functions_of_seed_stream_iteration():
    a = torch.rand(4, generator=step_generator(3, 2, 7))
    assert torch.equal(a, torch.rand(4, generator=step_generator(3, 2, 7)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(3, 2, 8)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(3, 1, 7)))


def test_running_means_are_weighted_means():
    rng = np.random.default_rng(0)
    vals, weights = rng.normal(size=20), rng.integers(1, 9, size=20)
    m = RunningMeans()
    for v, w in zip(vals, weights):
        m.add(float(w), x=torch.tensor(v), y=float(v) * 2)  # tensors and floats mix
    m.add(1.0, z=5.0)
    got = m.means()
    ref = sum(v * w for v, w in zip(vals, weights)) / weights.sum()
    assert got["x"] == pytest.approx(ref, rel=1e-12) and got["y"] == pytest.approx(2 * ref, rel=1e-12)
    assert got["z"] == 5.0 and m.count == 21
    again = RunningMeans()
    again.load_state_dict(json.loads(json.dumps(m.state_dict())))  # plain data
    assert again.means() == pytest.approx(got)


def test_metrics_logger_rows_text_and_resume(tmp_path):
    log = MetricsLogger(tmp_path, jsonl="metrics.jsonl", text="log.txt", text_header="h\n",
                        text_format=lambda r: f"it {r['iteration']} loss {r['loss']:.2f}", enabled=True)
    for it in (1, 2, 3):
        log.log(it, loss=torch.tensor(float(it)), nested={"a": 1})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"iteration": i, "loss": float(i), "nested": {"a": 1}}
                                                      for i in (1, 2, 3)]
    assert (tmp_path / "log.txt").read_text() == "h\nit 1 loss 1.00\nit 2 loss 2.00\nit 3 loss 3.00\n"
    # resumed from the checkpoint of iteration 2: the row written after it is dropped, then continued
    again = MetricsLogger(tmp_path, jsonl="metrics.jsonl", resume_iteration=2, enabled=True)
    again.log(3, loss=30.0)
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 30.0]
    fresh = MetricsLogger(tmp_path, jsonl="metrics.jsonl", enabled=True)  # a new run starts empty
    assert fresh.rows == [] and read_jsonl(tmp_path / "metrics.jsonl") == []
    quiet = MetricsLogger(tmp_path / "other", enabled=False)  # ranks other than 0 write nothing
    quiet.log(1, loss=1.0)
    assert not (tmp_path / "other").exists()


def test_checkpoints_keep_n_fallback_and_settings_check(tmp_path):
    for it in range(1, 6):
        ckpt.save_checkpoint({"iteration": it, "w": torch.full((2,), float(it)), "config": {"a": 1}}, tmp_path, 1, 2)
    assert [p.name for p in ckpt.periodic_checkpoints(tmp_path / "checkpoints")] == ["ckpt_0000004.pt", "ckpt_0000005.pt"]
    path, state = ckpt.load_resume_state(tmp_path)
    assert path.name == "last.pt" and state["iteration"] == 5
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"torn")
    (tmp_path / "checkpoints" / "ckpt_0000005.pt").write_bytes(b"")
    path, state = ckpt.load_resume_state(tmp_path)
    assert path.name == "ckpt_0000004.pt" and torch.equal(state["w"], torch.full((2,), 4.0))
    with pytest.raises(CheckpointError, match="last.pt"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt.load_resume_state(tmp_path / "none") is None
    # one policy: any change outside may_change is refused, with the differences listed
    saved = {"lr": 0.1, "data": {"root": "/a", "flip": True}, "iterations": 10}
    ckpt.check_settings(saved, {"lr": 0.1, "data": {"root": "/b", "flip": True}, "iterations": 20}, "x",
                        may_change=("data.root", "iterations"))
    with pytest.raises(UsageError, match=r"data\.flip: True -> False; lr: 0\.1 -> 0\.2"):
        ckpt.check_settings(saved, {"lr": 0.2, "data": {"root": "/a", "flip": False}, "iterations": 10}, "x")


def test_param_groups_and_schedules():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Linear(4, 2))
    decay, no_decay = param_groups([net, net], 5e-4)  # a module given twice counts once
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "3.bias"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    all_decay = param_groups([net], 5e-4, decay_biases=True)[0]
    assert len(all_decay["params"]) == len(list(net.parameters()))
    opt = build_sgd([net], 0.1, 0.9, 5e-4, decay_biases=True)
    sched = multistep_scheduler(opt, [3, 5], 0.1)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * lr_factor(i, [3, 5], 0.1) for i in range(7)])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert isinstance(build_adam([net], 1e-3, (0.5, 0.999)), torch.optim.Adam)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda", setting="train.device")
    with pytest.raises(UsageError, match="not a device"):
        resolve_device("gpu0")
