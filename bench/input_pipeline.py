"""Input pipeline rate (docs/performance.md): training images per second per worker for every data source.

    PYTHONPATH=. python bench/input_pipeline.py [--images 512] [--rounds 5] [--workers 1,2,all]
        [--batch 64] [--out bench/results/input_pipeline.json] [--quick]

Builds one set of 112x96 aligned-size JPEG crops (quality 95, cut from the real LFW photos when
``../shared/data/lfw`` exists, else from random smooth images) in a temporary folder, stored four ways:
a folder tree (``data.source=folder``), a list file (``list``), an insightface RecordIO file (``rec``) and
a pack (``packed``, :mod:`data_prep.packed`: decoded uint8 crops, no JPEG decoding). Then it times, for
each source, what a DataLoader worker does per sample: read, decode, flip (every other sample), normalise
(``dataset[(i, flip)]``), in one process, with the JPEG decoder as installed (simplejpeg) and forced to
OpenCV (``SPHEREFACE_JPEG_DECODER=cv2``), alternating rounds, best round; the baseline is the folder
source decoded by OpenCV with the previous ``torch`` normalisation (what the toolkit did before). Then
``torch.utils.data.DataLoader`` with 1, 2 and all cores as workers (batch 64): images per second that
reach the training loop.

The step rate a worker count can feed: a training step of batch B at S steps/s needs ``B * S`` images/s,
so ``ceil(B * S / per-worker rate)`` workers (with the cores to run them); ``docs/performance.md``.

Writes ``bench/results/input_pipeline.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import RESULTS, alternate, load_average, machine, ratios, write_json, write_report  # noqa: E402
from data_prep import datasets as ds  # noqa: E402
from data_prep import recordio  # noqa: E402
from data_prep.jpeg import ENV, simplejpeg_available  # noqa: E402

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
SOURCES = ("folder", "list", "rec", "packed")


def _crops(n: int, seed: int = 0):
    """``n`` BGR uint8 112x96 crops: the centres of real LFW photos when present, else smooth noise."""
    import cv2

    files = sorted(LFW.rglob("*.jpg"))[: n] if LFW.is_dir() else []
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if files:
            img = cv2.imread(str(files[i % len(files)]), cv2.IMREAD_COLOR)
            out.append(np.ascontiguousarray(cv2.resize(img[50:200, 62:188], (96, 112), interpolation=cv2.INTER_AREA)))
        else:
            small = rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)
            out.append(cv2.resize(small, (96, 112), interpolation=cv2.INTER_CUBIC))
    return out, ("LFW photo centres" if files else "random smooth images")


def _rec_record(fh, payload: bytes) -> int:
    """Append one dmlc RecordIO record (split at 4-aligned magic words, as the writer does); its offset."""
    magic = struct.pack("<I", recordio.RECORDIO_MAGIC)
    offset = fh.tell()
    parts, start = [], 0
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i: i + 4] == magic:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    for j, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if j == 0 else (3 if j == len(parts) - 1 else 2))
        fh.write(magic + struct.pack("<I", (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4))
    return offset


def build_sources(root: Path, n: int, identities: int = 16):
    """The same crops as a folder tree, a list file, a RecordIO file and a pack; ``{source: dataset}``."""
    import cv2

    from data_prep.packed import PackWriter

    crops, origin = _crops(n)
    entries = []
    (root / "rec").mkdir(parents=True)
    with open(root / "rec" / "train.rec", "wb") as rec, open(root / "rec" / "train.idx", "w") as idx:
        for i, crop in enumerate(crops):
            label = i % identities
            rel = f"id{label:03d}/{i:05d}.jpg"
            ok, enc = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
            data = enc.tobytes()
            (root / "folder" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "folder" / rel).write_bytes(data)
            entries.append((rel, label))
            off = _rec_record(rec, struct.pack("<IfQQ", 0, float(label), i, 0) + data)
            idx.write(f"{i}\t{off}\n")
    (root / "train.txt").write_text("".join(f"{rel} {lab}\n" for rel, lab in entries))
    classes = [f"id{k:03d}" for k in range(identities)]
    with PackWriter(root / "packed", n, 112, 96) as w:
        for crop in crops:
            w.add(cv2.imdecode(np.frombuffer(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], np.uint8),
                               cv2.IMREAD_COLOR))
        w.finish([rel for rel, _ in entries], [lab for _, lab in entries], classes, "112x96")
    datasets = {
        "folder": ds.ImageFolderDataset(root / "folder", (112, 96), scan_limit=8),
        "list": ds.ListDataset(root / "folder", root / "train.txt", (112, 96), scan_limit=8),
        "rec": recordio.RecordIODataset(root / "rec", (112, 96), scan_limit=8),
        "packed": ds.PackedDataset(root / "packed", (112, 96), scan_limit=8),
    }
    return datasets, origin


def _old_normalise(image_bgr):
    """The toolkit's earlier normalisation (torch permute + float + sub + div): the baseline."""
    t = torch.from_numpy(np.ascontiguousarray(image_bgr)).permute(2, 0, 1).float()
    return t.sub_(127.5).div_(128.0)


class _Pass:
    """Read every sample once, mirrored every other one: one round of a worker's work."""

    def __init__(self, dataset, decoder: str, old_normalise: bool = False):
        self.dataset, self.decoder, self.old = dataset, decoder, old_normalise

    def __call__(self):
        prev = os.environ.get(ENV)
        os.environ[ENV] = self.decoder
        saved = ds.to_network_tensor
        if self.old:
            ds.to_network_tensor = _old_normalise
        try:
            for i in range(len(self.dataset)):
                self.dataset[(i, bool(i & 1))]
        finally:
            ds.to_network_tensor = saved
            if prev is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = prev


def loader_rate(dataset, workers: int, batch: int, epochs: int = 2) -> float:
    """Images per second out of a DataLoader with ``workers`` processes (best of ``epochs`` passes)."""
    from torch.utils.data import DataLoader

    items = [(i, bool(i & 1)) for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=batch, sampler=items, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    best = 0.0
    for e in range(epochs + 1):  # the first pass starts the workers
        t0 = time.perf_counter()
        count = sum(x[0].shape[0] for x in loader)
        if e:
            best = max(best, count / (time.perf_counter() - t0))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", default="1,2,all", help="DataLoader worker counts ('all' = every core; '' = skip)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="CI size: 64 images, 2 rounds, workers 0")
    ap.add_argument("--out", default=str(RESULTS / "input_pipeline.json"))
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds, args.workers = 64, 2, "0"
    torch.set_num_threads(1)
    load0 = load_average()
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="sfp_input_") as tmp:
        datasets, origin = build_sources(Path(tmp), args.images)
        fast = "simplejpeg" if simplejpeg_available() else "cv2"
        variants = {"folder, cv2 decode, old normalise (baseline)": _Pass(datasets["folder"], "cv2", True)}
        for name in SOURCES:
            if name != "packed":
                variants[f"{name}, cv2 decode"] = _Pass(datasets[name], "cv2")
                if fast != "cv2":
                    variants[f"{name}, {fast} decode"] = _Pass(datasets[name], fast)
            else:
                variants["packed (no decode)"] = _Pass(datasets[name], "cv2")
        times = alternate(variants, args.rounds, log=False)
        per_worker = ratios(times, "folder, cv2 decode, old normalise (baseline)")
        for v in per_worker.values():
            v["images_per_s"] = round(args.images / v["best_s"], 1)
            v["speedup"] = round(1.0 / v["ratio"], 3)
        loaders = []
        counts = []
        for w in filter(None, args.workers.split(",")):
            counts.append(os.cpu_count() or 1 if w == "all" else int(w))
        for w in dict.fromkeys(counts):
            for name in ("folder", "packed"):
                loaders.append({"source": name, "workers": w, "decoder": fast if name != "packed" else "none",
                                "images_per_s": round(loader_rate(datasets[name], w, args.batch), 1)})
    payload = {"bench": "input_pipeline", "command": "PYTHONPATH=. python " + " ".join(["bench/input_pipeline.py"]
               + sys.argv[1:]), "images": args.images, "crops": f"112x96 JPEG q95 ({origin})",
               "rounds": args.rounds, "machine": machine(), "simplejpeg": simplejpeg_available(),
               "load_average_start": load0, "load_average_end": load_average(), "wall_s": round(time.time() - t_start, 1),
               "per_worker": per_worker, "dataloader": loaders}
    out = write_json(Path(args.out).name, payload, Path(args.out).parent)
    lines = ["# Input pipeline: read + decode + flip + normalise, one worker", "",
             f"Command: `{payload['command']}`; {args.images} crops 112x96 JPEG q95 ({origin}); {args.rounds} "
             f"alternating rounds, best. Load average {load0} at the start, {payload['load_average_end']} at the "
             "end.", "", "| source, decoder | images/s per worker | speed-up vs baseline |", "| --- | --- | --- |"]
    for name, v in per_worker.items():
        lines.append(f"| {name} | {v['images_per_s']:.0f} | {v['speedup']:.2f}x |")
    if loaders:
        lines += ["", "DataLoader (batch %d), images/s into the training loop:" % args.batch, "",
                  "| source | workers | images/s |", "| --- | --- | --- |"]
        lines += [f"| {r['source']} ({r['decoder']}) | {r['workers']} | {r['images_per_s']:.0f} |" for r in loaders]
    write_report(out.with_suffix(".md"), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
