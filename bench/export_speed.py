"""Embedding speed of an exported model against PyTorch, in the same process on the same batches.

Builds a seeded backbone (default sphere20, 112x96), exports it to ONNX and TorchScript with
``eval.export.export_model`` (which checks it on the synthetic crops), then times the forward pass
of a ``--batch``-image batch: PyTorch eager under ``torch.inference_mode``, onnxruntime (CPU
provider) and the TorchScript module, each with ``--threads`` threads. Prints a markdown table
(images per second, ratio to PyTorch, the export check differences) and writes it to
bench/results/export.md.

    .venv/bin/python bench/export_speed.py [--backbone sphere20] [--batch 32] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="sphere20")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "export.md"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from eval.export import export_model
    from eval.onnx_model import OnnxModel
    from sphereface_plus import create_backbone

    torch.manual_seed(0)
    model = create_backbone(args.backbone, input_size=(112, 96)).eval()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "ck.pt"
        torch.save({"model": model.state_dict(), "head": {}, "iteration": 0,
                    "config": {"model": {"backbone": args.backbone, "input_size": [112, 96]},
                               "data": {"template": "112x96"}}}, ckpt)
        results = {fmt: export_model(ckpt, Path(d) / f"m.{fmt}", fmt) for fmt in ("onnx", "torchscript")}
        x = torch.randn(args.batch, 3, 112, 96)
        onnx_model = OnnxModel(Path(d) / "m.onnx", num_threads=args.threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ts = torch.jit.load(str(Path(d) / "m.torchscript"), map_location="cpu")

        def run(m):
            with torch.inference_mode():
                m(x)

        t_torch = _time(lambda: run(model), args.repeats)
        t_onnx = _time(lambda: run(onnx_model), args.repeats)
        t_ts = _time(lambda: run(ts.features), args.repeats)
    for name, t, fmt in (("PyTorch eager", t_torch, None), ("onnxruntime (CPU)", t_onnx, "onnx"),
                         ("TorchScript", t_ts, "torchscript")):
        check = "" if fmt is None else (f"{results[fmt]['max_abs_diff_embedding']:.1e} / "
                                        f"{results[fmt]['max_rel_diff_feature']:.1e}")
        rows.append(f"| {name} | {args.batch / t:.1f} | {t_torch / t:.2f} | {check} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join([
        f"# Export: embedding speed, {args.backbone} 112x96, batch {args.batch}, {args.threads} threads",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start; "
        f"torch {torch.__version__}; best of {args.repeats}.",
        "",
        "| backend | images/s | speed vs PyTorch | export check (embedding abs / feature rel) |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ])
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
