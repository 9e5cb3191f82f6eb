"""Nearest-neighbour search by cosine on L2-normalised embeddings: one small interface, three kinds.

========= ===================================================== ======================================
kind      what                                                  memory per 512-d vector
========= ===================================================== ======================================
exact     every score ``q . x`` (:class:`NumpyExactIndex`:      2,048 B (the float32 vector, memory-
          blocks of one matrix product and a running top-k)     mapped from the gallery's files)
hnsw      a navigable small-world graph (faiss                  2,048 B + ``8 M`` B of graph links
          ``IndexHNSWFlat``, inner product); scores are exact   (``M = 32``: 2,304 B)
          for the vectors it visits
ivfpq     an inverted file of ``nlist`` lists holding product-  ``m`` B of codes + 8 B of id
          quantised codes (faiss ``IndexIVFPQ``); scores are    (``m = d / 8 = 64``: 72 B)
          approximations, so a caller re-scores the candidates
          on the stored vectors (:attr:`VectorIndex.exact_scores`)
========= ===================================================== ======================================

The exact kind is numpy, not faiss's ``IndexFlatIP``: batched, it measured 7.8x faster on this toolkit's test
CPU (one thread, 100,000 x 512, bench/results/gallery_scale_100k.md) and it searches the memory-mapped segment files without
copying them; faiss's flat index stays available as ``FaissIndex("exact", ...)``. Every index maps int64
vector ids to vectors, ``search(queries, k)`` returns ``(scores, ids)`` best first
(``-inf`` / ``-1`` past the number of vectors), and :func:`build_index` picks the kind by size
(:func:`choose_kind`) or by name. faiss (``pip install faiss-cpu``) is imported on first use; without it
every kind runs as the exact numpy search and one line says how to install faiss.

The exact kernel :func:`inner_products` (``queries @ vectors.T`` in the caller's dtype) is the one brute-force
score of the evaluation floor: :class:`NumpyExactIndex`, the MegaFace scorer (``eval.megaface.evaluate``) and
IJB 1:N (``eval.ijb_1n.identification_report``) all score through it (docs/gallery.md#indexes).
"""
from __future__ import annotations

import abc
import logging
import math
from typing import Dict, Optional, Tuple

import numpy as np

from sphereface_plus.errors import InputFileError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["INDEX_KINDS", "INDEX_PARAMS", "FAISS_HINT", "choose_kind", "default_params", "inner_products", "top_k", "faiss_module",
           "VectorIndex", "NumpyExactIndex", "FaissIndex", "build_index", "load_index", "recall_against_exact"]

#: the index kinds (``--index``; ``auto`` picks one by size with :func:`choose_kind`)
INDEX_KINDS = ("exact", "hnsw", "ivfpq")
#: the settings of each kind (``--index-param``; their defaults: :func:`default_params`)
INDEX_PARAMS = {"exact": (), "hnsw": ("M", "efConstruction", "efSearch"),
                "ivfpq": ("nlist", "m", "nbits", "nprobe", "rerank")}
FAISS_HINT = ("faiss is not installed: using the exact numpy search (pip install faiss-cpu for the HNSW and IVF-PQ "
              "indexes)")
#: ``auto``: exact up to this many vectors (a scan of 200k x 512 float32 is 400 MB, about 10 ms a query batch) ...
EXACT_UP_TO = 200_000
#: ... HNSW up to this many (5M x 512 float32 with its graph is 11.5 GB of memory), IVF-PQ beyond
HNSW_UP_TO = 5_000_000
#: rows of ``queries x vectors`` scores the numpy search holds at once (64 MB of float32)
BLOCK_ELEMENTS = 1 << 24

_faiss = None
_faiss_checked = False


def faiss_module():
    """The ``faiss`` module, or None when it is not installed (said once, in one line)."""
    global _faiss, _faiss_checked
    if not _faiss_checked:
        _faiss_checked = True
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its "loading / loaded" lines are noise here
        try:
            import faiss  # noqa: F401

            _faiss = faiss
        except ImportError:
            logger.warning(FAISS_HINT)
    return _faiss


def choose_kind(num_vectors: int) -> str:
    """The index kind ``auto`` stands for at ``num_vectors`` (docs/gallery.md#indexes)."""
    if num_vectors <= EXACT_UP_TO:
        return "exact"
    return "hnsw" if num_vectors <= HNSW_UP_TO else "ivfpq"


def default_params(kind: str, num_vectors: int, dim: int) -> Dict[str, int]:
    """Build and search settings of ``kind`` for ``num_vectors`` vectors of ``dim`` (stored with the index).

    HNSW: ``M = 32`` links per node, ``efConstruction = 80``, ``efSearch = 128`` (on 100,000 random 512-d
    vectors, the worst case, recall@1 0.887 for mated probes: bench/results/gallery_scale_100k.md; raise
    ``efSearch`` for more recall at less speed). IVF-PQ: ``nlist`` about ``sqrt(N)`` (a power of two, at most
    ``N / 39`` so that k-means has 39 points per list), ``m`` = the largest divisor of ``dim`` up to
    ``dim / 8`` bytes of code, 8 bits per code (fewer when there are under ``39 * 256`` vectors to train
    on), ``nprobe = 32`` lists searched, and ``rerank = 4``: ``4 k`` candidates re-scored exactly.
    """
    if kind == "exact":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if kind == "ivfpq":
        n = max(int(num_vectors), 1)
        nlist = 2 ** int(round(math.log2(max(math.sqrt(n), 1))))
        nlist = int(max(1, min(nlist, n // 39, 65536)))
        m = max(v for v in range(1, max(dim // 8, 1) + 1) if dim % v == 0)
        nbits = int(max(1, min(8, math.floor(math.log2(max(n / 39, 2))))))
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(32, nlist), "rerank": 4}
    raise UsageError(f"index kind {kind!r} is not one of {', '.join(INDEX_KINDS)}")


def inner_products(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``queries @ vectors.T``: the exact score of every query against every vector, in their dtype.

    The one brute-force kernel of the evaluation floor (the MegaFace and IJB 1:N scorers and the exact
    index call it), so that one change of it changes them all alike; cosines when both sides are
    L2-normalised."""
    return queries @ vectors.T


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` best ``(scores, ids)`` of each row, best first; equal scores in increasing id order.

    ``ids`` is broadcast against ``scores`` (one row of ids for every query is fine)."""
    ids = np.broadcast_to(ids, scores.shape)
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, 1)
        ids = np.take_along_axis(ids, part, 1)
    order = np.lexsort((ids, -scores), axis=1) if scores.size else np.zeros(scores.shape, dtype=np.int64)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    short = k - scores.shape[1]
    if short <= 0:
        return scores, ids
    n = scores.shape[0]
    return (np.concatenate([scores, np.full((n, short), -np.inf, dtype=scores.dtype)], 1),
            np.concatenate([ids, np.full((n, short), -1, dtype=np.int64)], 1))


class VectorIndex(abc.ABC):
    """The interface: ``add(vectors, ids)``, ``search(queries, k)``, ``remove(ids)``, ``to_bytes()``.

    ``kind`` (``exact|hnsw|ivfpq``), ``backend`` (``faiss|numpy``), ``params`` (the settings it was built
    with), ``exact_scores`` (False when the scores are approximations: re-score the candidates) and
    ``supports_remove`` (HNSW graphs cannot drop a node: rebuild them instead).
    """

    kind = "exact"
    backend = "numpy"
    exact_scores = True
    supports_remove = True
    params: Dict[str, int] = {}

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of vectors held."""

    @abc.abstractmethod
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (``N x dim``) under the int64 ``ids``."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` best vectors of each query, best first."""

    @abc.abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors of ``ids``; returns how many were held."""

    def to_bytes(self) -> Optional[bytes]:
        """The index as bytes to store, or None when it is rebuilt from the vectors on opening (exact)."""
        return None


class NumpyExactIndex(VectorIndex):
    """Exact search in numpy: blocks of :func:`inner_products` and a running top-k.

    Blocks are views of the arrays given to :meth:`add` (a memory-mapped segment stays on disk), so the
    index costs no copy. ``dtype``: the arithmetic (float32 for a gallery, float64 for the IJB scorer).
    """

    def __init__(self, dim: int, dtype=np.float32, block_elements: int = BLOCK_ELEMENTS):
        self.dim, self.dtype, self.block_elements = int(dim), np.dtype(dtype), int(block_elements)
        self.params = {}
        self._blocks: list = []  # (vectors, ids) pairs

    def __len__(self) -> int:
        return sum(v.shape[0] for v, _ in self._blocks)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = np.asarray(vectors)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or ids.shape != (vectors.shape[0],):
            raise ValueError(f"{vectors.shape} vectors with {ids.shape} ids for a {self.dim}-d index")
        if vectors.shape[0]:
            self._blocks.append((vectors, ids))

    def remove(self, ids: np.ndarray) -> int:
        drop = np.asarray(ids, dtype=np.int64)
        before = len(self)
        kept = []
        for v, i in self._blocks:
            keep = ~np.isin(i, drop)
            if keep.all():
                kept.append((v, i))
            elif keep.any():
                kept.append((v[keep], i[keep]))
        self._blocks = kept
        return before - len(self)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries, dtype=self.dtype)
        best_s = np.full((q.shape[0], 0), -np.inf, dtype=self.dtype)
        best_i = np.full((q.shape[0], 0), -1, dtype=np.int64)
        rows = max(1, self.block_elements // max(1, q.shape[0]))
        for vectors, ids in self._blocks:
            for a in range(0, vectors.shape[0], rows):
                s = inner_products(q, np.asarray(vectors[a:a + rows], dtype=self.dtype))
                s, i = top_k(s, ids[a:a + rows][None, :], k)
                best_s, best_i = top_k(np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1), k)
        return _pad(best_s, best_i, k)


class FaissIndex(VectorIndex):
    """A faiss index of one kind behind the interface (inner product; ids kept by ``IndexIDMap2`` for the
    flat and HNSW kinds, natively by IVF)."""

    backend = "faiss"

    def __init__(self, kind: str, index, params: Dict[str, int]):
        self.kind, self.index, self.params = kind, index, dict(params)
        self.dim = int(index.d)
        self.exact_scores = kind != "ivfpq"
        self.supports_remove = kind != "hnsw"
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        faiss = faiss_module()
        if self.kind == "hnsw":
            inner = faiss.downcast_index(self.index.index)
            inner.hnsw.efSearch = int(self.params["efSearch"])
        elif self.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape[0]:
            self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if not self.supports_remove:
            raise ValueError("an HNSW graph cannot remove vectors: build it again without them")
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if len(self) == 0:
            return _pad(np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64), k)
        scores, ids = self.index.search(q, int(k))
        scores[ids < 0] = -np.inf
        return scores, ids

    def to_bytes(self) -> Optional[bytes]:
        if self.kind == "exact":
            return None
        return faiss_module().serialize_index(self.index).tobytes()


def _faiss_new(faiss, kind: str, dim: int, params: Dict[str, int], train: np.ndarray):
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(params["efConstruction"])
        return faiss.IndexIDMap2(inner)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params["m"]), int(params["nbits"]),
                             faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # the warning about few points is ours to give (default_params)
    index.pq.cp.min_points_per_centroid = 1
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    return index


def build_index(kind: str, dim: int, vectors: Optional[np.ndarray] = None, ids: Optional[np.ndarray] = None,
                params: Optional[Dict[str, int]] = None, train_size: int = 200_000, seed: int = 0,
                dtype=np.float32) -> VectorIndex:
    """An index of ``kind`` (``exact|hnsw|ivfpq``, or ``auto`` by the number of vectors) holding ``vectors``.

    ``params`` override :func:`default_params`; IVF-PQ trains on a seeded sample of ``train_size``
    vectors. Without faiss every kind is a :class:`NumpyExactIndex` (one line says so).
    """
    n = 0 if vectors is None else int(np.asarray(vectors).shape[0])
    if kind == "auto":
        kind = choose_kind(n)
    if kind not in INDEX_KINDS:
        raise UsageError(f"--index {kind!r}: choose one of auto, {', '.join(INDEX_KINDS)}")
    faiss = faiss_module() if kind != "exact" else None
    if faiss is None:  # exact: numpy, measured faster than faiss's IndexFlatIP here (module docstring)
        index: VectorIndex = NumpyExactIndex(dim, dtype)
    else:
        given = {k: int(v) for k, v in (params or {}).items() if k in INDEX_PARAMS[kind]}  # (an auto gallery's
        merged = {**default_params(kind, n, dim), **given}  # settings may name another kind's too)
        if kind == "ivfpq" and n < 2:
            raise UsageError("an IVF-PQ index needs vectors to train on; use --index exact for an empty gallery")
        train = None
        if kind == "ivfpq":
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
            train = np.asarray(vectors)[pick]
        index = FaissIndex(kind, _faiss_new(faiss, kind, dim, merged, train), merged)
    if vectors is not None:
        index.add(vectors, np.arange(n, dtype=np.int64) if ids is None else ids)
    return index


def load_index(kind: str, data: bytes, params: Dict[str, int], where: str = "index") -> Optional[VectorIndex]:
    """The stored approximate index of ``kind`` from its bytes, or None without faiss (search exactly)."""
    faiss = faiss_module()
    if faiss is None:
        return None
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise InputFileError(f"{where} is not a readable faiss index ({first[:120]})") from None
    return FaissIndex(kind, index, params)


def recall_against_exact(search, exact_search, queries: np.ndarray, query_ids: np.ndarray,
                         k: int = 10) -> Dict[str, float]:
    """Recall of ``search(queries, k)`` against ``exact_search`` (both return ``(scores, ids)``), leave-one-out.

    The queries are indexed vectors (a seeded sample, ``query_ids`` their ids); each query's own vector is
    dropped from both answers (any index finds it at rank 1, which would inflate the recall).
    ``recall_at_1``: the fraction whose first neighbour is the exact one; ``recall_at_k``: the mean
    overlap of the ``k`` first with the exact ``k`` first (docs/gallery.md#indexes)."""
    if queries.shape[0] == 0:
        return {"k": int(k), "queries": 0, "recall_at_1": None, "recall_at_k": None}
    _, truth = exact_search(queries, k + 1)
    _, found = search(queries, k + 1)

    def drop_own(rows: np.ndarray) -> np.ndarray:
        out = np.full((rows.shape[0], k), -1, dtype=np.int64)
        for r, (row, me) in enumerate(zip(rows, query_ids)):
            row = row[row != me][:k]
            out[r, :row.size] = row
        return out

    truth, found = drop_own(truth), drop_own(found)
    at1 = float(np.mean(truth[:, 0] == found[:, 0]))
    atk = float(np.mean([np.intersect1d(t[t >= 0], f[f >= 0]).size / max(1, int((t >= 0).sum()))
                         for t, f in zip(truth, found)]))
    return {"k": int(k), "queries": int(queries.shape[0]), "recall_at_1": at1, "recall_at_k": atk}
