"""``sphereface-plus train``: one readable training loop for SphereFace / SphereFace+ (SPEC sections 3-6).

    sphereface-plus train --config configs/sphereface20_casia.yaml data.root=casia-112x96
    torchrun --nproc_per_node=2 -m sphereface_plus.train --config configs/sphereface20_casia.yaml ...
    sphereface-plus train --config configs/cpu_smoke.yaml out_dir=runs/smoke --resume auto

From Python: ``train(cfg, resume=None)`` (``cfg`` a :class:`~sphereface_plus.config.Config`, a dict
or a YAML path) runs the whole loop and returns a dict of final statistics and paths; the
:class:`Trainer` exposes single steps (used by the tests and ``bench/train_throughput.py``).

Loss: ``CE(head logits) + mhe.lambda_m * classifier_mhe(head.weight, labels)`` (SphereFace+, SPEC
section 5), both terms and the A-Softmax lambda logged separately. Each step: forward under autocast
(CUDA only; the head and the losses always in float32, since cos(m theta) polynomials lose too much in
16 bits), backward, optional gradient clipping, SGD step, one scheduler step. A non-finite loss skips
the update; ``train.nan_patience`` of them in a row roll the run back to the last checkpoint with a
new data order (A-Softmax is known to diverge now and then; this replaces "kill and restart by hand").
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sphereface_plus.config import Config, config_to_yaml, load_config
from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.dist import DistInfo, all_reduce_sum, cleanup_distributed, resolve_device, setup_distributed
from sphereface_plus.engine.optim import build_optimizer, build_scheduler
from sphereface_plus.engine.sampler import ResumableSampler
from sphereface_plus.utils import atomic_write_json, atomic_write_text, progress, safe_torch_load

logger = logging.getLogger(__name__)

HELP = "train a SphereFace / SphereFace+ model from a YAML recipe (key=value overrides)"
DESCRIPTION = __doc__

__all__ = ["HELP", "add_arguments", "run", "train", "Trainer", "FaceTrainModel", "head_kwargs"]


def head_kwargs(head_cfg) -> Dict[str, Any]:
    """The constructor arguments of each registered head, taken from the ``head`` section."""
    if head_cfg.name == "a_softmax":
        return dict(m=head_cfg.m, base=head_cfg.base, gamma=head_cfg.gamma, power=head_cfg.power,
                    lambda_min=head_cfg.lambda_min)
    if head_cfg.name in ("cosface", "arcface"):
        return dict(s=head_cfg.scale, m=head_cfg.margin)
    return {}


class FaceTrainModel(nn.Module):
    """Backbone + classifier head + the SphereFace+ MHE term, as one module (what DDP wraps).

    ``forward(images, labels) -> (logits B x C, mhe 0-dim)``. The MHE term is computed inside the
    forward so that DDP sees every use of ``head.weight`` in one graph.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, lambda_m: float = 0.0, mhe_power: str = "2",
                 mhe_mode: str = "batch_vs_all"):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.lambda_m, self.mhe_power, self.mhe_mode = float(lambda_m), str(mhe_power), mhe_mode

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        emb = self.backbone(images)
        with torch.autocast(images.device.type, enabled=False):
            logits = self.head(emb.float(), labels)
            if self.lambda_m > 0:
                from sphereface_plus.mhe import classifier_mhe

                # no NaN check (a host sync every step): a non-finite weight gives a non-finite loss,
                # which the trainer's guard skips and, if it persists, rolls back
                mhe = classifier_mhe(self.head.weight.float(), labels, power=self.mhe_power, mode=self.mhe_mode,
                                     check_finite=False)
            else:
                mhe = logits.new_zeros(())
        return logits, mhe


class Trainer:
    """Everything a run holds: model, optimiser, schedule, scaler, data order, counters; ``fit()`` runs it."""

    def __init__(self, cfg: Config, dist: Optional[DistInfo] = None, dataset=None):
        from sphereface_plus.heads import create_head
        from sphereface_plus.models import create_backbone

        self.cfg = cfg
        self.dist = dist or DistInfo(device=resolve_device(cfg.train.device))
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        self.dataset = dataset if dataset is not None else self._build_dataset()
        _seed_everything(cfg.train.seed)  # after the data: initial weights depend on the seed alone
        backbone = create_backbone(cfg.model.backbone, input_size=tuple(cfg.model.input_size),
                                   embedding_dim=cfg.model.embedding_dim)
        head = create_head(cfg.head.name, in_features=cfg.model.embedding_dim,
                           num_classes=self.dataset.num_classes, **head_kwargs(cfg.head))
        self.model = FaceTrainModel(backbone, head, cfg.mhe.lambda_m, cfg.mhe.power, cfg.mhe.mode).to(self.device)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        if cfg.train.init_from:
            self._init_from(cfg.train.init_from)
        self.eval_pairs, self.eval_root = cfg.eval.pairs, cfg.eval.root
        if cfg.eval.pairs == "auto":  # the synthetic set's own person-disjoint pairs, on its aligned crops
            if cfg.data.source != "synthetic":
                raise ValueError("eval.pairs=auto needs data.source=synthetic; give eval.pairs=<pairs.txt> eval.root=<crops>")
            cache = _synthetic_cache(cfg)
            self.eval_pairs, self.eval_root = str(cache / "raw" / "pairs.txt"), str(cache / "aligned")
        self.optimizer = build_optimizer([self.model], cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.amp_dtype = None
        if self.device.type == "cuda" and cfg.train.amp != "off":
            self.amp_dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
        elif cfg.train.amp != "off":
            logger.info("train.amp=%s ignored on %s: training in float32", cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.net: nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.iteration = 0
        self.rollbacks = 0
        self.bad_images = 0
        self.skipped_steps = 0
        self.threshold: Optional[float] = None  # cosine threshold of the latest verification
        self._streak = 0
        self._initial_state = ckpt.serialize(self.state_dict())

    # ------------------------------------------------------------------ set-up helpers
    def _build_dataset(self):
        from data_prep.datasets import build_train_dataset

        # rank 0 generates / indexes first (the synthetic set is written once), the others then read it
        if self.dist.distributed and not self.dist.is_main:
            torch.distributed.barrier()
        ds = build_train_dataset(self.cfg.data, self.cfg.model.input_size, _synthetic_cache(self.cfg))
        if self.dist.distributed and self.dist.is_main:
            torch.distributed.barrier()
        logger.info("training set: %d images of %d identities (%s)", len(ds), ds.num_classes, self.cfg.data.source)
        return ds

    def _init_from(self, path: str) -> None:
        state = ckpt.load_checkpoint(path)
        self.model.backbone.load_state_dict(state["model"])
        self.model.head.load_state_dict(state["head"])
        logger.info("initialised model and head from %s (iteration %s)", path, state.get("iteration"))

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def current_lambda(self) -> float:
        lam = getattr(self.head, "current_lambda", float("nan"))
        return float(lam() if callable(lam) else lam)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        state = {
            "model": self.model.backbone.state_dict(),
            "head": self.model.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng(),
            "sampler": {"seed": self.cfg.train.seed, "shuffle_round": self.rollbacks,
                        "position": self.iteration * self.cfg.train.batch_size},
            "iteration": self.iteration,
            "rollbacks": self.rollbacks,
            "bad_images": self.bad_images,
            "skipped_steps": self.skipped_steps,
            "config": self.cfg.to_dict(),
        }
        if self.threshold is not None:  # docs/interfaces.md: used by `sphereface-plus compare`
            state["threshold"] = self.threshold
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.backbone.load_state_dict(state["model"])
        self.model.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        self.iteration = int(state["iteration"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.bad_images = int(state.get("bad_images", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.threshold = float(state["threshold"]) if state.get("threshold") is not None else None

    def resume(self, resume: str) -> Optional[Path]:
        """``auto``: the newest checkpoint of ``out_dir`` (a fresh start when there is none); else a path."""
        path = ckpt.find_resume_checkpoint(self.out_dir) if resume == "auto" else Path(resume)
        if path is None:
            logger.info("--resume auto: no checkpoint in %s, starting from scratch", ckpt.checkpoint_dir(self.out_dir))
            return None
        state = ckpt.load_checkpoint(path, map_location=self.device)
        changed = _config_changes(state.get("config", {}), self.cfg.to_dict())
        if changed:
            logger.warning("resuming with a config that differs from the checkpoint's: %s", ", ".join(changed))
        self.load_state_dict(state)
        logger.info("resumed from %s at iteration %d (lambda %.4g)", path, self.iteration, self.current_lambda())
        return path

    def save(self) -> Optional[Path]:
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.state_dict(), self.out_dir, self.cfg.checkpoint.every, self.cfg.checkpoint.keep)
        if self.dist.distributed:
            torch.distributed.barrier()  # nobody may read (rollback) a half-written file
        return path

    def rollback(self) -> None:
        """Restore the newest checkpoint (or the start state) and change the data order."""
        path = ckpt.find_resume_checkpoint(self.out_dir)
        if path:
            state = ckpt.load_checkpoint(path, self.device)
        else:  # no checkpoint yet: the state captured at start-up
            state = safe_torch_load(io.BytesIO(self._initial_state), map_location=self.device)
        failed_at, rollbacks = self.iteration, self.rollbacks + 1
        if rollbacks > self.cfg.train.max_rollbacks:
            raise RuntimeError(
                f"training diverged: {self.cfg.train.nan_patience} non-finite losses in a row at iteration {failed_at} "
                f"after {self.rollbacks} rollbacks; lower optim.lr, add optim.warmup_iters or optim.clip_grad_norm"
            )
        self.load_state_dict(state)
        self.rollbacks = rollbacks
        self._streak = 0
        logger.warning("%d non-finite losses in a row at iteration %d: rolled back to %s (iteration %d), "
                       "rollback %d of at most %d, new data order", self.cfg.train.nan_patience, failed_at,
                       path or "the start state", self.iteration, rollbacks, self.cfg.train.max_rollbacks)

    # ------------------------------------------------------------------ one step
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        """Forward, backward and (when the loss is finite) an SGD step; always advances one iteration."""
        self.net.train()
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits, mhe = self.net(images, labels)
        ce = F.cross_entropy(logits, labels)
        loss = ce + self.cfg.mhe.lambda_m * mhe
        self.scaler.scale(loss).backward()
        finite = torch.isfinite(loss.detach()).float()
        if self.dist.distributed:  # every rank must take the same branch
            finite = all_reduce_sum(finite) / self.dist.world_size
        finite = bool(finite.item() == 1.0)
        if finite:
            if self.cfg.optim.clip_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._streak = 0
        else:
            self.skipped_steps += 1
            self._streak += 1
            logger.warning("non-finite loss at iteration %d (CE %s, MHE %s): step skipped",
                           self.iteration, ce.item(), mhe.item())
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iteration += 1
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
        stats = {"loss": loss.detach(), "ce": ce.detach(), "mhe": mhe.detach().float(), "correct": correct,
                 "count": labels.numel(), "finite": finite, "rolled_back": False}
        if self._streak >= self.cfg.train.nan_patience:
            self.rollback()
            stats["rolled_back"] = True
        return stats

    # ------------------------------------------------------------------ the loop
    def make_loader(self, total_iters: int) -> torch.utils.data.DataLoader:
        sampler = ResumableSampler(len(self.dataset), self.cfg.train.batch_size, total_iters, self.dist.rank,
                                   self.dist.world_size, self.cfg.train.seed, self.cfg.data.flip,
                                   start_iter=self.iteration, shuffle_round=self.rollbacks)
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None)

    def fit(self) -> Dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        total = cfg.train.iterations
        writer = _tensorboard(self.out_dir / "tb") if (main and cfg.train.tensorboard) else None
        history: List[Dict[str, float]] = []
        window = _Window(self.device)
        bar = progress(total=total, initial=self.iteration, desc="train", unit="it", disable=None if main else True)
        last_report, eval_report, t_start, it_start = None, None, time.perf_counter(), self.iteration
        while self.iteration < total:
            for images, labels, bad in self.make_loader(total):
                self.bad_images += int(bad.sum())
                stats = self.train_step(images, labels)
                bar.update(1)
                if stats["rolled_back"]:
                    window.reset()
                    bar.n = self.iteration
                    break  # restart the loader at the restored iteration with the new data order
                window.add(stats)
                it = self.iteration
                if it % cfg.train.log_every == 0 or it == total:
                    last_report = window.report(self.dist, cfg.train.batch_size)
                    last_report.update(iteration=it, lr=self.optimizer.param_groups[0]["lr"], **{"lambda": self.current_lambda()})
                    history.append(last_report)
                    bar.set_postfix(loss=f"{last_report['loss']:.3f}", acc=f"{last_report['acc']:.3f}",
                                    lam=f"{last_report['lambda']:.3g}", mhe=f"{last_report['mhe']:.4f}",
                                    lr=f"{last_report['lr']:.2g}", ips=f"{last_report['images_per_s']:.0f}")
                    if writer:
                        for k in ("loss", "ce", "mhe", "acc", "lambda", "lr", "images_per_s"):
                            writer.add_scalar(f"train/{k}", last_report[k], it)
                    if bar.disable and main:  # no bar on screen: a log line instead
                        logger.info("it %d/%d loss %.4f ce %.4f mhe %.4f acc %.3f lambda %.4g lr %.3g %.0f img/s", it,
                                    total, last_report["loss"], last_report["ce"], last_report["mhe"],
                                    last_report["acc"], last_report["lambda"], last_report["lr"],
                                    last_report["images_per_s"])
                t_pause = time.perf_counter()
                if self.eval_pairs and ((cfg.eval.every and it % cfg.eval.every == 0) or it == total):
                    eval_report = self.verify()  # before the save: the checkpoint carries its threshold
                    if writer and eval_report:
                        writer.add_scalar("eval/mean_accuracy", eval_report["mean_accuracy"], it)
                if it % cfg.checkpoint.every == 0 or it == total:
                    self.save()
                window.t0 += time.perf_counter() - t_pause  # images/s counts training time only
        bar.close()
        if self.iteration == it_start:  # nothing to do (already finished): make sure last.pt exists
            self.save()
        bad_total = self.bad_images
        if self.dist.distributed:  # each rank read its own share of the images
            bad_total = int(all_reduce_sum(torch.tensor(self.bad_images, device=self.device)).item())
        elapsed = time.perf_counter() - t_start
        if writer:
            writer.close()
        summary = {
            "out_dir": str(self.out_dir), "checkpoint": str(ckpt.checkpoint_dir(self.out_dir) / "last.pt"),
            "iteration": self.iteration, "history": history, "final": last_report, "eval": _plain(eval_report),
            "bad_images": bad_total, "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
            "lambda": self.current_lambda(), "num_classes": self.dataset.num_classes,
            "images_per_s": (self.iteration - it_start) * cfg.train.batch_size / max(elapsed, 1e-9),
        }
        if main:
            atomic_write_json(self.out_dir / "summary.json", summary)
            logger.info("done: %d iterations, %d unreadable images replaced, %d steps skipped, %d rollbacks",
                        self.iteration, bad_total, self.skipped_steps, self.rollbacks)
        return summary

    def verify(self) -> Optional[Dict[str, Any]]:
        """LFW-style 10-fold verification of the backbone on ``eval.pairs`` (rank 0; the others wait)."""
        report = None
        if self.dist.is_main:
            from eval.features import extract_features
            from eval.lfw import evaluate_features, parse_pairs

            pairs = parse_pairs(self.eval_pairs)
            paths = sorted({p for pair in pairs for p in (pair.path1, pair.path2)})
            self.model.eval()
            feats = extract_features(self.model.backbone, self.eval_root, paths, batch_size=self.cfg.eval.batch_size,
                                     flip=True, device=self.device, num_workers=0)
            report = evaluate_features(paths, feats, pairs)
            # `compare` scores a single pair by plain cosine (no dataset mean to subtract), so the
            # threshold stored with the model is the one chosen on plain-cosine scores
            self.threshold = float(evaluate_features(paths, feats, pairs, mean_sub=False)["threshold"])
            report["compare_threshold"] = self.threshold
            logger.info("verification at iteration %d: %.4f +- %.4f", self.iteration, report["mean_accuracy"],
                        report["std_accuracy"])
            atomic_write_json(self.out_dir / "eval" / f"verify_{self.iteration:07d}.json", _plain(report))
        if self.dist.distributed:
            torch.distributed.barrier()
        return report


class _Window:
    """Sums of the step statistics since the last log line, kept on the device (no sync per step)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, ce, mhe, correct, count
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, s):
        if s["finite"]:
            n = float(s["count"])
            vals = torch.stack([s["loss"].double() * n, s["ce"].double() * n, s["mhe"].double() * n,
                                s["correct"].double(), torch.tensor(n, dtype=torch.float64, device=self.device)])
            self.sums += vals
        self.steps += 1

    def report(self, dist: DistInfo, global_batch: int) -> Dict[str, float]:
        sums = all_reduce_sum(self.sums) if dist.distributed else self.sums
        loss, ce, mhe, correct, count = sums.tolist()
        dt = time.perf_counter() - self.t0
        out = {"loss": loss / count if count else math.nan, "ce": ce / count if count else math.nan,
               "mhe": mhe / count if count else math.nan, "acc": correct / count if count else math.nan,
               "images_per_s": self.steps * global_batch / max(dt, 1e-9)}
        self.reset()
        return out


def _synthetic_cache(cfg: Config) -> Path:
    """Where the synthetic identities are generated and aligned (``data.synthetic.cache_dir``)."""
    return Path(cfg.data.synthetic.cache_dir) if cfg.data.synthetic.cache_dir else Path(cfg.out_dir) / "synthetic"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
        logger.warning("tensorboard is not importable: no TensorBoard scalars")
        return None
    return SummaryWriter(str(folder))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, prefix + k + ".")
        elif a != b and prefix + k not in ("train.iterations", "out_dir"):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------------- entry points
def train(cfg: Union[Config, Dict[str, Any], str, Path], resume: Optional[str] = None, overrides=()) -> Dict[str, Any]:
    """Run a training job from Python; returns the summary dict (also written to ``out_dir/summary.json``).

    ``cfg``: a Config, a nested dict, or a YAML path (``overrides`` are ``key=value`` strings applied on
    top). ``resume``: None, ``"auto"`` or a checkpoint path. Works under torchrun as well.

    The summary: ``out_dir``, ``checkpoint`` (path of ``last.pt``), ``iteration``, ``final`` (the last
    logged ``loss``/``ce``/``mhe``/``acc``/``lambda``/``lr``/``images_per_s``), ``history`` (one such
    dict per ``train.log_every`` iterations), ``eval`` (the last verification report of
    ``eval.lfw.evaluate_features`` or None), ``bad_images``, ``skipped_steps``, ``rollbacks``,
    ``lambda``, ``num_classes``, ``images_per_s``.
    """
    if isinstance(cfg, (str, Path)):
        cfg = load_config(str(cfg), overrides)
    elif isinstance(cfg, dict):
        cfg = Config.from_dict(cfg)
    dist = setup_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, dist)
        if dist.is_main:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(cfg.out_dir) / "config.yaml", config_to_yaml(cfg))
        if resume:
            trainer.resume(resume)
        return trainer.fit()
    finally:
        cleanup_distributed()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); omitted: the built-in defaults")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue a run: 'auto' = the newest checkpoint in <out_dir>/checkpoints, or a file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.batch_size=256 optim.milestones=[10,20]")


def run(args: argparse.Namespace) -> int:
    from sphereface_plus.config import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    summary = train(cfg, resume=args.resume)
    from sphereface_plus.utils import is_rank0

    if summary["final"] and is_rank0():
        f = summary["final"]
        verified = f", verification {summary['eval']['mean_accuracy']:.4f}" if summary["eval"] else ""
        print(f"trained {summary['iteration']} iterations: loss {f['loss']:.4f}, acc {f['acc']:.4f}, "
              f"lambda {summary['lambda']:.4g}{verified}; checkpoint {summary['checkpoint']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m sphereface_plus.train`` / ``torchrun -m sphereface_plus.train``."""
    from sphereface_plus.utils import setup_logging

    parser = argparse.ArgumentParser(prog="sphereface_plus.train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    setup_logging()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
