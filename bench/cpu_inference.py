"""Embedding on a CPU: the toolkit against ONNX Runtime on the toolkit's own export, for every face backbone.

    PYTHONPATH=. python bench/cpu_inference.py [--backbones sphere20,sfnet20,iresnet50,mobilefacenet,dlib_resnet29]
        [--batch-sizes 64,2] [--rounds 5] [--threads N] [--data-path] [--out bench/results/cpu_inference.md]

Per backbone: a seeded network (its batch-norm statistics those of the crops, as a trained network's
are of its data) saved as a checkpoint, and real LFW crops (aligned with the shared 5-point
landmarks to the network's input size; ``../shared/data/lfw``). Then, interleaved in one process
(``bench/_timing.alternate``: each variant once per round, best round kept), on the same crops with
their mirrors, float32, for each batch size (64: ``verify``'s default batch; 2: ``compare``'s pair):

- ``toolkit``: what ``verify``, ``compare``, ``FaceEmbedder`` and ``megaface export`` run per batch
  with ``--precision fp32`` and the default ``--runtime auto``: :func:`eval.runtime.load_inference_model`,
  then :func:`eval.features.embed_batch` (crop + mirror);
- ``ORT``: ONNX Runtime's own ``InferenceSession`` (default options, ``intra_op_num_threads`` = the
  threads) on the toolkit's export (the cached ``.onnx`` file, the graph ``sphereface-plus export``
  writes), run on ``concatenate([x, mirror(x)])``: a user's own deployment of the same model;
- ``torch fp32``: the PyTorch path (``--runtime torch --precision fp32``);
- ``toolkit auto``: the default ``--precision auto`` (bf16 + channels_last in PyTorch on a CPU with
  native bf16; identical to ``toolkit`` elsewhere). Not float32: shown for the user's default only.

"images/s" counts input images, each embedded with its mirror. GFLOP/s: the network's FLOPs (2 per
multiply-add, ``torch.utils.flop_counter``) per second, against the CPU's float32 FMA peak =
cores x clock x FLOP/cycle (:func:`fma_peak`). ``--data-path`` also times, on one core, what the
DataLoader workers do per image (decode + align + preprocess; decode only for a pack) and what
``compare`` does before the network (MTCNN detection + alignment).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._timing import RESULTS, alternate, cpu_name, cpuinfo, load_average, machine, write_json, write_report  # noqa: E402
from bench.embed_throughput import model_flops  # noqa: E402

LFW = REPO.parent / "shared" / "data" / "lfw"
#: the networks of the table: (registry name, builder arguments); MobileFaceNet as the paper's (128-d, scale 1)
BACKBONES = {
    "sphere20": ("sphere20", {"input_size": [112, 96]}),
    "sfnet20": ("sfnet20", {"input_size": [112, 112]}),
    "iresnet50": ("iresnet50", {"input_size": [112, 112]}),
    "mobilefacenet": ("mobilefacenet", {"input_size": [112, 96], "embedding_dim": 128, "scale": 1}),
    "dlib_resnet29": ("dlib_resnet29", {"input_size": [150, 150], "embedding_dim": 128}),  # dlib's chip
}


def fma_peak(cores: int, ghz: float = 0.0, flops_per_cycle: int = 0) -> Tuple[float, str]:
    """``(float32 FMA peak in GFLOP/s, how it was computed)`` for ``cores`` cores.

    FLOP per cycle and core = FMA units x float32 lanes per unit x 2 (an FMA is a multiply and an add).
    AMD Zen 2-4 (family 23 and 25): two 256-bit FMA pipes (Zen 4 runs AVX-512 as two 256-bit halves),
    2 x 8 x 2 = 32; Zen 5 (family 26): two 512-bit pipes, 64; Intel with AVX-512: two 512-bit FMA units
    on the server parts, 64; otherwise AVX2 + FMA: two 256-bit units, 32. The clock is /proc/cpuinfo's
    "cpu MHz" (in a VM the nominal clock: a boost clock raises the real peak). ``ghz`` and
    ``flops_per_cycle`` override both.
    """
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    vendor, family = info.get("vendor_id", ""), int(info.get("cpu family", "0") or 0)
    if not flops_per_cycle:
        if vendor == "AuthenticAMD":
            flops_per_cycle, units = (64, "2 x 512-bit FMA pipes") if family >= 26 else (32, "2 x 256-bit FMA pipes")
        elif "avx512f" in flags:
            flops_per_cycle, units = 64, "2 x 512-bit FMA units"
        else:
            flops_per_cycle, units = 32, "2 x 256-bit FMA units"
    else:
        units = "given"
    if not ghz:
        ghz = float(info.get("cpu MHz", "0") or 0) / 1000
    peak = cores * ghz * flops_per_cycle
    return peak, (f"{cores} cores x {ghz:.2f} GHz (/proc/cpuinfo) x {flops_per_cycle} float32 FLOP/cycle "
                  f"({units}, 2 FLOP per FMA) = {peak:.0f} GFLOP/s")


def lfw_crops(template: str, count: int) -> List[np.ndarray]:
    import cv2

    from data_prep import align_face
    from eval.features import read_landmarks

    marks = read_landmarks(LFW / "lfw_landmark.txt")
    names = sorted(marks)[::97][:count]  # spread over the people, deterministic
    return [align_face(cv2.imread(str(LFW / "images" / n)), marks[n], template=template) for n in names]


def make_checkpoint(path: Path, backbone: str, kwargs, batch: torch.Tensor) -> torch.nn.Module:
    """A seeded network saved as a checkpoint; its batch-norm statistics are those of ``batch`` (real crops), as a
    trained network's are of its data: with the initial ones a deep network's features grow without bound."""
    from sphereface_plus.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(backbone, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: the statistics of this one batch
    if norms:
        with torch.no_grad():
            model.train()(batch)
    for m in norms:
        m.momentum = 0.1
    model.eval()
    size = kwargs["input_size"]
    cfg = {"backbone": backbone, "input_size": size,
           **({"embedding_dim": kwargs["embedding_dim"]} if "embedding_dim" in kwargs else {}),
           "kwargs": {k: v for k, v in kwargs.items() if k not in ("input_size", "embedding_dim")}}
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 0,
                "config": {"model": cfg, "data": {"template": f"{size[0]}x{size[1]}"}}}, path)
    return model


def bench_backbone(key: str, args, folder: Path, peak: float) -> Iterator[Dict[str, object]]:
    """The table's rows of one network, one per batch size, as they are measured."""
    import onnxruntime as ort

    from eval.features import embed_batch, inference_setup, preprocess
    from eval.runtime import load_inference_model

    backbone, kwargs = BACKBONES[key]
    ckpt = folder / f"{key}.pt"
    h, w = kwargs["input_size"]
    crops = lfw_crops(f"{h}x{w}", max(args.batch_sizes))
    reference = make_checkpoint(ckpt, backbone, kwargs, torch.stack([preprocess(c) for c in crops]))
    t0 = time.perf_counter()
    toolkit, info = load_inference_model(ckpt, precision="fp32", runtime="auto", cache=folder / "cache")
    export_s = time.perf_counter() - t0
    assert info["runtime"] == "onnxruntime", info
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(toolkit.path, sess_options=opts, providers=["CPUExecutionProvider"])
    torch_fp32, _ = load_inference_model(ckpt, precision="fp32", runtime="torch")
    auto_model, _ = load_inference_model(ckpt, precision="auto", runtime="auto", cache=folder / "cache")
    auto_precision, auto_cl = inference_setup(auto_model, "auto")
    if auto_cl:
        auto_model = auto_model.to(memory_format=torch.channels_last)
    flops = 2 * model_flops(reference, torch.stack([preprocess(crops[0])]))  # crop + mirror, per input image
    for batch in args.batch_sizes:
        x = torch.stack([preprocess(c) for c in crops[:batch]])
        xn = x.numpy()

        def run_ort():
            (out,) = session.run(["feature"], {"input": np.ascontiguousarray(np.concatenate([xn, xn[..., ::-1]]))})
            return out

        def run(model, precision="fp32", cl=False):
            def f():
                with torch.inference_mode():
                    return embed_batch(model, x, True, precision, cl)
            return f

        variants = {"toolkit": run(toolkit), "ORT": run_ort}
        if batch <= args.extra_max_batch:  # the PyTorch columns (slow: float32 eager is the old path)
            variants.update({"torch fp32": run(torch_fp32), "toolkit auto": run(auto_model, auto_precision, auto_cl)})
        with torch.inference_mode():  # parity on these crops, features as the commands return them
            ref = embed_batch(reference, x, True, "fp32").double()
            ours = variants["toolkit"]().double()
            theirs = torch.from_numpy(run_ort()).double()
            theirs = torch.cat(theirs.split(batch), dim=1)
        scale = ref.norm(dim=1, keepdim=True)
        diff_torch = float(((ours - ref).abs() / scale).max())
        diff_ort = float(((ours - theirs).abs() / scale).max())
        t0 = time.perf_counter()
        run_ort()
        repeat = int(min(20, max(1, 0.5 / (time.perf_counter() - t0))))  # rounds of at least ~0.5 s
        load_before = load_average()
        times = alternate(variants, args.rounds, repeat=repeat, log=False)
        load_after = load_average()
        best = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"network": key, "input": f"{h}x{w}", "batch": batch, "export_s": export_s, "repeat": repeat,
               "rounds": args.rounds, "threads": args.threads, "cpu": cpu_name(), "peak": peak,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "diff_torch": diff_torch, "diff_ort": diff_ort, "load": (load_before, load_after),
               "gflop_per_image": flops / 1e9, "precision_auto": auto_precision + (" + channels_last" if auto_cl else "")}
        for k in variants:
            row[f"{k} ips"] = batch / best[k]
            row[f"{k} ips_median"] = batch / med[k]
        row["ratio"] = best["toolkit"] / best["ORT"]
        row["ratio_median"] = med["toolkit"] / med["ORT"]
        row["round_ratios"] = [a / b for a, b in zip(times["toolkit"], times["ORT"])]
        row["gflops"] = flops * batch / best["toolkit"] / 1e9
        row["peak_pct"] = 100 * row["gflops"] / peak if peak else None
        print(f"{key} batch {batch}: toolkit {row['toolkit ips']:.1f} img/s, ORT {row['ORT ips']:.1f}, ratio "
              f"{row['ratio']:.3f} (median {row['ratio_median']:.3f}), torch fp32 {_num(row, 'torch fp32 ips')}, "
              f"auto {_num(row, 'toolkit auto ips')}; load {load_before} -> {load_after}", flush=True)
        yield row


def data_path(count: int) -> List[str]:
    """Per-image time, on one core, of what the DataLoader workers and ``compare`` do before the network."""
    import cv2

    from data_prep import align_face
    from eval.features import EncodedImages, ImageFiles, read_landmarks

    torch.set_num_threads(1)
    marks = read_landmarks(LFW / "lfw_landmark.txt")
    names = sorted(marks)[::53][:count]
    files = ImageFiles(LFW / "images", names, input_size=(112, 96), landmarks={n: marks[n] for n in names})
    encoded = EncodedImages([cv2.imencode(".jpg", align_face(cv2.imread(str(LFW / "images" / n)), marks[n]))[1].tobytes()
                             for n in names], (112, 96))
    lines = []
    for label, data in (("decode 250x250 JPEG + align + preprocess (verify --landmarks, megaface export)", files),
                        ("decode 112x96 JPEG + preprocess (verify bin/packs, aligned crops)", encoded)):
        data[0]
        t0 = time.perf_counter()
        for i in range(len(data)):
            data[i]
        dt = (time.perf_counter() - t0) / len(data)
        lines.append(f"| {label} | {1e3 * dt:.2f} ms | {1 / dt:.0f} |")
    try:
        from data_prep.detectors import create_detector

        det = create_detector("mtcnn")
        images = [cv2.imread(str(LFW / "images" / n)) for n in names[:10]]
        det.detect(images[0])
        t0 = time.perf_counter()
        for im in images:
            det.detect(im)
        dt = (time.perf_counter() - t0) / len(images)
        lines.append(f"| MTCNN detection of a 250x250 photo (compare, FaceEmbedder without aligned=True) | "
                     f"{1e3 * dt:.1f} ms | {1 / dt:.1f} |")
    except Exception as e:  # noqa: BLE001 (no detector weights here: say so, the rest stands)
        lines.append(f"| MTCNN detection | not timed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | |")
    torch.set_num_threads(os.cpu_count() or 1)
    lines.append(f"| (timed {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load_average()}) | | |")
    return lines


def main() -> int:
    global LFW
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma separated, of {', '.join(BACKBONES)}")
    ap.add_argument("--batch-sizes", default="64,2", help="images per batch, each with its mirror (default 64,2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads = onnxruntime intra-op threads (default: torch's, one per core)")
    ap.add_argument("--clock-ghz", type=float, default=0.0, help="override the clock of the FMA peak")
    ap.add_argument("--flops-per-cycle", type=int, default=0, help="override the float32 FLOP/cycle/core of the peak")
    ap.add_argument("--extra-max-batch", type=int, default=64,
                    help="time the torch fp32 and toolkit auto columns only up to this batch (default 64)")
    ap.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs (default: keep the other "
                                                         "networks' and batch sizes' rows)")
    ap.add_argument("--data-path", action="store_true", help="also time the data path and MTCNN (one core)")
    ap.add_argument("--lfw", default=str(LFW), help=f"LFW folder with images/ and lfw_landmark.txt (default {LFW})")
    ap.add_argument("--out", default=str(RESULTS / "cpu_inference.md"))
    args = ap.parse_args()
    LFW = Path(args.lfw)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    if not (LFW / "lfw_landmark.txt").is_file():
        print(f"real LFW not found at {LFW}", file=sys.stderr)
        return 2
    import onnxruntime as ort

    peak, how = fma_peak(args.threads, args.clock_ghz, args.flops_per_cycle)
    out = Path(args.out)
    store = out.with_suffix(".json")
    # rows of other networks / batch sizes from earlier runs are kept (each row says when and how it ran)
    previous = json.loads(store.read_text()) if store.is_file() and not args.fresh else {}
    rows: List[Dict[str, object]] = previous.get("rows", [])
    data_lines = data_path(40) if args.data_path else previous.get("data_path", [])
    with tempfile.TemporaryDirectory() as d:
        for key in args.backbones.split(","):
            for row in bench_backbone(key, args, Path(d), peak):  # written after each row
                rows = [r for r in rows if (r["network"], r["batch"]) != (row["network"], row["batch"])] + [row]
                order = list(BACKBONES)
                rows.sort(key=lambda r: (order.index(r["network"]) if r["network"] in order else len(order),
                                         -r["batch"]))
                write_json(store.name, {"machine": machine(), "onnxruntime": ort.__version__, "fma_peak": how,
                                        "rows": rows, "data_path": data_lines}, out_dir=store.parent)
                write_report(out, render(rows, how, ort.__version__, data_lines))
    return 0


def _num(row: Dict[str, object], key: str, fmt: str = "{:.1f}") -> str:
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def render(rows: List[Dict[str, object]], how: str, ort_version: str, data_lines: List[str]) -> List[str]:
    lines = [
        "# Embedding on a CPU: toolkit against ONNX Runtime on the same export",
        "",
        "Command (per network; each row says when it ran): `PYTHONPATH=. python bench/cpu_inference.py "
        "--backbones NAME --batch-sizes 64,2 --rounds R [--extra-max-batch N]`",
        "",
        f"CPU: {cpu_name()} ({os.cpu_count()} cores); torch {torch.__version__}, onnxruntime {ort_version}. "
        f"float32 FMA peak: {how}."
        + "".join(f" Row {r['network']} / {r['batch']} ran on another CPU: {r['cpu']}." for r in rows
                  if not cpu_name().startswith(str(r["cpu"]).split(" (")[0])),
        "",
        "Real LFW crops with their mirrors (one forward of 2 x batch), float32; seeded weights, batch-norm statistics "
        "of the crops. `toolkit`: `--runtime auto --precision fp32` (onnxruntime on the cached export, slices of the "
        "batch on one single-threaded session per thread); `ORT`: onnxruntime's own `InferenceSession` (default "
        "options, intra-op threads = threads) on the same .onnx file; `torch fp32`: `--runtime torch --precision fp32` "
        "(the toolkit's path before); `toolkit auto`: the default `--precision auto`. images/s from the best of the "
        "interleaved rounds; ratio = toolkit time / ORT time (<= 1: the toolkit is at least as fast), best and "
        "median rounds. GFLOP/s: the toolkit's.",
        "",
        "| network | input | batch | toolkit img/s | ORT img/s | toolkit / ORT (best) | (median) | torch fp32 img/s "
        "| toolkit auto img/s | GFLOP/image | GFLOP/s | % of FMA peak | max diff vs torch / vs ORT | rounds | load "
        "before -> after | when |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        auto = _num(r, "toolkit auto ips")
        lines.append(
            f"| {r['network']} | {r['input']} | {r['batch']} | {r['toolkit ips']:.1f} | {r['ORT ips']:.1f} | "
            f"**{r['ratio']:.3f}** | {r['ratio_median']:.3f} | {_num(r, 'torch fp32 ips')} | "
            f"{auto + (' (' + r['precision_auto'] + ')' if auto != '-' else '')} | {r['gflop_per_image']:.2f} | "
            f"{r['gflops']:.1f} | {_num(r, 'peak_pct', '{:.0f} %')} | {r['diff_torch']:.1e} / {r['diff_ort']:.1e} | "
            f"{r['rounds']} x {r['repeat']} | {r['load'][0][0] if r['load'][0] else '?'} -> "
            f"{r['load'][1][0] if r['load'][1] else '?'} | {r['date']} |")
    lines += ["", "Per-round ratios (toolkit / ORT, in round order):", ""]
    for r in rows:
        lines.append(f"- {r['network']} batch {r['batch']}: " + ", ".join(f"{v:.3f}" for v in r["round_ratios"])
                     + f" ({r['repeat']} calls per round); first export + check {r['export_s']:.0f} s")
    if data_lines:
        lines += ["", "Data path, one core (what each DataLoader worker does per image; compare's detection):", "",
                  "| step | per image | images/s per core |", "| --- | --- | --- |"] + data_lines
    return lines


if __name__ == "__main__":
    sys.exit(main())
