"""Open-set identification (1:N): a gallery of enrolled identities that users add to, remove from and search.

``Gallery.create(folder, vectors, identities)`` enrols L2-normalised embeddings (``N x d``, one identity
per row; several rows per identity are fine), ``gallery.add(...)`` / ``gallery.remove(names)`` change it,
and ``gallery.search(probes, k)`` returns, per probe and in input order, the ``k`` best identities (one entry
per identity: its best vector), best first, with cosine scores, and a decision: the best identity when its
score is above the gallery's threshold, else ``unknown`` (docs/theory.md#gallery-open-set).

- Search goes through an index of :mod:`eval.vector_index` (exact, HNSW or IVF-PQ; the kind is chosen
  by size or named); candidates of an index with approximate scores are re-scored on the stored vectors,
  so every reported score is the exact cosine.
- The threshold is calibrated at a target FPIR (default 1%) on held-out enrolments: each of a sample of
  identities is left out in turn, one of its vectors searches the others, and the best score is a
  non-mated search; the threshold lets ``floor(FPIR * n)`` of the ``n`` such scores pass. It is
  recomputed at every change and stored with the gallery.
- The model's identity (checkpoint sha256, preprocessing, flip policy, dimension) is stored too; probes
  or enrolments of another model are refused in one line.
- Storage, the journal, the writer lock and snapshot reads are :mod:`eval.gallery_store`: every add /
  remove is one atomic commit; a writer killed at any moment leaves the gallery as before or as after.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from eval import gallery_store as S
from eval import vector_index as V
from sphereface_plus.errors import InputFileError, MissingFileError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["Gallery", "UNKNOWN", "DEFAULT_FPIR", "DEFAULT_TOP_K", "normalise_embeddings", "check_same_model",
           "threshold_at_fpir"]

UNKNOWN = "unknown"
DEFAULT_FPIR = 0.01
DEFAULT_TOP_K = 5
CALIBRATION_SIZE = 1000  # held-out identities searched to set the threshold
RECALL_SAMPLE, RECALL_K = 1000, 10  # an approximate index's recall@k against exact, measured when it changes
MAX_SEGMENTS = 32  # an add that would make more merges the smallest segments with its rows
LOAD_ATTEMPTS = 5  # a reader starts again from a newer manifest when a writer removed a file under it


def normalise_embeddings(vectors, where: str = "embeddings", block: int = 65536) -> np.ndarray:
    """``N x d`` float32 rows scaled to unit length (in float64, ``block`` rows at a time: 1M x 512 needs no
    4 GB float64 copy); zero, NaN or infinite rows are one error."""
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[1] < 1:
        raise InputFileError(f"{where}: expected an N x d matrix of embeddings, got shape {x.shape}")
    out = np.empty(x.shape, dtype=np.float32)
    for a in range(0, x.shape[0], block):
        part = np.asarray(x[a:a + block], dtype=np.float64)
        norm = np.linalg.norm(part, axis=1)
        bad = np.flatnonzero(~np.isfinite(norm) | (norm == 0))
        if bad.size:
            raise InputFileError(f"{where}: row(s) that are zero or not finite (first: row {a + int(bad[0])}); every "
                                 f"embedding must be a finite non-zero vector")
        out[a:a + block] = part / norm[:, None]
    return out


def check_same_model(stored: Optional[dict], given: Optional[dict], what: str, folder) -> None:
    """Refuse ``what`` (probes, enrolments) embedded by another model than the gallery's, in one line."""
    if stored is None:
        if given is not None:
            logger.warning("gallery %s records no model: cannot check that %s come from %s", folder, what,
                           given.get("file"))
        return
    if given is None:
        raise UsageError(f"{what} do not say which model made them, and gallery {folder} holds embeddings of "
                         f"{describe_model(stored)}: pass --checkpoint with that model (it is hashed, not run)")
    # the flip policy is unknown for embeddings declared with --checkpoint: compared where both record it
    if any(stored.get(k) is not None and given.get(k) is not None and stored[k] != given[k]
           for k in ("sha256", "flip", "dim")) or not given.get("sha256"):
        raise UsageError(f"{what} come from {describe_model(given)}, but gallery {folder} holds embeddings of "
                         f"{describe_model(stored)}; scores across models mean nothing: embed them with that model")


def describe_model(model: dict) -> str:
    pre = model.get("preprocessing") or {}
    details = ", ".join(str(v) for v in (pre.get("template"), pre.get("color"), f"flip {model.get('flip')}",
                                         f"{model.get('dim')}-d") if v)
    return f"{model.get('file', '?')} (sha256 {str(model.get('sha256'))[:12]}..., {details})"


def threshold_at_fpir(nonmated: np.ndarray, fpir: float) -> Dict[str, Any]:
    """The threshold ``t`` whose decision ``score > t`` accepts at most ``floor(fpir * n)`` non-mated searches.

    ``t`` is the ``(floor(fpir * n) + 1)``-th largest non-mated best score (docs/theory.md#gallery-open-set)."""
    from eval.verification_metrics import allowed_false_accepts

    s = np.sort(np.asarray(nonmated, dtype=np.float64))[::-1]
    if s.size == 0:
        return {"threshold": None, "fpir_reached": None, "searches": 0}
    j = min(allowed_false_accepts(fpir, s.size), s.size - 1)
    t = float(s[j])
    return {"threshold": t, "fpir_reached": float(np.mean(s > t)), "searches": int(s.size)}


@dataclass
class Segment:
    """One immutable segment: its manifest entry and its (memory-mapped) rows."""

    entry: Dict[str, Any]
    vectors: np.ndarray
    ids: np.ndarray
    names: List[str]  # the segment's own identity table
    codes: np.ndarray  # per row, into ``names``
    sources: Any  # gallery_store.Strings, or a list for segments being written


class Gallery:
    """A snapshot of a gallery folder (see the module docstring); ``open``, ``create``, then search or change it.

    Attributes: ``folder``, ``manifest`` (the committed state read), ``names`` (sorted identities),
    ``index`` (the :class:`eval.vector_index.VectorIndex` searched), ``recovered`` (what the last write
    found of an interrupted one, or None).
    """

    def __init__(self, folder, manifest: dict, segments: List[Segment], index: Optional[V.VectorIndex] = None):
        self.folder, self.manifest, self.segments = Path(folder), manifest, segments
        self.recovered: Optional[str] = None
        self.dim = int(manifest["dim"])
        local = [seg.names for seg in segments]
        self.names: List[str] = sorted(set(n for names in local for n in names))
        position = {n: i for i, n in enumerate(self.names)}
        n = sum(len(seg.ids) for seg in segments)
        self.vector_ids = np.concatenate([seg.ids for seg in segments]) if segments else np.zeros(0, np.int64)
        self.identity_of = np.concatenate([np.asarray([position[x] for x in seg.names], dtype=np.int64)[seg.codes]
                                           for seg in segments]) if n else np.zeros(0, np.int64)
        self._starts = np.cumsum([0] + [len(seg.ids) for seg in segments])
        self._order = np.argsort(self.vector_ids, kind="stable")
        self._sorted_ids = self.vector_ids[self._order]
        if np.unique(self._sorted_ids).size != n:
            raise InputFileError(f"gallery {folder}: vector ids repeat across segments; the gallery is damaged")
        self._most = int(np.bincount(self.identity_of).max()) if n else 1  # most vectors of one identity
        self.index = index if index is not None else self._exact_index()

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, folder, verify: bool = True) -> "Gallery":
        """The committed gallery in ``folder`` (every file's size and, with ``verify``, sha256 checked).

        A write in progress is invisible (its files are not in the manifest yet); one whose writer died is
        named in a warning (as before or as after it), and the next write cleans it up."""
        folder = Path(folder)
        for _ in range(LOAD_ATTEMPTS):
            manifest = S.read_manifest(folder)
            if manifest is None:
                raise MissingFileError(f"{folder} holds no gallery ({S.MANIFEST} not found); create one with "
                                       f"'sphereface-plus gallery build --gallery {folder} ...'")
            try:
                gallery = cls._load(folder, manifest, verify)
            except MissingFileError:
                newer = S.read_manifest(folder)
                if newer is None or newer.get("version") == manifest["version"]:
                    raise
                continue  # a writer committed and removed a file of the version read: read the new one
            found = S.interrupted_write(folder, manifest)
            if found and found[0] != "running":
                logger.warning("%s; the next add, remove or build cleans up its files", found[1])
            return gallery
        raise InputFileError(f"gallery {folder} changed {LOAD_ATTEMPTS} times while it was read; try again")

    @classmethod
    def _load(cls, folder: Path, manifest: dict, verify: bool) -> "Gallery":
        segments = []
        for entry in manifest["segments"]:
            vectors = S.read_vectors(folder, entry["vectors"], entry["count"], manifest["dim"], verify)
            where = f"gallery {folder}: {entry['rows']['name']}"
            ids, names, codes, sources = S.decode_rows(S.read_blob(folder, entry["rows"], "row table", verify),
                                                       entry["count"], where)
            segments.append(Segment(entry, vectors, ids, names, codes, sources))
        index = None
        spec = manifest["index"]
        if spec.get("file"):
            data = S.read_blob(folder, spec["file"], "index file", verify)
            index = V.load_index(spec["kind"], data, spec["params"], f"gallery {folder}: {spec['file']['name']}")
        gallery = cls(folder, manifest, segments, index)
        if len(gallery.index) != gallery.num_vectors or gallery.num_vectors != manifest["num_vectors"]:
            raise InputFileError(f"gallery {folder}: the index holds {len(gallery.index)} vectors, the segments "
                                 f"{gallery.num_vectors}, {S.MANIFEST} says {manifest['num_vectors']}; the gallery is "
                                 f"damaged")
        return gallery

    def _exact_index(self) -> V.VectorIndex:
        index = V.NumpyExactIndex(self.dim)  # views of the memory-mapped segments: nothing is copied
        for seg in self.segments:
            index.add(seg.vectors, seg.ids)
        return index

    @property
    def num_vectors(self) -> int:
        return int(self.vector_ids.size)

    @property
    def threshold(self) -> Optional[float]:
        return self.manifest["calibration"].get("threshold")

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row positions (in segment order) of vector ids; an id not held (or -1) gives -1."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.num_vectors == 0:
            return np.full(ids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, self.num_vectors - 1)
        return np.where((ids >= 0) & (self._sorted_ids[pos] == ids), self._order[pos], -1)

    def vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of row positions (gathered from the memory-mapped segments)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        seg = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(seg):
            pick = seg == s
            out[pick] = self.segments[s].vectors[rows[pick] - self._starts[s]]
        return out

    def source_of(self, row: int) -> str:
        s = int(np.searchsorted(self._starts, row, side="right") - 1)
        return self.segments[s].sources[int(row - self._starts[s])]

    # ------------------------------------------------------------------ searching

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple:
        """``(scores, vector ids)`` of the ``k`` nearest vectors, best first, scores exact cosines."""
        if self.index.exact_scores:
            return self.index.search(queries, k)
        wide = min(self.num_vectors, k * int(self.index.params.get("rerank", 4)))
        _, cand = self.index.search(queries, max(wide, k))
        rows = self.rows_of(cand)
        vec = self.vectors_at(np.where(rows >= 0, rows, 0)).reshape(cand.shape + (self.dim,))
        scores = np.einsum("qd,qkd->qk", np.asarray(queries, np.float32), vec)
        scores[rows < 0] = -np.inf
        scores, ids = V.top_k(scores, np.where(rows >= 0, cand, -1), k)
        return scores, ids

    def _best_identities(self, q: np.ndarray, k: int) -> tuple:
        """``(codes, scores, rows)``, ``nq x k``: the best ``k`` identities of each query (-1 past the end)."""
        nq, k = q.shape[0], int(k)
        codes = np.full((nq, k), -1, np.int64)
        scores = np.full((nq, k), -np.inf, np.float32)
        rows_out = np.full((nq, k), -1, np.int64)
        pending = np.arange(nq)
        # k identities need at most k * (most vectors of one identity) vectors: usually one search is enough
        width = min(self.num_vectors, max(2 * k, k * min(self._most, 64)))
        while pending.size and width > 0:
            s, ids = self.search_vectors(q[pending], width)
            rows = self.rows_of(ids)
            c = np.where(rows >= 0, self.identity_of[np.maximum(rows, 0)], -1)
            order = np.argsort(c, axis=1, kind="stable")  # identities grouped, best score first within a group
            cs = np.take_along_axis(c, order, 1)
            first_sorted = np.ones_like(cs, dtype=bool)
            first_sorted[:, 1:] = cs[:, 1:] != cs[:, :-1]
            first = np.zeros_like(first_sorted)
            np.put_along_axis(first, order, first_sorted, 1)
            first &= c >= 0
            done = (first.sum(1) >= k) | (width >= self.num_vectors)
            pick = np.argsort(~first, axis=1, kind="stable")[:, :k]  # the first occurrences, in score order
            valid = np.take_along_axis(first, pick, 1)[done]
            sel, got = pending[done], pick.shape[1]
            codes[sel, :got] = np.where(valid, np.take_along_axis(c, pick, 1)[done], -1)
            scores[sel, :got] = np.where(valid, np.take_along_axis(s, pick, 1)[done], -np.inf)
            rows_out[sel, :got] = np.where(valid, np.take_along_axis(rows, pick, 1)[done], -1)
            pending = pending[~done]
            width = min(self.num_vectors, width * 4)
        return codes, scores, rows_out

    def search(self, probes, k: int = DEFAULT_TOP_K, threshold: Optional[float] = None, names=None,
               model: Optional[dict] = None, check_model: bool = True) -> List[Dict[str, Any]]:
        """Per probe, in input order: ``{"probe", "decision", "score", "matches": [{"identity", "score",
        "source"}]}`` with the ``k`` best identities, best first (``threshold``: this one instead of the
        calibrated one; ``names``: the probes' names; ``model``: the identity of the model that embedded
        them, checked against the gallery's)."""
        if k < 1:
            raise UsageError(f"--top-k must be at least 1, got {k}")
        if check_model:
            check_same_model(self.manifest.get("model"), model, "the probes", self.folder)
        q = normalise_embeddings(probes, "the probes")
        if q.shape[1] != self.dim:
            raise UsageError(f"the probes are {q.shape[1]}-d, gallery {self.folder} holds {self.dim}-d embeddings")
        t = self.threshold if threshold is None else float(threshold)
        names = list(names) if names is not None else [str(i) for i in range(q.shape[0])]
        codes, scores, rows = self._best_identities(q, k)
        out = []
        for i in range(q.shape[0]):
            matches = [{"identity": self.names[c], "score": float(s), "source": self.source_of(r)}
                       for c, s, r in zip(codes[i], scores[i], rows[i]) if c >= 0]
            best = matches[0]["score"] if matches else None
            known = best is not None and (t is None or best > t)
            out.append({"probe": names[i], "decision": matches[0]["identity"] if known else UNKNOWN,
                        "score": best, "matches": matches})
        return out

    # ------------------------------------------------------------------ calibration

    def nonmated_scores(self, size: int = CALIBRATION_SIZE, seed: int = 0) -> np.ndarray:
        """Best scores of leave-one-identity-out searches: one vector of each of up to ``size`` identities
        searches the gallery, and its own identity's entries are dropped."""
        if len(self.names) < 2:
            return np.zeros(0)
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(self.names), size=min(size, len(self.names)), replace=False))
        _, first_row = np.unique(self.identity_of, return_index=True)  # each identity's first row
        q = self.vectors_at(first_row[chosen])
        codes, scores, _ = self._best_identities(q, 2)
        other = np.where(codes[:, 0] == chosen, scores[:, 1], scores[:, 0])
        return other[np.isfinite(other)].astype(np.float64)

    def calibrate(self, fpir: float, size: int = CALIBRATION_SIZE, seed: int = 0) -> Dict[str, Any]:
        """The open-set threshold at ``fpir`` on held-out enrolments (docs/theory.md#gallery-open-set)."""
        scores = self.nonmated_scores(size, seed)
        out = {"fpir": float(fpir), "method": "leave-one-identity-out", **threshold_at_fpir(scores, fpir)}
        if out["threshold"] is None:
            logger.warning("gallery %s: fewer than 2 identities, no threshold: every probe is matched to its best "
                           "identity (pass --threshold to search, or enrol more people)", self.folder)
        elif out["searches"] < 1.0 / max(fpir, 1e-12):
            logger.warning("gallery %s: only %d identities to calibrate FPIR %g (needs %d): the threshold is the "
                           "largest non-mated score", self.folder, out["searches"], fpir, int(np.ceil(1 / fpir)))
        return out

    # ------------------------------------------------------------------ writing (eval.gallery_writer)

    @classmethod
    def create(cls, folder, vectors, identities: Sequence[str], sources: Optional[Sequence[str]] = None,
               model: Optional[dict] = None, index: str = "auto", fpir: float = DEFAULT_FPIR,
               index_params: Optional[Dict[str, int]] = None, calibration_size: int = CALIBRATION_SIZE,
               recall_sample: int = RECALL_SAMPLE) -> "Gallery":
        """A new gallery in ``folder`` (empty or absent) holding ``vectors`` of ``identities``.

        ``sources``: where each row came from (an image path; default ``row <i>``); ``model``: the
        identity of the model that made them (``eval.gallery_inputs.model_identity``); ``index``:
        ``auto|exact|hnsw|ivfpq`` (``auto``: by size, again at every change); ``fpir``: the open-set
        threshold's target."""
        from eval.gallery_writer import create

        return create(folder, vectors, identities, sources, model, index, fpir, index_params, calibration_size,
                      recall_sample)

    def add(self, vectors, identities: Sequence[str], sources: Optional[Sequence[str]] = None,
            model: Optional[dict] = None) -> "Gallery":
        """Enrol more rows (new or known identities) in one atomic commit; returns the new snapshot."""
        from eval.gallery_writer import add

        return add(self, vectors, identities, sources, model)

    def remove(self, names: Sequence[str]) -> "Gallery":
        """Delete every vector of ``names`` in one atomic commit; returns the new snapshot."""
        from eval.gallery_writer import remove

        return remove(self, names)

    # ------------------------------------------------------------------ reporting

    def iter_rows(self, batch: int = 100_000):
        """Every stored row, ``batch`` at a time: ``{"vector_id", "identity", "source", "vector"}`` (arrays,
        lists), e.g. to export the gallery to a vector database (docs/gallery.md#one-machine)."""
        for seg in self.segments:
            for a in range(0, len(seg.ids), batch):
                b = min(a + batch, len(seg.ids))
                yield {"vector_id": seg.ids[a:b], "identity": [seg.names[c] for c in seg.codes[a:b]],
                       "source": [seg.sources[i] for i in range(a, b)], "vector": np.asarray(seg.vectors[a:b])}


    def info(self) -> Dict[str, Any]:
        m = self.manifest
        per_identity = np.bincount(self.identity_of, minlength=len(self.names)) if self.num_vectors else np.zeros(0)
        disk = sum(f["bytes"] for s in m["segments"] for f in (s["vectors"], s["rows"]))
        disk += m["index"]["file"]["bytes"] if m["index"].get("file") else 0
        return {"folder": str(self.folder), "version": m["version"], "updated": m.get("updated"),
                "num_vectors": self.num_vectors, "num_identities": len(self.names), "dim": self.dim,
                "vectors_per_identity": {"min": int(per_identity.min()) if per_identity.size else 0,
                                         "max": int(per_identity.max()) if per_identity.size else 0},
                "model": m.get("model"), "index": {**{k: v for k, v in m["index"].items() if k != "file"},
                                                   "backend": self.index.backend},
                "calibration": m["calibration"], "segments": len(m["segments"]), "bytes_on_disk": int(disk),
                "last_write": m.get("last_write")}


