"""The trainer: exact resume (also after SIGKILL), 1 vs 2 processes, NaN guard, sampler, optimiser, CLI.

Every run is a tiny sphere4 / 32-d embedding / batch 4 job on 20 synthetic identities, so a step
takes a fraction of a second on 2 CPU cores. One uninterrupted 8-iteration run with a checkpoint
every 2 iterations (all kept) is the reference that the interrupted, resumed and 2-process runs
are compared with.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F

from sphereface_plus.config import ConfigError
from sphereface_plus.face.config import load_config
from sphereface_plus.errors import UsageError
from sphereface_plus.engine.checkpoint import find_resume_checkpoint
from sphereface_plus.engine.optim import build_optimizer, build_scheduler, lr_factor
from sphereface_plus.engine.sampler import ResumableSampler
from sphereface_plus.commands.train import make_trainer, train


REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "face" / "cpu_smoke.yaml"
REF_ITERS = 8


def _overrides(out, cache, iters, every=2, workers=0, extra=(), amp="fp32"):
    # fp32 pinned (the machine's auto precision would be bf16 on a bf16 CPU): the resume and layout tests
    # compare runs bit for bit in one precision (bf16 resume is exact too: its own test)
    return [f"train.precision={amp}",
        f"out_dir={out}", f"train.iterations={iters}", "train.batch_size=4", "train.seed=3",
        f"checkpoint.every={every}", "checkpoint.keep=0", "model.embedding_dim=32",
        f"data.synthetic.cache_dir={cache}", "data.synthetic.num_identities=20",
        "data.synthetic.images_per_identity=3", "data.synthetic.pairs_per_fold=2",
        "train.log_every=1", "train.tensorboard=false", f"data.num_workers={workers}", "eval.pairs=", *extra,
    ]


def _cfg(out, cache, iters, **kw):
    return load_config(str(SMOKE), _overrides(out, cache, iters, **kw))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b, atol=0.0):
    for part in ("model", "head"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if atol == 0.0:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=0, msg=f"{part}.{k}")
    assert a["iteration"] == b["iteration"]
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    for x, y in zip(mom_a, mom_b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("reference")
    # verification on the synthetic pairs every 4 iterations: it must not disturb training state
    summary = train(_cfg(out, cache, REF_ITERS, extra=["eval.pairs=auto", "eval.every=4"]))
    return out, summary


def test_reference_run_trains_and_checkpoints(reference):
    out, summary = reference
    assert summary["iteration"] == REF_ITERS
    assert [h["iteration"] for h in summary["history"]] == list(range(1, REF_ITERS + 1))
    names = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "ckpt_0000002.pt", "ckpt_0000004.pt", "ckpt_0000006.pt", "ckpt_0000008.pt", "last.pt"]
    # best.pt: the state of the verification with the best mean (the earlier on ties), never resumed from
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [r["iteration"] for r in evals] == [4, 8]
    best_row = max(evals, key=lambda r: (r["eval"]["mean_accuracy"], -r["iteration"]))
    assert _load(out / "checkpoints" / "best.pt")["iteration"] == best_row["iteration"]
    state = _load(out / "checkpoints" / "last.pt")
    # the λ counter is part of the head state and equals the iteration (docs/theory.md#lambda-schedule)
    assert int(state["head"]["iteration"]) == REF_ITERS
    assert summary["lambda"] == pytest.approx(1000.0 / (1 + 0.12 * REF_ITERS))
    saved = load_config(str(out / "config.yaml"))
    assert saved.to_dict() == state["config"]
    # periodic LFW-style verification through eval, at 4 and 8
    assert sorted(p.name for p in (out / "eval").glob("*.json")) == ["verify_0000004.json", "verify_0000008.json"]
    report = json.loads((out / "eval" / "verify_0000008.json").read_text())
    assert len(report["fold_accuracies"]) == 10 and 0.0 <= report["mean_accuracy"] <= 1.0
    assert summary["eval"]["mean_accuracy"] == report["mean_accuracy"]
    # `sphereface-plus compare` scores plain cosine: the stored threshold is the one chosen without
    # mean subtraction, recorded beside the protocol's in the report
    assert state["threshold"] == pytest.approx(report["compare_threshold"])
    assert state["threshold"] == pytest.approx(_plain_cosine_threshold(state, out), abs=1e-3)


def _plain_cosine_threshold(state, out):
    """Independent reference for the stored threshold: embed the synthetic pairs with the saved
    backbone by hand (BGR, (x - 127.5) / 128, crop + mirror concatenated), score plain cosine, and
    for each fold take the mean of the best thresholds of a loop over the 1e-4 grid on the other
    folds (strict inequalities); the threshold is the mean over the folds."""
    import cv2
    import numpy as np

    from sphereface_plus import create_backbone

    cfg = state["config"]
    net = create_backbone(cfg["model"]["backbone"], input_size=tuple(cfg["model"]["input_size"]),
                          embedding_dim=cfg["model"]["embedding_dim"])
    net.load_state_dict(state["model"])
    net.eval()
    cache = Path(cfg["data"]["synthetic"]["cache_dir"])
    lines = (cache / "raw" / "pairs.txt").read_text().split("\n")
    n_folds, per_half = (int(v) for v in lines[0].split())
    rows = [ln.split() for ln in lines[1:] if ln.strip()]

    def embed(name, number):
        img = cv2.imread(str(cache / "aligned" / name / f"{name}_{int(number):04d}.jpg"))
        x = torch.from_numpy((img.astype(np.float32) - 127.5) / 128.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            return torch.cat([net(x), net(torch.flip(x, dims=[3]))], dim=1)[0].double().numpy()

    scores, same, folds = [], [], []
    for i, r in enumerate(rows):
        a, b = (embed(r[0], r[1]), embed(r[0], r[2])) if len(r) == 3 else (embed(r[0], r[1]), embed(r[2], r[3]))
        scores.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        same.append(len(r) == 3)
        folds.append(i // (2 * per_half))
    scores, same, folds = np.array(scores), np.array(same), np.array(folds)
    grid = np.arange(-10000, 10001) / 10000.0
    chosen = []
    for k in range(n_folds):
        train_ = folds != k
        acc = [((scores[train_ & same] > t).sum() + (scores[train_ & ~same] < t).sum()) for t in grid]
        acc = np.array(acc)
        chosen.append(grid[acc == acc.max()].mean())
    return float(np.mean(chosen))


def test_resume_equals_uninterrupted(reference, cache, tmp_path):
    ref_out, ref_summary = reference
    # 2 steps, stop, resume for 2 more; the resumed leg uses 2 DataLoader workers (the data order and
    # flips must not depend on them)
    first = train(_cfg(tmp_path, cache, 2))
    second = train(_cfg(tmp_path, cache, 4, workers=2), resume="auto")
    _assert_same_state(_load(tmp_path / "checkpoints" / "last.pt"), _load(ref_out / "checkpoints" / "ckpt_0000004.pt"))
    losses = [h["loss"] for h in first["history"] + second["history"]]
    assert losses == [h["loss"] for h in ref_summary["history"][:4]]


def test_cli_sigkill_after_save_then_resume_auto(reference, cache, tmp_path):
    """A training process killed with SIGKILL, then `sphereface-plus train --resume auto` continues exactly.

    The killed process is the ``python -m sphereface_plus.apps.train`` entry point (the one torchrun runs,
    same arguments); the resume goes through the ``sphereface-plus`` command-line dispatcher.
    """
    ref_out, _ = reference
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), *_overrides(out, cache, 1000)]
    # same thread count as this process (the default), so that float reductions match bit for bit
    proc = subprocess.Popen([sys.executable, "-m", "sphereface_plus", "train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not (out / "checkpoints" / "ckpt_0000002.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint after 90 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    newest = find_resume_checkpoint(out)
    k = int(_load(newest)["iteration"])
    assert k % 2 == 0 and 2 <= k <= REF_ITERS - 2, f"killed too late (checkpoint at {k})"

    from sphereface_plus.cli import main

    assert main(["train", "--config", str(SMOKE), *_overrides(out, cache, k + 2), "--resume", "auto"]) == 0
    state = _load(out / "checkpoints" / "last.pt")
    _assert_same_state(state, _load(ref_out / "checkpoints" / f"ckpt_{k + 2:07d}.pt"))
    # the checkpoint contract of docs/interfaces.md
    cfg = state["config"]
    assert cfg["model"]["backbone"] == "sphere4" and cfg["model"]["input_size"] == [112, 96]
    assert cfg["data"]["template"] == "112x96"
    assert state["iteration"] == k + 2


def test_two_processes_match_one(cache, tmp_path):
    """torchrun with 2 gloo processes (global batch 4 = 2 x 2, DDP) follows the 1-process trajectory; in
    float64 (``train.float64``), to the bound analysed below (FLOAT64_ATOL): in float32 the reordered
    all-reduce sums alone may move the weights by ~1e-5 within 4 iterations on some machines."""
    from sphereface_plus.cli import main

    extra = ("train.float64=true",)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--config", str(SMOKE), *_overrides(one, cache, 4, extra=extra)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sphereface_plus", "train", "--config", str(SMOKE), *_overrides(two, cache, 4, extra=extra)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [h["loss"] for h in json.loads((two / "summary.json").read_text())["history"]]
    want = [h["loss"] for h in json.loads((one / "summary.json").read_text())["history"]]
    assert len(got) == len(want) == 4 and got == pytest.approx(want, abs=FLOAT64_ATOL)
    a, b = _load(two / "checkpoints" / "last.pt"), _load(one / "checkpoints" / "last.pt")
    assert {t.dtype for t in a["model"].values()} == {torch.float64}  # the run was the float64 reference
    _assert_same_state(a, b, atol=FLOAT64_ATOL)


# The 2-process and the 1-process sharded runs add the same numbers in different orders (DDP's
# all-reduce of the backbone's gradient halves, the sharded softmax's all-reduced sums, the MHE ring);
# in float32 that alone moves weights by more than 1e-5 within 4 iterations. So the comparison runs in
# float64 (train.float64), where the bound is set by the analysis, not by one machine's outcome:
# - one step: a sum of N terms reordered changes by at most 2 gamma_N sum|terms| (Higham, Accuracy
#   and Stability of Numerical Algorithms, eq. 4.4), gamma_N = N u / (1 - N u), u = 2^-53 = 1.1e-16.
#   The widest reduction here is a conv bias gradient over the batch and the positions,
#   N = 4 x 112 x 96 = 43008 < 2^16, so the relative change of any gradient entry is below
#   2 x 2^16 x 2^-53 = 2^-36 = 1.5e-11 of the sum of the magnitudes of its terms;
# - over the iterations the difference grows at most by the factor by which a perturbation of the
#   weights grows. Float32 (u = 2^-24) gives differences up to ~1e-4 after 4 iterations,
#   i.e. an amplification of at most 1e-4 / 2^-24 < 2e3 times the unit roundoff; in float64 the same
#   amplification gives 2e3 x 2^-53 < 3e-13.
# A tolerance of 1e-9 leaves a factor > 1e3 above the bound for the weights (|w| < 10) and for the
# summed losses; a float32-sized discrepancy (a real bug, a missing reduction, a wrong gradient scale)
# is 1e4 times larger.
FLOAT64_ATOL = 1e-9


def test_torchrun_with_a_sharded_head_matches_one_sharded_process(cache, tmp_path):
    """The sharded classifier through the real launcher: ``torchrun`` with 2 gloo processes and
    ``head.parallel=sharded`` (each rank holds half of the 20 class rows, MHE over all of them) follows
    the 1-process sharded run (same initialisation: it does not depend on the world size) and saves the
    same whole-head checkpoint; in float64, to the bound above."""
    from sphereface_plus.cli import main

    extra = ("head.parallel=sharded", "mhe.mode=full", "train.float64=true")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--config", str(SMOKE), *_overrides(one, cache, 4, extra=extra)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sphereface_plus", "train", "--config", str(SMOKE), *_overrides(two, cache, 4, extra=extra)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [h["loss"] for h in json.loads((two / "summary.json").read_text())["history"]]
    want = [h["loss"] for h in json.loads((one / "summary.json").read_text())["history"]]
    assert len(got) == len(want) == 4 and got == pytest.approx(want, abs=FLOAT64_ATOL)
    a, b = _load(two / "checkpoints" / "last.pt"), _load(one / "checkpoints" / "last.pt")
    assert a["head"]["weight"].shape == (20, 32) and a["head"]["weight"].dtype == torch.float64  # the whole head
    _assert_same_state(a, b, atol=FLOAT64_ATOL)
    assert yaml.safe_load((two / "config.yaml").read_text())["head"]["parallel"] == "sharded"


def test_the_same_seed_gives_the_same_model_whatever_head_parallel(cache, tmp_path):
    """Through the CLI, 4 iterations of cpu_smoke with ``head.parallel=sharded`` on one process
    and with ``replicated`` give the same weights, bit for bit: both layouts draw the classifier with the
    world-size-independent ``init_rows_(seed)`` (and leave the default generator alone), and the sharded
    classifier on one process runs the head's own forward and the single-process MHE."""
    from sphereface_plus.cli import main

    for parallel in ("replicated", "sharded"):
        args = _overrides(tmp_path / parallel, cache, 4, extra=(f"head.parallel={parallel}",))
        assert main(["train", "--config", str(SMOKE), *args]) == 0
    rep, sh = (_load(tmp_path / p / "checkpoints" / "last.pt") for p in ("replicated", "sharded"))
    _assert_same_state(rep, sh)  # atol 0: torch.equal on every tensor
    losses = [[h["loss"] for h in json.loads((tmp_path / p / "summary.json").read_text())["history"]]
              for p in ("replicated", "sharded")]
    assert losses[0] == losses[1]


def test_nan_guard_skips_then_rolls_back(cache, tmp_path):
    cfg = _cfg(tmp_path, cache, 100, extra=["train.nan_patience=2", "train.max_rollbacks=1"])
    trainer = make_trainer(cfg)
    images, labels, _ = next(iter(trainer.make_loader(100)))
    for _ in range(2):
        assert trainer.train_step(images, labels)["finite"]
    trainer.save()
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    bad = torch.full_like(images, float("nan"))

    s = trainer.train_step(bad, labels)  # skipped: weights untouched
    assert not s["finite"] and not s["rolled_back"] and trainer.skipped_steps == 1
    for k, v in trainer.model.state_dict().items():
        if k == "head.weight":  # A-Softmax renormalises its rows in every training forward (Caffe)
            torch.testing.assert_close(F.normalize(v, dim=1), F.normalize(saved[k], dim=1), atol=1e-6, rtol=0)
        elif k != "head.iteration":
            assert torch.equal(v, saved[k]), k
    s = trainer.train_step(bad, labels)  # second in a row: roll back to the checkpoint
    assert s["rolled_back"] and trainer.rollbacks == 1 and trainer.iteration == 2
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # training goes on from there, and a run that keeps diverging stops with a clear error
    assert trainer.train_step(images, labels)["finite"]
    trainer.train_step(bad, labels)
    with pytest.raises(RuntimeError, match="diverged"):
        trainer.train_step(bad, labels)


def test_sampler_splits_global_batch_and_resumes():
    full = list(ResumableSampler(10, 4, 7, seed=5))
    # every epoch is a permutation of the whole set
    assert sorted(i for i, _ in full[:10]) == list(range(10))
    assert sorted(i for i, _ in full[10:20]) == list(range(10))
    r0 = list(ResumableSampler(10, 4, 7, rank=0, world_size=2, seed=5))
    r1 = list(ResumableSampler(10, 4, 7, rank=1, world_size=2, seed=5))
    for it in range(7):
        assert r0[2 * it: 2 * it + 2] + r1[2 * it: 2 * it + 2] == full[4 * it: 4 * it + 4]
    assert list(ResumableSampler(10, 4, 7, seed=5, start_iter=3)) == full[12:]
    assert list(ResumableSampler(10, 4, 7, seed=5, shuffle_round=1)) != full
    assert not any(f for _, f in ResumableSampler(10, 4, 7, seed=5, flip=False))
    with pytest.raises(ValueError, match="divisible"):
        ResumableSampler(10, 5, 7, world_size=2)


def test_weight_decay_groups_and_schedule():
    from sphereface_plus.heads import create_head
    from sphereface_plus.models import create_backbone

    cfg = load_config(None, ["data.source=synthetic", "optim.milestones=[3,6]", "optim.warmup_iters=2",
                             "optim.warmup_factor=0.5"])
    net, head = create_backbone("sphere4"), create_head("softmax", in_features=512, num_classes=3)
    opt = build_optimizer([net, head], cfg.optim)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    for module in (net, head):
        for name, p in module.named_parameters():
            want = 0.0 if name.endswith("bias") else 5e-4
            assert (id(p) in decay) == (want > 0), name
    assert any(isinstance(m, torch.nn.PReLU) and id(m.weight) in decay for m in net.modules())
    sched = build_scheduler(opt, cfg.optim)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.1 * 0.5, 0.1 * 0.75, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001]
    assert lrs == pytest.approx(expect)
    assert lr_factor(5, (3, 6), 0.1, 0, 0.1) == pytest.approx(0.1)


def test_checkpoint_rotation_and_damaged_last(tmp_path):
    from sphereface_plus.engine.checkpoint import save_checkpoint

    for it in range(1, 9):
        save_checkpoint({"iteration": it, "w": torch.full((3,), float(it))}, tmp_path, every=2, keep=2)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt_0000006.pt", "ckpt_0000008.pt", "last.pt"]
    assert find_resume_checkpoint(tmp_path).name == "last.pt"
    save_checkpoint({"iteration": 9, "w": torch.zeros(3)}, tmp_path, every=2, keep=2)  # last.pt only
    assert int(_load(find_resume_checkpoint(tmp_path))["iteration"]) == 9
    (folder / "last.pt").write_bytes(b"truncated")  # damaged: fall back to the newest periodic file
    assert find_resume_checkpoint(tmp_path).name == "ckpt_0000008.pt"
    assert find_resume_checkpoint(tmp_path / "nothing") is None


def test_bf16_resume_is_bit_exact_and_summary_reports_precision(cache, tmp_path):
    """train.precision=bf16 on a CPU: 2 steps + resume for 2 more equals 4 uninterrupted steps bit for bit
    (autocast is deterministic on CPU); summary.json says the precision used and images_per_s."""
    whole = train(_cfg(tmp_path / "whole", cache, 4, amp="bf16"))
    train(_cfg(tmp_path / "split", cache, 2, amp="bf16"))
    split = train(_cfg(tmp_path / "split", cache, 4, amp="bf16"), resume="auto")
    _assert_same_state(_load(tmp_path / "split" / "checkpoints" / "last.pt"),
                       _load(tmp_path / "whole" / "checkpoints" / "last.pt"))
    assert split["history"][-1]["loss"] == whole["history"][-1]["loss"]
    from sphereface_plus.engine.precision import resolve_precision

    assert whole["precision"] == resolve_precision("bf16", "cpu") == json.loads(
        (tmp_path / "whole" / "summary.json").read_text())["precision"]
    assert whole["images_per_s"] > 0
    fp32 = train(_cfg(tmp_path / "fp32", cache, 1, amp="off"))
    assert fp32["precision"] == "fp32"


def test_precision_setup_of_the_trainer(cache, tmp_path):
    """auto resolves as engine.precision says; channels_last auto follows bf16 on CPU, explicit values
    are honoured; the backbone forward runs in bf16 while the logits reach the loss in float32."""
    from sphereface_plus.engine.precision import resolve_precision

    auto = make_trainer(_cfg(tmp_path / "a", cache, 1, amp="auto"))
    assert auto.precision == resolve_precision("auto", "cpu")
    assert auto.channels_last == (auto.precision == "bf16")
    assert auto.scaler.is_enabled() is False
    bf16 = make_trainer(_cfg(tmp_path / "b", cache, 1, amp="bf16", extra=["model.channels_last=false"]))
    assert bf16.channels_last is False and bf16.memory_format == torch.contiguous_format
    if bf16.precision != "bf16":
        pytest.skip("this CPU has no bf16")
    seen = {}
    bf16.model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("emb", o.dtype))
    bf16.model.head.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o.logits.dtype))
    images, labels, _ = next(iter(bf16.make_loader(1)))
    bf16.train_step(images, labels)
    assert seen == {"emb": torch.bfloat16, "logits": torch.float32}
    assert make_trainer(_cfg(tmp_path / "c", cache, 1, amp="fp32", extra=["model.channels_last=true"])).channels_last


# the papers' values: ArcFace (Deng et al. 2019) s=64, m=0.5; CosFace (Wang et al. 2018) s=64, m=0.35;
# SphereFace A-Softmax m=4 with lambda = max(5, 1000 (1 + 0.12 t)^-1) (docs/theory.md#lambda-schedule)
PAPER_HEADS = {
    "arcface": {"s": 64.0, "m": 0.5},
    "cosface": {"s": 64.0, "m": 0.35},
    "a_softmax": {"m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0},
}


@pytest.mark.parametrize("name", sorted(PAPER_HEADS))
def test_each_head_keeps_its_own_defaults_and_config_yaml_records_them(name, cache, tmp_path):
    from sphereface_plus.cli import main

    out = tmp_path / name
    args = ["train", "--config", str(SMOKE), f"head.name={name}", *_overrides(out, cache, 1)]
    assert main(args) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())["head"]
    for key, value in PAPER_HEADS[name].items():
        assert written[key] == pytest.approx(value), (name, key, written)
    state = _load(out / "checkpoints" / "last.pt")
    assert state["config"]["head"] == written
    # and the head that trained used them
    trainer = make_trainer(load_config(str(SMOKE), [f"head.name={name}", *_overrides(tmp_path / "x", cache, 1)]))
    for key, value in PAPER_HEADS[name].items():
        assert getattr(trainer.head, key) == pytest.approx(value)


def test_a_head_setting_given_is_passed_and_the_others_keep_their_defaults(cache, tmp_path):
    cfg = load_config(str(SMOKE), ["head.name=arcface", "head.s=30", *_overrides(tmp_path, cache, 1)])
    trainer = make_trainer(cfg)
    assert (trainer.head.s, trainer.head.m) == (30.0, 0.5)
    # the values in force are the resolved config's (what config.yaml writes); the recipe is left as it was
    assert (trainer.cfg.head.s, trainer.cfg.head.m) == (30.0, 0.5)
    assert (cfg.head.s, cfg.head.m) == (30, None)
    with pytest.raises(ConfigError, match="a_softmax.*does not take.*Its settings: base, feature_norm"):
        load_config(str(SMOKE), ["head.easy_margin=true", *_overrides(tmp_path / "b", cache, 1)])


def test_resume_with_changed_settings_is_refused(reference, cache, tmp_path):
    train(_cfg(tmp_path, cache, 2))
    with pytest.raises(UsageError, match=r"settings changed.*optim\.lr: 0\.01 -> 0\.02"):
        train(_cfg(tmp_path, cache, 4, extra=["optim.lr=0.02"]), resume="auto")
    assert _load(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2  # nothing was overwritten


def test_caffe_gradient_and_caffe_among_train(cache, tmp_path):
    """The released recipes' settings wired: head.gradient=caffe reaches the head, mhe.mode=caffe_among the MHE term; the
    logged MHE of the first step is the Caffe InterClass AMONG value D of the unit rows (a float64 loop
    over inter_class_layer.cpp's forward), and a short run trains to the end with finite losses."""
    import numpy as np

    extra = ["head.gradient=caffe", "mhe.mode=caffe_among", "mhe.lambda_m=10"]
    trainer = make_trainer(_cfg(tmp_path / "step", cache, 3, extra=extra))
    assert trainer.head.gradient == "caffe" and trainer.model.mhe_mode == "caffe_among"
    images, labels, _ = next(iter(trainer.make_loader(1)))
    stats = trainer.train_step(images, labels)
    w = trainer.head.weight.detach().double()  # renormalised in place by the training forward, then stepped
    # D at the forward: recompute from the rows before the step (the initial state, renormalised)
    init = trainer.loop.start_state()["head"]["weight"].double()
    unit = (init / init.norm(dim=1, keepdim=True)).numpy()
    n = unit.shape[0]
    d = sum(float(np.sum((unit[i] - unit[int(y)]) ** 2)) for i in range(n) for y in labels) / n
    assert float(stats["mhe"]) == pytest.approx(d, rel=1e-5)
    assert not torch.equal(w, init)
    summary = train(_cfg(tmp_path / "run", cache, 3, extra=extra))
    assert summary["iteration"] == 3 and all(np.isfinite(h["loss"]) for h in summary["history"])
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["head"]["gradient"] == "caffe"
