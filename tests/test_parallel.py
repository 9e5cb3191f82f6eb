"""The row-sharded classifier (sphereface_plus.parallel) against the single-process head, on 2 and 3
gloo processes (torch.multiprocessing spawn): logits, loss, accuracy and every gradient of every
registered head; the MHE terms (value and gradient) of every mode and kernel; Partial FC sampling
against the softmax restricted to the sampled classes; and a few SGD steps saved on 2 processes and
resumed on 3 and on 1 (and into a replicated head) against one uninterrupted single-process run.

Each world size is one spawned job that runs every check (process start-up costs seconds).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from sphereface_plus.engine.checkpoint import serialize
from sphereface_plus.errors import CheckpointError, UsageError
from sphereface_plus.heads import create_head, list_heads
from sphereface_plus.mhe import CLASSIFIER_MODES, classifier_mhe
from sphereface_plus.parallel import (
    ShardedClassifier,
    gather_head_state,
    gather_optimizer_state,
    init_rows,
    load_head_state,
    shard_optimizer_state,
    shard_range,
    sharded_classifier_mhe,
)
from sphereface_plus.utils import atomic_write_bytes, safe_torch_load

# options per head, beyond its defaults: small scales so that the gradients are not saturated; A-Softmax
# with a λ schedule that moves during the steps, with λ = 0, OpenSphere's real-m hard detached form and
# the Caffe backward; ArcFace detached past π - m. A registered head missing here runs with its defaults
# (every head builds from its name): the sharded classifier covers every head of list_heads().
HEAD_CASES = {
    "a_softmax": [dict(m=4, base=10.0, gamma=0.5, power=1.0, lambda_min=0.5),
                  dict(m=2, base=0.0, gamma=0.0, lambda_min=0.0),
                  dict(m=1.7, s=8.0, feature_norm="hard", gradient="detached", base=0.0, lambda_min=0.0,
                       weight_gradient="stored"),
                  dict(m=4, gradient="caffe", base=10.0, gamma=0.5, lambda_min=1.0)],
    "cosface": [dict(s=8.0, m=0.35)],
    "arcface": [dict(s=8.0, m=0.5), dict(s=8.0, m=2.0, gradient="detached", wrap="insightface")],
    "softmax": [{}],
    # (the newer heads) AdaFace's norm statistics: 'global' gathers the batch over
    # the process group, which the whole-head reference here, run inside the spawned processes on the
    # already global batch, must not do; a block of the sharded classifier sees the global batch either way
    "adaface": [dict(norm_stats="local", s=8.0)],
}


def head_cases():
    return [(name, kw) for name in list_heads() for kw in HEAD_CASES.get(name, [{}])]


TOL = dict(rtol=0, atol=1e-10)
# a logarithmic, a Euclidean power and an angular kernel: the two code paths of the kernels (the
# kernels themselves are tested against brute force in tests/test_mhe.py); collectives cost time
MHE_POWERS = ("0", "2", "a1")  # float64 throughout; the issue asks for 1e-6


def close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- checks run inside each process
def check_heads(world: int, rank: int) -> None:
    """Every head (:func:`head_cases`) through the sharded classifier against the whole head: the loss
    (HeadOutput.loss, the head's own: CE, binary, auxiliary terms), its terms, the logits block, the
    accuracy, the SphereFace+ MHE term, every gradient (embeddings, row parameters by block, shared
    parameters whole) and the head's state after two training steps."""
    num_classes, dim, per_rank = 11, 6, 4  # 11 rows: an uneven split on 2 and 3 processes
    start, end = shard_range(num_classes, world, rank)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    for name, kw in head_cases():
        g = torch.Generator().manual_seed(1)
        ref = create_head(name, dim, num_classes, **kw).double()
        clf = ShardedClassifier(name, dim, num_classes, kw).double()
        with torch.no_grad():
            for pname, p in ref.named_parameters():
                if pname in ref.row_parameters:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        load_head_state(clf, ref.state_dict())
        for step in range(2):  # two training forwards: schedules advance, the renorm acts
            # the same global batch on every rank (same generator); each rank takes its rows
            x_global = torch.randn(per_rank * world, dim, generator=g, dtype=torch.float64) * 3
            y_global = torch.randint(0, num_classes, (per_rank * world,), generator=g)
            y_global[:3] = torch.tensor([0, 0, num_classes - 1])  # a repeated class, the last class
            # reference: the whole classifier in one process
            xr = x_global.clone().requires_grad_(True)
            ref_out = ref(xr, y_global)
            mhe_ref = classifier_mhe(ref.weight, y_global, "2", "batch_vs_all")
            (ref_out.loss + 0.5 * mhe_ref).backward()
            # sharded
            xs = x_global[lo:hi].clone().requires_grad_(True)
            out = clf(xs, y_global[lo:hi])
            mhe = sharded_classifier_mhe(clf.weight, out.labels, num_classes, "2", "batch_vs_all")
            (out.loss + 0.5 * mhe).backward()
            what = f"{name} {kw} step {step} rank {rank}/{world}"
            close(out.labels, y_global, what + " labels")
            close(out.logits, ref_out.logits[:, start:end].detach(), what + " logits")
            close(out.loss, ref_out.loss.detach(), what + " loss")
            assert set(out.terms) == set(ref_out.terms), what
            for key, value in ref_out.terms.items():
                close(out.terms[key], value, what + f" term {key}")
            close(mhe, mhe_ref.detach(), what + " mhe")
            assert int(clf.num_correct(out)) == int((ref_out.logits.argmax(1) == y_global).sum()), what + " accuracy"
            close(xs.grad, xr.grad[lo:hi], what + " embedding gradient")
            for pname, p in clf.head.named_parameters():
                want = getattr(ref, pname).grad
                close(p.grad, want[start:end] if pname in ref.row_parameters else want, what + f" {pname} gradient")
                p.grad = None
            ref.zero_grad(set_to_none=True)
            close(clf.weight.detach(), ref.weight.detach()[start:end], what + " renormed weight")
            ref_state = ref.state_dict()
            for key, value in clf.head.state_dict().items():  # schedules, buffers, shared parameters
                if key not in ref.row_parameters:
                    close(value, ref_state[key], what + f" state {key}")
    # accuracy ties resolve to the smallest class index on the full logits too
    clf = ShardedClassifier("softmax", 2, num_classes).double()
    with torch.no_grad():
        clf.weight.fill_(1.0)
        clf.head.bias.zero_()
    y = torch.full((per_rank,), 0)
    assert int(clf.num_correct(clf(torch.ones(per_rank, 2, dtype=torch.float64), y))) == per_rank * world


def caffe_among_reference(w: torch.Tensor, y: torch.Tensor, alpha: float):
    """Transcription of wy1iu/sphereface-plus inter_class_layer.cpp, type AMONG (normalize on): the
    forward's distance D and the backward's weight diff for loss weight ``alpha``, by plain loops."""
    n, m = w.shape[0], y.numel()
    w_mean = w.sum(dim=0) / n
    w_mean = w_mean / torch.sqrt(w_mean.dot(w_mean) + 1e-5)
    tmp = 0.0
    for i in range(n):
        for j in range(m):
            diff = w[i] - w[int(y[j])]
            tmp += float(diff.dot(diff))
    dist_value = tmp / n
    coef = -4.0 * alpha / (m * dist_value * dist_value + 1e-5)
    diff_w = torch.zeros_like(w)
    for j in range(m):
        diff_w[int(y[j])] += coef * (w[int(y[j])] - w_mean)
    return torch.tensor(dist_value, dtype=w.dtype), diff_w


def check_mhe(world: int, rank: int) -> None:
    num_classes, dim = 13, 5
    g = torch.Generator().manual_seed(2)
    w_full = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([3, 3, 0, 12, 7, 5, 3, 11, 6])
    start, end = shard_range(num_classes, world, rank)
    for y in (labels, torch.tensor([4, 4])):
        ws = w_full[start:end].clone().requires_grad_(True)
        val = sharded_classifier_mhe(ws, y, num_classes, mode="caffe_among")
        (grad,) = torch.autograd.grad(0.7 * val, ws)
        ref_val, ref_grad = caffe_among_reference(w_full, y, alpha=0.7)
        close(val, ref_val, f"caffe_among value rank {rank}/{world}")
        close(grad, ref_grad[start:end], f"caffe_among update rank {rank}/{world}")
    # every single-process mode (caffe_among too once mhe.classifier_mhe has it)
    for mode in CLASSIFIER_MODES:
        for power in MHE_POWERS:
            for y in (labels, torch.tensor([4, 4])):  # the second: a single class (no pair in batch_unique)
                wr = w_full.clone().requires_grad_(True)
                ref = classifier_mhe(wr, y, power, mode, block_size=4)
                (grad_ref,) = torch.autograd.grad(ref, wr)
                ws = w_full[start:end].clone().requires_grad_(True)
                val = sharded_classifier_mhe(ws, y, num_classes, power, mode, block_size=2)
                (grad,) = torch.autograd.grad(val, ws)
                what = f"mhe {mode} power {power} labels {y.tolist()} rank {rank}/{world}"
                close(val, ref.detach(), what + " value")
                close(grad, grad_ref[start:end], what + " gradient")


def check_sampling(world: int, rank: int) -> None:
    num_classes, dim, per_rank = 40, 6, 3
    g = torch.Generator().manual_seed(3)
    ref = create_head("cosface", dim, num_classes, s=8.0).double()
    clf = ShardedClassifier("cosface", dim, num_classes, dict(s=8.0), sample_rate=0.5).double()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(num_classes, dim, generator=g, dtype=torch.float64))
    load_head_state(clf, ref.state_dict())
    x = torch.randn(per_rank * world, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (per_rank * world,), generator=g)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    xs = x[lo:hi].clone().requires_grad_(True)
    out = clf(xs, y[lo:hi])
    start, end = shard_range(num_classes, world, rank)
    assert out.columns.numel() == int(0.5 * (end - start))
    positives = set(y[(y >= start) & (y < end)].tolist())
    assert positives <= set(out.columns.tolist()), "a positive class was not sampled"
    cols = [None] * world
    dist.all_gather_object(cols, out.columns.tolist())
    union = torch.tensor(sorted(c for part in cols for c in part))
    xr = x.clone().requires_grad_(True)
    logits_ref = ref(xr, y).logits
    close(out.logits, logits_ref[:, out.columns].detach(), "sampled logits")
    ce_ref = F.cross_entropy(logits_ref[:, union], torch.searchsorted(union, y))  # softmax over the sample
    ce = out.loss
    close(clf.cross_entropy(out), ce.detach(), "the head's loss is the sampled cross-entropy")
    close(ce, ce_ref.detach(), "sampled cross-entropy")
    ce.backward()
    ce_ref.backward()
    close(xs.grad, xr.grad[lo:hi], "sampled embedding gradient")
    close(clf.weight.grad, ref.weight.grad[start:end], "sampled weight gradient (zero outside the sample)")


# a short SphereFace+ training: Linear "backbone" (DDP when distributed) + A-Softmax + MHE, SGD momentum
TRAIN = dict(classes=10, inp=4, dim=6, batch=6, steps=6, save_at=3, seed=7, lambda_m=0.3)
TRAIN_HEAD = dict(m=4, base=10.0, gamma=0.5, power=1.0, lambda_min=1.0)


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(TRAIN["batch"], TRAIN["inp"], generator=g, dtype=torch.float64),
            torch.randint(0, TRAIN["classes"], (TRAIN["batch"],), generator=g))


def _backbone() -> nn.Module:
    torch.manual_seed(TRAIN["seed"])
    return nn.Linear(TRAIN["inp"], TRAIN["dim"]).double()


def _sgd(backbone: nn.Module, head: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": list(backbone.parameters())}, {"params": list(head.parameters())}],
                           lr=0.05, momentum=0.9, weight_decay=5e-4)


def reference_run(steps: int):
    """The single-process replicated run: backbone, full head, optimiser after ``steps`` steps."""
    backbone = _backbone()
    head = create_head("a_softmax", TRAIN["dim"], TRAIN["classes"], **TRAIN_HEAD).double()
    head.init_rows_(TRAIN["seed"])  # the world-size-independent init, whole
    opt = _sgd(backbone, head)
    for step in range(steps):
        replicated_step(backbone, head, opt, step)
    return backbone, head, opt


def replicated_step(backbone, head, opt, step):
    x, y = _batch(step)
    loss = head(backbone(x), y).loss + TRAIN["lambda_m"] * classifier_mhe(head.weight, y, "2", "batch_vs_all")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class ShardedRun:
    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank
        self.backbone = _backbone()
        self.net = nn.parallel.DistributedDataParallel(self.backbone) if world > 1 else self.backbone
        self.clf = ShardedClassifier("a_softmax", TRAIN["dim"], TRAIN["classes"], TRAIN_HEAD, seed=TRAIN["seed"],
                                     embedding_grad_scale=world).double()
        self.opt = _sgd(self.backbone, self.clf)

    def step(self, step: int) -> None:
        x, y = _batch(step)
        per = TRAIN["batch"] // self.world
        out = self.clf(self.net(x[self.rank * per:(self.rank + 1) * per]), y[self.rank * per:(self.rank + 1) * per])
        mhe = sharded_classifier_mhe(self.clf.weight, out.labels, TRAIN["classes"], "2", "batch_vs_all")
        (out.loss + TRAIN["lambda_m"] * mhe).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state(self):
        head, opt = gather_head_state(self.clf), gather_optimizer_state(self.opt, self.clf)
        return {"model": self.backbone.state_dict(), "head": head, "optimizer": opt} if self.rank == 0 else None

    def load(self, state) -> None:
        self.backbone.load_state_dict(state["model"])
        load_head_state(self.clf, state["head"])
        self.opt.load_state_dict(shard_optimizer_state(state["optimizer"], self.opt, self.clf))

    def check_equals(self, backbone, head, opt, what: str) -> None:
        state = self.state()
        if self.rank == 0:
            for k, v in backbone.state_dict().items():
                close(state["model"][k], v, f"{what}: backbone {k}")
            for k, v in head.state_dict().items():
                close(state["head"][k], v, f"{what}: head {k}")
            for idx, s in opt.state_dict()["state"].items():
                close(state["optimizer"]["state"][idx]["momentum_buffer"], s["momentum_buffer"], f"{what}: momentum {idx}")


def check_training(world: int, rank: int, ckpt_in, ckpt_out) -> None:
    run = ShardedRun(world, rank)
    first = TRAIN["save_at"] if ckpt_in else 0
    if ckpt_in:
        run.load(safe_torch_load(ckpt_in))
    for step in range(first, TRAIN["steps"]):
        if step == TRAIN["save_at"] and ckpt_out:
            state = run.state()
            if rank == 0:
                atomic_write_bytes(ckpt_out, serialize(state))
        run.step(step)
    run.check_equals(*reference_run(TRAIN["steps"]), f"{world} processes, resumed={bool(ckpt_in)}")


def _worker(rank: int, world: int, init_file: str, ckpt_in, ckpt_out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        check_heads(world, rank)
        check_mhe(world, rank)
        check_sampling(world, rank)
        check_training(world, rank, ckpt_in, ckpt_out)
    finally:
        dist.destroy_process_group()


def spawn(world: int, tmp, ckpt_in=None, ckpt_out=None) -> None:
    init_file = os.path.join(tmp, f"init_{world}")
    mp.spawn(_worker, args=(world, init_file, ckpt_in, ckpt_out), nprocs=world, join=True)


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def two_process_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    path = str(tmp / "step3.pt")
    spawn(2, str(tmp), ckpt_out=path)
    return path


def test_two_processes_equal_the_single_process_run(two_process_checkpoint):
    # the spawned job asserted every check on both ranks; here: it also left the step-3 checkpoint
    state = safe_torch_load(two_process_checkpoint)
    assert state["head"]["weight"].shape == (TRAIN["classes"], TRAIN["dim"])


def test_three_processes_and_resume_of_the_two_process_checkpoint(two_process_checkpoint, tmp_path):
    spawn(3, str(tmp_path), ckpt_in=two_process_checkpoint)


def test_two_process_checkpoint_resumes_on_one_process_and_in_a_replicated_head(two_process_checkpoint):
    state = safe_torch_load(two_process_checkpoint)
    backbone, head, opt = reference_run(TRAIN["save_at"])
    # the checkpoint's head is a replicated head's state dict: it loads into the plain head unchanged
    plain = create_head("a_softmax", TRAIN["dim"], TRAIN["classes"], **TRAIN_HEAD).double()
    plain.load_state_dict(state["head"])
    for k, v in head.state_dict().items():
        close(plain.state_dict()[k], v, f"checkpoint head {k}")
    expected = reference_run(TRAIN["steps"])
    # resume as a sharded run on one process (no process group at all)
    run = ShardedRun(1, 0)
    run.load(state)
    for step in range(TRAIN["save_at"], TRAIN["steps"]):
        run.step(step)
    run.check_equals(*expected, "1 process, resumed")
    # and as the replicated trainer would: optimiser state dict as saved (read again: the optimiser
    # above adopted the loaded tensors and updated them in place)
    state = safe_torch_load(two_process_checkpoint)
    plain.load_state_dict(state["head"])
    backbone = _backbone()
    backbone.load_state_dict(state["model"])
    opt = _sgd(backbone, plain)
    opt.load_state_dict(state["optimizer"])
    for step in range(TRAIN["save_at"], TRAIN["steps"]):
        replicated_step(backbone, plain, opt, step)
    for k, v in expected[1].state_dict().items():
        close(plain.state_dict()[k], v, f"replicated resume head {k}")


def test_every_registered_head_is_covered():
    assert {name for name, _ in head_cases()} == set(list_heads())


def test_one_process_without_a_process_group_is_the_whole_head():
    """World size 1 (no process group): the sharded classifier runs the head's own forward."""
    check_heads(1, 0)


def test_shard_range_is_a_balanced_partition():
    for num_classes in (2, 7, 11, 1000):
        for world in range(1, min(num_classes, 9) + 1):
            ranges = [shard_range(num_classes, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        shard_range(3, 4, 0)


def test_initialisation_does_not_depend_on_the_world_size():
    full = torch.empty(9000, 3)
    init_rows(full, 0, 9000, seed=5, unit_rows=False)
    for world in (2, 3):
        parts = []
        for r in range(world):
            s, e = shard_range(9000, world, r)
            part = torch.empty(e - s, 3)
            init_rows(part, s, 9000, seed=5, unit_rows=False)
            parts.append(part)
        assert torch.equal(torch.cat(parts), full)
    bound = (6.0 / (3 + 9000)) ** 0.5  # xavier-uniform of the whole 9000 x 3 classifier
    assert float(full.abs().max()) <= bound and float(full.abs().max()) > 0.9 * bound
    assert len({tuple(r) for r in full[:, :].tolist()}) == 9000  # no repeated rows across chunks


def test_user_errors():
    with pytest.raises(UsageError, match="at least 2 classes per process"):
        ShardedClassifier("a_softmax", 4, 1)
    with pytest.raises(UsageError, match="sample_rate"):
        ShardedClassifier("cosface", 4, 10, sample_rate=0.0)
    clf = ShardedClassifier("a_softmax", 4, 10)
    with pytest.raises(CheckpointError, match="has shape \\(12, 4\\) but the classifier has 10 classes"):
        load_head_state(clf, create_head("a_softmax", 4, 12).state_dict())
    with pytest.raises(ValueError, match="outside"):
        clf(torch.randn(2, 4), torch.tensor([0, 10]))
