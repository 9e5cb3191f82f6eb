"""The prepared GPU check, run by ``bench/device_check.sh``: correctness on CUDA, then figures.

    PYTHONPATH=. python bench/device_check.py [--size full|ci] [--out bench/results] [--budget-s 420]

On CUDA (``--size full``, the default there):

1. checks (each a ratio or a difference against a float64 CPU reference computed here): every registered
   head's logits and gradients, the SphereFace+ MHE term in each classifier mode, the sharded classifier
   with NCCL at world size 1 against the replicated head over three trainer steps, and AMP trainer steps in
   bf16 and in fp16 with its GradScaler (finite, the scale recorded);
2. training throughput of sphere20 / sphere64 / iresnet100 (whichever are registered; a missing one is
   skipped with a line saying so) in bf16 channels_last, eager and ``torch.compile``\\ d (compile rows only
   while the time budget lasts), each as a ratio against the same backbone's eager step, plus sphere20 in
   float32 as the precision baseline, with the peak GPU memory of each;
3. the MHE overhead: the sphere20 step with ``mhe.lambda_m=1`` against ``0`` at CASIA's 10,572 classes, and
   the sphere20 step with the toolkit's PReLU backward against torch's (the CUDA default is torch's);
4. the input pipeline (``bench/input_pipeline.py``: per-worker rate, DataLoader with 1, 4 and all cores)
   and the batched nvJPEG decode (:func:`data_prep.jpeg.decode_batch_cuda`) against one CPU worker.

On a machine without CUDA it runs the same code on the CPU at the size given (``--size ci``: tiny batches,
one step, no compile, a 64-image pipeline), which is what the test suite runs. Writes
``device_check.json`` and ``device_check.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import RESULTS, load_average, machine, write_json, write_report  # noqa: E402
from sphereface_plus.face.config import load_config  # noqa: E402
from sphereface_plus.engine.dist import DistInfo  # noqa: E402
from sphereface_plus.models import list_backbones  # noqa: E402
from sphereface_plus.face.trainer import FaceTrainer  # noqa: E402

SIZES = {  # batch, steps per round, rounds, classes, mhe classes
    "full": dict(batch=256, steps=10, rounds=2, classes=10572, pipeline_images=2048),
    "ci": dict(batch=2, steps=1, rounds=1, classes=50, pipeline_images=64),
}
INPUT = {"iresnet100": (112, 112)}


class _Faces:
    def __init__(self, num_classes, input_size=(112, 96)):
        self.num_classes, self.input_size = num_classes, tuple(input_size)

    def __len__(self):
        return self.num_classes


def make_trainer(device, backbone="sphere20", batch=16, classes=100, amp="bf16", channels_last=True,
                 compile_=False, lambda_m=1.0, parallel="replicated", dist=None, out="/tmp/sfp_device_check"):
    cfg = load_config(None, [
        f"model.backbone={backbone}", f"model.channels_last={str(channels_last).lower()}", "head.name=a_softmax",
        "head.base=5", "head.lambda_min=5", f"mhe.lambda_m={lambda_m}", "mhe.power=2", "optim.lr=0.01",
        f"train.batch_size={batch}", f"train.precision={amp}", f"train.compile={str(compile_).lower()}",
        "train.tensorboard=false", f"train.device={device}", f"out_dir={out}", f"head.parallel={parallel}",
        "data.source=synthetic"])
    return FaceTrainer.from_config(cfg, _Faces(classes, INPUT.get(backbone, (112, 96))), dist or DistInfo(device=torch.device(device)))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _batch(trainer, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = trainer.cfg.model.input_size
    x = torch.randn(batch, 3, h, w, generator=g).to(device)
    y = torch.randint(0, trainer.dataset.num_classes, (batch,), generator=g).to(device)
    return x, y


def _peak_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device):
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS (KiB on Linux)


# ------------------------------------------------------------------------------------------ checks
def check_heads(device):
    """Every registered head on ``device`` (float32) against the same head in float64 on the CPU."""
    from sphereface_plus.heads import create_head, list_heads

    rows = []
    for name in list_heads():
        torch.manual_seed(0)
        ref = create_head(name, in_features=32, num_classes=40).double()
        dev = create_head(name, in_features=32, num_classes=40).to(device)
        dev.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        emb = torch.randn(8, 32, dtype=torch.float64) * 3
        labels = torch.randint(0, 40, (8,))
        e1, e2 = emb.clone().requires_grad_(), emb.float().to(device).requires_grad_()
        # the head owns its loss (HeadOutput): compare the loss, the logits and the embeddings' gradient
        o1, o2 = ref(e1, labels), dev(e2, labels.to(device))
        o1.loss.backward()
        o2.loss.backward()
        err = max(abs(o2.loss.item() - o1.loss.item()) / (1 + abs(o1.loss.item())),
                  (o2.logits.double().cpu() - o1.logits).abs().max().item() / (1 + o1.logits.abs().max().item()),
                  (e2.grad.double().cpu() - e1.grad).abs().max().item() / (1e-12 + e1.grad.abs().max().item()))
        rows.append({"check": f"head {name}", "max_rel_err": err, "ok": err < 1e-4})
    return rows


def check_mhe(device):
    from sphereface_plus.mhe import CLASSIFIER_MODES, classifier_mhe

    rows = []
    for mode in CLASSIFIER_MODES:
        w = torch.randn(60, 16, dtype=torch.float64)
        labels = torch.randint(0, 60, (12,))
        w1, w2 = w.clone().requires_grad_(), w.float().to(device).requires_grad_()
        try:
            v1 = classifier_mhe(w1, labels, mode=mode)
            v2 = classifier_mhe(w2, labels.to(device), mode=mode)
        except Exception as exc:  # noqa: BLE001 - a mode with other required arguments
            rows.append({"check": f"mhe {mode}", "skipped": f"{type(exc).__name__}: {exc}"[:200], "ok": True})
            continue
        v1.backward()
        v2.backward()
        err = max(abs(v2.item() - v1.item()) / (1 + abs(v1.item())),
                  (w2.grad.double().cpu() - w1.grad).abs().max().item() / (1e-12 + w1.grad.abs().max().item()))
        rows.append({"check": f"mhe {mode}", "max_rel_err": err, "ok": err < 1e-3})
    return rows


def check_sharded_nccl(device):
    """The sharded classifier on one NCCL process against the replicated head, three trainer steps."""
    import torch.distributed as dist

    if torch.device(device).type != "cuda" or not dist.is_nccl_available():
        return [{"check": "sharded head, NCCL world size 1", "skipped": "no CUDA/NCCL here", "ok": True}]
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            info = DistInfo(rank=0, world_size=1, device=torch.device(device))
            sharded = make_trainer(device, batch=8, classes=100, amp="fp32", parallel="sharded", dist=info,
                                   out=f"{tmp}/s")
            replicated = make_trainer(device, batch=8, classes=100, amp="fp32", out=f"{tmp}/r")
            replicated.load_state_dict(sharded.state_dict())
            diffs = []
            for step in range(3):
                x, y = _batch(sharded, 8, device, seed=step)
                a = float(sharded.train_step(x, y)["loss"])
                b = float(replicated.train_step(x, y)["loss"])
                diffs.append(abs(a - b))
        finally:
            dist.destroy_process_group()
    return [{"check": "sharded head, NCCL world size 1", "max_abs_loss_diff": max(diffs), "ok": max(diffs) < 1e-3}]


def check_amp(device, batch=8):
    rows = []
    amps = ["bf16", "fp16"] if torch.device(device).type == "cuda" else ["bf16"]
    for amp in amps:
        trainer = make_trainer(device, batch=batch, classes=100, amp=amp)
        losses = []
        for step in range(3 if batch > 2 else 2):
            x, y = _batch(trainer, batch, device, seed=0)
            stats = trainer.train_step(x, y)
            losses.append(float(stats["loss"]))
        row = {"check": f"AMP {amp} trainer steps", "precision": trainer.precision, "losses": losses,
               "ok": all(math.isfinite(v) for v in losses)}
        if amp == "fp16":
            row["grad_scale"] = float(trainer.scaler.get_scale())
            row["ok"] = row["ok"] and row["grad_scale"] > 0
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ figures
def step_rate(trainer, batch, device, steps, rounds):
    """Images/s of ``trainer.train_step`` (best of ``rounds`` rounds of ``steps`` steps, after 2 warm-up steps)."""
    x, y = _batch(trainer, batch, device)
    for _ in range(2 if steps > 1 else 1):
        trainer.train_step(x, y)
    _sync(device)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(x, y)
        _sync(device)
        best = max(best, batch * steps / (time.perf_counter() - t0))
    return best


def throughput(device, size, deadline, notes):
    p = SIZES[size]
    cuda = torch.device(device).type == "cuda"
    amp = "bf16"
    rows = []
    backbones = []
    for name in ("sphere20", "sphere64", "iresnet100"):
        if name in list_backbones():
            backbones.append(name)
        else:
            notes.append(f"{name}: not registered in this checkout, skipped")
            print(f"skip {name}: not registered in this checkout", flush=True)
    if size == "ci":
        backbones = backbones[:1]
    variants = [("sphere20", "fp32", False)] + [(b, amp, False) for b in backbones]
    if cuda:
        variants += [(b, amp, True) for b in backbones]
    else:
        notes.append("compile rows run on CUDA only here (CPU: bench/compile_speed.py)")
    for backbone, prec, comp in variants:
        if comp and time.time() > deadline - 120:
            notes.append(f"{backbone} compiled: skipped, under 120 s of the time budget left")
            continue
        try:
            _peak_reset(device)
            t0 = time.time()
            trainer = make_trainer(device, backbone, p["batch"], p["classes"], amp=prec, channels_last=True,
                                   compile_=comp)
            if trainer.precision != ("fp32" if prec == "off" else prec):
                notes.append(f"{backbone} {prec}: runs as {trainer.precision} on this device, row skipped")
                continue
            rate = step_rate(trainer, p["batch"], device, p["steps"], p["rounds"])
            name = f"{backbone} {prec} channels_last {'compiled' if comp else 'eager'}"
            rows.append({"name": name, "backbone": backbone, "precision": trainer.precision, "compiled": comp,
                         "batch": p["batch"], "images_per_s": round(rate, 2), "peak_mib": _peak_mib(device),
                         "wall_s": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
            del trainer
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            notes.append(f"{backbone} {prec} {'compiled' if comp else 'eager'} failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
            traceback.print_exc()
    by = {r["name"]: r for r in rows}
    for r in rows:
        base = by.get(f"{r['backbone']} {amp} channels_last eager") if r["compiled"] else \
            by.get("sphere20 fp32 channels_last eager")
        if base:
            r["vs"] = base["name"]
            r["ratio"] = round(r["images_per_s"] / base["images_per_s"], 3)
    return rows


def prelu_backward_rows(device, size):
    """The sphere20 bf16 step with the PReLU backward of torch (``fast_backward=False``) and of the toolkit
    (``True``), alternating: on a CPU the toolkit's is the default, on CUDA this row decides whether it should be.
    """
    from sphereface_plus.models.layers import PReLU

    p = SIZES[size]
    trainer = make_trainer(device, "sphere20", p["batch"], p["classes"])
    acts = [m for m in trainer.model.modules() if isinstance(m, PReLU)]
    rates = {"torch": 0.0, "toolkit": 0.0}
    for _ in range(max(2, p["rounds"]) if size == "full" else 1):
        for name in rates:
            for m in acts:
                m.fast_backward = name == "toolkit"
            rates[name] = max(rates[name], step_rate(trainer, p["batch"], device, p["steps"], 1))
    return {"backbone": "sphere20", "precision": trainer.precision, "batch": p["batch"],
            "images_per_s": {k: round(v, 2) for k, v in rates.items()},
            "step_time_ratio_toolkit_vs_torch": round(rates["torch"] / rates["toolkit"], 3)}


def mhe_overhead(device, size):
    p = SIZES[size]
    with_mhe = make_trainer(device, "sphere20", p["batch"], p["classes"], lambda_m=1.0)
    without = make_trainer(device, "sphere20", p["batch"], p["classes"], lambda_m=0.0)
    best = {"with": 0.0, "without": 0.0}
    for _ in range(max(2, p["rounds"]) if size == "full" else 1):  # alternating
        best["without"] = max(best["without"], step_rate(without, p["batch"], device, p["steps"], 1))
        best["with"] = max(best["with"], step_rate(with_mhe, p["batch"], device, p["steps"], 1))
    return {"classes": p["classes"], "batch": p["batch"], "images_per_s_without_mhe": round(best["without"], 2),
            "images_per_s_with_mhe": round(best["with"], 2),
            "step_time_ratio_with_vs_without": round(best["without"] / best["with"], 3)}


def pipeline(device, size, out_dir):
    from bench import input_pipeline as ip

    p = SIZES[size]
    workers = "0" if size == "ci" else f"1,4,{os.cpu_count() or 1}"
    argv = sys.argv
    sys.argv = ["input_pipeline.py", "--images", str(p["pipeline_images"]), "--rounds", "2" if size == "ci" else "3",
                "--workers", workers, "--out", str(Path(out_dir) / "device_check_input_pipeline.json")]
    try:
        ip.main()
    finally:
        sys.argv = argv
    import json

    result = json.loads((Path(out_dir) / "device_check_input_pipeline.json").read_text())
    if torch.device(device).type == "cuda":
        result["nvjpeg"] = nvjpeg_rate(device, p["batch"])
    return result


def nvjpeg_rate(device, batch):
    """Batched nvJPEG decode + flip + normalise on the GPU against one CPU worker's decode of the same crops."""
    import cv2
    import numpy as np

    from data_prep.datasets import decode_crop, preprocess
    from data_prep.jpeg import decode_batch_cuda

    rng = np.random.default_rng(0)
    datas = [cv2.imencode(".jpg", cv2.resize(rng.integers(0, 256, (14, 12, 3), dtype=np.uint8), (96, 112)),
                          [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for _ in range(batch)]
    flips = [bool(i & 1) for i in range(batch)]
    decode_batch_cuda(datas, flips, (112, 96), device)
    _sync(device)
    best_gpu = best_cpu = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        decode_batch_cuda(datas, flips, (112, 96), device)
        _sync(device)
        best_gpu = min(best_gpu, time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.stack([preprocess(decode_crop(d), (112, 96), f) for d, f in zip(datas, flips)])
        best_cpu = min(best_cpu, time.perf_counter() - t0)
    return {"batch": batch, "gpu_images_per_s": round(batch / best_gpu, 1),
            "one_cpu_worker_images_per_s": round(batch / best_cpu, 1), "ratio": round(best_cpu / best_gpu, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="full on CUDA, ci elsewhere")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting compile rows past this")
    args = ap.parse_args()
    t_start = time.time()
    deadline = t_start + args.budget_s
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device.startswith("cuda") else "ci")
    if not device.startswith("cuda"):
        torch.set_num_threads(1 if size == "ci" else min(2, os.cpu_count() or 1))
    else:
        torch.backends.cudnn.benchmark = True
    load0 = load_average()
    notes = []
    checks = check_heads(device) + check_mhe(device) + check_sharded_nccl(device) + check_amp(device, 8 if size == "full" else 2)
    for c in checks:
        print(c, flush=True)
    rows = throughput(device, size, deadline, notes)
    mhe = mhe_overhead(device, size)
    print(mhe, flush=True)
    prelu = prelu_backward_rows(device, size)
    print(prelu, flush=True)
    pipe = pipeline(device, size, args.out)
    payload = {"bench": "device_check", "device": torch.device(device).type, "size": size, "machine": machine(),
               "load_average_start": load0, "load_average_end": load_average(),
               "wall_s": round(time.time() - t_start, 1), "checks": checks,
               "checks_ok": all(c.get("ok") for c in checks), "throughput": rows, "mhe_overhead": mhe,
               "prelu_backward": prelu, "input_pipeline": pipe, "notes": notes}
    out = Path(args.out)
    suffix = "" if (size == "full" or out.resolve() != RESULTS.resolve()) else "_cpu_ci"
    path = write_json(f"device_check{suffix}.json", payload, out)
    lines = [f"# Device check ({payload['device']}, size {size})", "",
             f"`bash bench/device_check.sh`: {payload['machine'].get('gpu', payload['machine']['cpu'])}, torch "
             f"{torch.__version__}, {payload['wall_s']} s. Checks: "
             f"{'all passed' if payload['checks_ok'] else 'FAILURES: ' + ', '.join(c['check'] for c in checks if not c.get('ok'))}.",
             "", "| training step | images/s | vs | ratio | peak MiB |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} (batch {r['batch']}) | {r['images_per_s']:.1f} | {r.get('vs', '')} | "
                     f"{r.get('ratio', '')} | {r['peak_mib']} |")
    lines += ["", f"MHE overhead ({mhe['classes']} classes, batch {mhe['batch']}): step time with / without "
              f"{mhe['step_time_ratio_with_vs_without']}x.",
              f"PReLU backward (sphere20 {prelu['precision']}, batch {prelu['batch']}): step time with the toolkit's "
              f"/ torch's {prelu['step_time_ratio_toolkit_vs_torch']}x.", ""]
    best_pw = max(pipe["per_worker"].values(), key=lambda v: v["images_per_s"])
    lines.append("Input pipeline: per worker " + ", ".join(f"{k} {v['images_per_s']:.0f}/s"
                                                           for k, v in pipe["per_worker"].items())
                 + f" (best {best_pw['images_per_s']:.0f}/s).")
    if "nvjpeg" in pipe:
        nv = pipe["nvjpeg"]
        lines.append(f"nvJPEG batched decode: {nv['gpu_images_per_s']:.0f} images/s vs one CPU worker "
                     f"{nv['one_cpu_worker_images_per_s']:.0f} ({nv['ratio']}x).")
    lines += [f"- {n}" for n in notes]
    write_report(path.with_suffix(".md"), lines)
    return 0 if payload["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
