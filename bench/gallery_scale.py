"""Gallery search at scale: 1M x 512 float32 random unit vectors, exact against HNSW and IVF-PQ (eval.vector_index).

Measured in one process, on one CPU thread for every index (the machine is shared; a thread count is a fair
unit): build time, memory (RssAnon from /proc before and after each build; the vectors themselves are a
memory-mapped file, as in a gallery), queries per second
batched (all queries in one call, as ``gallery search`` does) and one query at a time (as a service
answers), and recall@1 / recall@10 against the exact search, for two kinds of probes:

- mated probes: a gallery vector plus Gaussian noise, cosine about 0.7 with it (a new photo of an enrolled
  person);
- random probes: uniform on the sphere (nobody enrolled; the worst case).

Timings alternate between the exact index and each approximate one (bench/_timing.alternate): ratios
survive the load of a shared machine better than absolute figures. IVF-PQ's memory per vector is
measured at 1M and projected to 100M (its codes and ids grow linearly; its coarse quantizer is priced at
the nlist a 100M gallery would use). faiss's IndexFlatIP is timed beside the numpy exact index the gallery uses, and a whole ``Gallery`` (create:
files, checksums, calibration; open; search) are measured too. Results: bench/results/gallery_scale.md.

    nice -n 5 .venv/bin/python bench/gallery_scale.py                 # 1M x 512 (about an hour of one core)
    .venv/bin/python bench/gallery_scale.py --n 20000 --out /tmp/x.md # a quick look

The vectors, the exact answers and the built indexes are kept in ``--cache`` (default runs/gallery-scale/),
so a run stopped half-way (the OOM killer of a busy machine, say) goes on from there when started again.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._timing import RESULTS, alternate, load_average, write_report  # noqa: E402
from eval import vector_index as V  # noqa: E402


def rss_mb(field: str = "RssAnon") -> float:
    """Resident memory of this process from /proc/self/status (``RssAnon``: what the indexes allocate; the
    vectors are a memory-mapped file, counted in ``RssFile``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cached(path: Path, make, load, save):
    """``load(path)`` when a previous run saved it there, else ``make()`` (and save it): an interrupted run
    (a busy machine's OOM killer, say) goes on where it stopped. Returns ``(object, seconds to make or None)``."""
    if path.exists():
        return load(path), None
    t0 = time.perf_counter()
    obj = make()
    seconds = time.perf_counter() - t0
    save(obj, path)
    return obj, seconds


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    k = truth.shape[1]
    return {"r1": float(np.mean(found[:, 0] == truth[:, 0])),
            "r10": float(np.mean([np.intersect1d(f, t).size / k for f, t in zip(found[:, :k], truth)]))}


def qps(times: List[float], n: int) -> float:
    return n / min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000, help="probes of each kind (batched)")
    ap.add_argument("--single", type=int, default=100, help="probes searched one at a time")
    ap.add_argument("--exact-batch", type=int, default=100, help="probes of the timed exact searches")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", default="16,32,64,128,256,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--project", type=int, default=100_000_000, help="IVF-PQ memory projected to this many vectors")
    ap.add_argument("--out", type=Path, default=RESULTS / "gallery_scale.md")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "gallery-scale",
                    help="the vectors (memory-mapped), the exact answers and the built indexes are kept here, so "
                         "that a rerun starts where a stopped one was")
    args = ap.parse_args()
    faiss = V.faiss_module()
    if faiss is None:
        raise SystemExit("faiss-cpu is needed for this benchmark (pip install faiss-cpu)")
    faiss.omp_set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load0 = load_average()
    n, d, nq, k = args.n, args.dim, args.queries, 10
    cache = args.cache / f"{n}x{d}"
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vec_path = cache / "vectors.npy"
    if not vec_path.exists():  # written to disk and memory-mapped: 2 GB of page cache, not of process memory
        t = time.perf_counter()
        tmp = np.lib.format.open_memmap(cache / "vectors.tmp.npy", mode="w+", dtype=np.float32, shape=(n, d))
        for a in range(0, n, 100_000):
            tmp[a:a + 100_000] = unit(rng.standard_normal((min(100_000, n - a), d)))
        tmp.flush()
        del tmp
        os.replace(cache / "vectors.tmp.npy", vec_path)
        print(f"{n} x {d} random unit vectors written in {time.perf_counter() - t:.1f} s", flush=True)
    x = np.load(vec_path, mmap_mode="r")
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(1)
    mates = rng.choice(n, nq, replace=False)
    probes = {"mated": unit(x[mates] + rng.standard_normal((nq, d)).astype(np.float32) / np.sqrt(d)),
              "random": unit(rng.standard_normal((nq, d)))}
    mate_cos = float(np.mean(np.sum(probes["mated"] * x[mates], 1)))
    built: Dict[str, Dict[str, float]] = {}

    def note(name, seconds, mib):
        built[name] = {"s": seconds, "mib": mib}
        print(f"{name}: built in {seconds if seconds is not None else float('nan'):.1f} s, +{mib:.0f} MiB", flush=True)

    numpy_exact = V.build_index("exact", d, x, ids)
    note("exact (numpy: the gallery's; the vectors memory-mapped)", 0.0, 0.0)
    truth_all, _ = cached(cache / f"truth-{nq}.npy", lambda: np.concatenate(
        [numpy_exact.search(q, k)[1] for q in probes.values()]), np.load, lambda a, p: np.save(p, a))
    truth = {"mated": truth_all[:nq], "random": truth_all[nq:]}

    # faiss's flat index: timed beside numpy, then freed (it holds a 2 GB copy)
    r0, t0 = rss_mb(), time.perf_counter()
    exact = _faiss_flat(faiss, d, x, ids)
    note("exact (faiss IndexFlatIP)", time.perf_counter() - t0, rss_mb() - r0)
    nb = min(args.exact_batch, nq)  # exact searches are slow: timed on fewer probes
    single = {kind: q[:args.single] for kind, q in probes.items()}

    def one_at_a_time(index, qs):
        return lambda: [index.search(qs[i:i + 1], k) for i in range(qs.shape[0])]

    times = alternate({"numpy": lambda: numpy_exact.search(probes["mated"][:nb], k),
                       "faiss": lambda: exact.search(probes["mated"][:nb], k),
                       "numpy-1": one_at_a_time(numpy_exact, single["mated"][:10]),
                       "faiss-1": one_at_a_time(exact, single["mated"][:10])}, rounds=args.rounds)
    exact_qps, faiss_qps = qps(times["numpy"], nb), qps(times["faiss"], nb)
    exact1_qps, faiss1_qps = qps(times["numpy-1"], 10), qps(times["faiss-1"], 10)
    same = bool(np.array_equal(exact.search(probes["mated"][:nb], k)[1], truth["mated"][:nb]))
    del exact

    hnsw_name = f"HNSW M={args.hnsw_m} efConstruction={args.ef_construction}"
    r0 = rss_mb()
    hnsw, seconds = cached(cache / f"hnsw-M{args.hnsw_m}-efc{args.ef_construction}.faiss",
                           lambda: V.build_index("hnsw", d, x, ids, {"M": args.hnsw_m, "efConstruction":
                                                                     args.ef_construction, "efSearch": 64}),
                           lambda p: V.FaissIndex("hnsw", faiss.read_index(str(p)), {
                               "M": args.hnsw_m, "efConstruction": args.ef_construction, "efSearch": 64}),
                           lambda i, p: faiss.write_index(i.index, str(p)))
    note(hnsw_name, seconds, rss_mb() - r0)
    ivf_params = V.default_params("ivfpq", n, d)
    ivf_name = f"IVF-PQ nlist={ivf_params['nlist']} m={ivf_params['m']} nbits={ivf_params['nbits']}"
    r0 = rss_mb()
    ivfpq, seconds = cached(cache / f"ivfpq-{ivf_params['nlist']}-{ivf_params['m']}.faiss",
                            lambda: V.build_index("ivfpq", d, x, ids, ivf_params, train_size=64 * ivf_params["nlist"]),
                            lambda p: V.FaissIndex("ivfpq", faiss.read_index(str(p)), ivf_params),
                            lambda i, p: faiss.write_index(i.index, str(p)))
    note(ivf_name, seconds, rss_mb() - r0)

    # ---- HNSW: an efSearch sweep, every setting timed in the same alternating rounds as the exact search
    inner = faiss.downcast_index(hnsw.index.index)
    efs = [int(v) for v in args.ef_search.split(",")]

    def at_ef(ef, fn):
        def run():
            inner.hnsw.efSearch = ef
            return fn()
        return run

    variants = {"exact": lambda: numpy_exact.search(probes["mated"][:nb], k)}
    for ef in efs:
        variants[f"hnsw{ef}"] = at_ef(ef, lambda: hnsw.search(probes["mated"], k))
        variants[f"hnsw{ef}-1"] = at_ef(ef, one_at_a_time(hnsw, single["mated"]))
    times = alternate(variants, rounds=args.rounds, log=False)
    exact_sweep_qps = qps(times["exact"], nb)
    sweep = []
    for ef in efs:
        inner.hnsw.efSearch = ef
        r = {kind: recall(hnsw.search(q, k)[1], truth[kind]) for kind, q in probes.items()}
        batched, one = qps(times[f"hnsw{ef}"], nq), qps(times[f"hnsw{ef}-1"], args.single)
        sweep.append({"ef": ef, "qps": batched, "ratio": batched / exact_sweep_qps, "qps1": one,
                      "ratio1": one / exact1_qps, **{f"{kind}_{m}": v for kind, rr in r.items() for m, v in rr.items()}})
        s = sweep[-1]
        print(f"efSearch {ef}: {s['qps']:.0f} q/s batched ({s['ratio']:.1f}x exact), {s['qps1']:.0f} q/s one at a "
              f"time ({s['ratio1']:.1f}x), recall@1 mated {s['mated_r1']:.4f} random {s['random_r1']:.4f}", flush=True)

    # ---- IVF-PQ: recall with the gallery's exact re-scoring of 4k candidates, and memory per vector
    ivf = faiss.extract_index_ivf(ivfpq.index)
    nprobes = (8, 32, 128)

    def at_nprobe(nprobe):
        def run():
            ivf.nprobe = nprobe
            return ivfpq.search(probes["mated"], 4 * k)
        return run

    times = alternate({"exact": lambda: numpy_exact.search(probes["mated"][:nb], k),
                       **{f"ivf{p}": at_nprobe(p) for p in nprobes}}, rounds=args.rounds, log=False)
    ivf_rows = []
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        rr = {}
        for kind, q in probes.items():
            _, cand = ivfpq.search(q, 4 * k)
            rescored = np.einsum("qd,qkd->qk", q, x[np.maximum(cand, 0)])
            rescored[cand < 0] = -np.inf
            _, top = V.top_k(rescored, cand, k)
            rr[kind] = recall(top, truth[kind])
        ivf_rows.append({"nprobe": nprobe, "ratio": qps(times[f"ivf{nprobe}"], nq) / qps(times["exact"], nb), **rr})
    invlists = ivf.invlists
    code_bytes = sum(invlists.list_size(i) for i in range(ivf.nlist)) * (ivf.code_size + 8)
    fixed = ivf.nlist * d * 4 + ivf_params["m"] * (2 ** ivf_params["nbits"]) * (d // ivf_params["m"]) * 4
    per_vec_struct = code_bytes / n
    nlist_big = V.default_params("ivfpq", args.project, d)["nlist"]
    projected = args.project * per_vec_struct + nlist_big * d * 4
    # ---- the Gallery as a whole (exact index): create (files, checksums, calibration), open, search
    from eval.gallery import Gallery

    tmp = Path(tempfile.mkdtemp(prefix="gallery-scale-", dir=str(ROOT / "runs") if (ROOT / "runs").is_dir()
                                else None))
    del hnsw, ivfpq, numpy_exact
    identities = [f"id{i // 4}" for i in range(n)]  # four vectors per person
    t0 = time.perf_counter()
    g = Gallery.create(tmp / "g", x, identities, index="exact", calibration_size=200)
    create_s = time.perf_counter() - t0
    del g
    r0, t0 = rss_mb(), time.perf_counter()
    g = Gallery.open(tmp / "g")
    open_s, open_mib = time.perf_counter() - t0, rss_mb() - r0  # the vectors are mapped: RssFile, not RssAnon
    t0 = time.perf_counter()
    g.search(probes["mated"][:100], 5)
    search100_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    g.search(probes["mated"][:1], 5)
    search1_s = time.perf_counter() - t0
    disk_mib = sum(p.stat().st_size for p in (tmp / "g").rglob("*") if p.is_file()) / 2 ** 20
    shutil.rmtree(tmp, ignore_errors=True)

    load1 = load_average()
    target = [s for s in sweep if s["mated_r1"] >= 0.99]
    lines = [
        "# Gallery search at scale (bench/gallery_scale.py)",
        "",
        f"{n:,} x {d} float32 random unit vectors; {nq} mated probes (cosine {mate_cos:.2f} with their mate) and "
        f"{nq} random probes; k = {k}. CPU: {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores, shared), ONE thread for every index (faiss {faiss.__version__}); load average "
        f"{load0} before, {load1} after. Ratios are of the best of {args.rounds} alternating rounds.",
        "",
        "## Build and memory",
        "",
        "| index | build (s) | process memory added, RssAnon (MiB) | per vector (bytes) |",
        "| --- | --- | --- | --- |",
    ]
    for name, b in built.items():
        took = f"{b['s']:.1f}" if b["s"] is not None else "(loaded from the cache of an earlier run)"
        lines.append(f"| {name} | {took} | {b['mib']:.0f} | {b['mib'] * 2 ** 20 / n:.0f} |")
    lines += [
        "",
        "## Exact search",
        "",
        f"numpy (the gallery's exact index): **{exact_qps:.1f} queries/s** batched ({nb} at once), {exact1_qps:.2f} "
        f"queries/s one at a time; faiss IndexFlatIP: {faiss_qps:.1f} batched ({faiss_qps / exact_qps:.2f}x numpy), "
        f"{faiss1_qps:.2f} one at a time; the same answers: {same}.",
        "",
        "## HNSW against exact",
        "",
        "| efSearch | queries/s batched | x exact | queries/s one at a time | x exact | recall@1 mated | "
        "recall@10 mated | recall@1 random | recall@10 random |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in sweep:
        lines.append(f"| {s['ef']} | {s['qps']:.0f} | {s['ratio']:.1f} | {s['qps1']:.0f} | "
                     f"{s['ratio1']:.1f} | {s['mated_r1']:.4f} | {s['mated_r10']:.4f} | "
                     f"{s['random_r1']:.4f} | {s['random_r10']:.4f} |")
    if target:
        best = target[0]
        lines += ["", f"Target recall@1 >= 0.99 (mated probes) first reached at efSearch {best['ef']}: "
                      f"{best['ratio']:.1f}x exact batched, {best['ratio1']:.1f}x one at a time."]
    else:
        lines += ["", "Target recall@1 >= 0.99 (mated probes) NOT reached in this sweep."]
    lines += [
        "",
        "## IVF-PQ: recall (4k candidates re-scored exactly, as the gallery does) and memory",
        "",
        "| nprobe | x exact (batched) | recall@1 mated | recall@10 mated | recall@1 random | recall@10 random |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in ivf_rows:
        lines.append(f"| {r['nprobe']} | {r['ratio']:.1f} | {r['mated']['r1']:.4f} | {r['mated']['r10']:.4f} | "
                     f"{r['random']['r1']:.4f} | {r['random']['r10']:.4f} |")
    lines += [
        "",
        f"Index memory at {n:,}: codes + ids {code_bytes / 2 ** 20:.1f} MiB ({per_vec_struct:.1f} bytes per vector: "
        f"{ivf.code_size} of PQ code + 8 of id), coarse quantizer and PQ tables {fixed / 2 ** 20:.1f} MiB; "
        f"resident memory added by the build {built[ivf_name]['mib']:.0f} MiB (with the allocator's slack).",
        f"Projected to {args.project:,} vectors: {projected / 2 ** 30:.1f} GiB ({per_vec_struct:.1f} B per vector + "
        f"a {nlist_big}-list quantizer); the float32 vectors it re-scores stay on disk "
        f"({args.project * d * 4 / 2 ** 40:.2f} TiB, memory-mapped).",
        "",
        "## A whole gallery, exact index",
        "",
        f"Gallery.create of {n:,} vectors ({n // 4:,} identities): {create_s:.1f} s (segment files with sha256, "
        f"threshold calibration on 200 held-out identities); {disk_mib:.0f} MiB on disk. Gallery.open (every "
        f"file's sha256 checked, the segments memory-mapped): {open_s:.1f} s, +{open_mib:.0f} MiB resident. "
        f"search of 100 probes (top-5 identities): {search100_s:.2f} s; of 1 probe: {search1_s:.2f} s.",
    ]
    write_report(args.out, lines)
    return 0


def _faiss_flat(faiss, d, x, ids):
    index = V.FaissIndex("exact", faiss.IndexIDMap2(faiss.IndexFlatIP(d)), {})
    index.add(x, ids)
    return index


if __name__ == "__main__":
    sys.exit(main())
