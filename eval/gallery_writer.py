"""The writers of a gallery (``Gallery.create``, ``.add``, ``.remove``): each one atomic commit.

A write holds the writer lock, finishes or rolls back a write whose writer died (saying which), reads the
committed state afresh, checks every input before it creates a file, then follows the protocol of
:mod:`eval.gallery_store`: journal, new immutable files, the new manifest by atomic rename, clean-up.
Segments are never changed in place: an add writes its rows as a new segment (merging the smallest ones
when there would be more than :data:`eval.gallery.MAX_SEGMENTS`), a remove writes the segments that held
the person's rows again without them, so after the commit no file holds any of their vectors.
The index follows: exact is rebuilt from the vectors on opening; an HNSW graph takes the new vectors
(and is rebuilt after a remove: it cannot drop a node); IVF-PQ adds and removes in place; ``auto``
galleries change kind when their size crosses a bound (:func:`eval.vector_index.choose_kind`).
"""
from __future__ import annotations

import difflib
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from eval import gallery_store as S
from eval import vector_index as V
from eval.gallery import (CALIBRATION_SIZE, MAX_SEGMENTS, RECALL_K, RECALL_SAMPLE, Gallery, Segment,
                          check_same_model, normalise_embeddings)
from sphereface_plus.errors import InputFileError, UsageError

logger = logging.getLogger(__name__)

#: new rows of a segment: (vectors, vector ids, identities, sources)
Rows = Tuple[np.ndarray, np.ndarray, List[str], List[str]]


def check_identities(identities: Sequence[str], n: int, where: str = "the identities") -> List[str]:
    """``n`` identity names, each a non-empty line of text (surrounding spaces dropped)."""
    names = [str(v).strip() for v in identities]
    if len(names) != n:
        raise InputFileError(f"{where}: {len(names)} identities for {n} embeddings; give one identity per row")
    bad = [i for i, v in enumerate(names) if not v or "\n" in v or "\r" in v]
    if bad:
        raise InputFileError(f"{where}: identity {bad[0] + 1} is empty or spans lines; every row needs a name")
    return names


def _checked_rows(vectors, identities, sources, dim: Optional[int]) -> Tuple[np.ndarray, List[str], List[str]]:
    x = normalise_embeddings(vectors, "the embeddings")
    if x.shape[0] == 0:
        raise InputFileError("no embeddings to enrol")
    if dim is not None and x.shape[1] != dim:
        raise UsageError(f"the embeddings are {x.shape[1]}-d, the gallery holds {dim}-d ones (another model?)")
    names = check_identities(identities, x.shape[0])
    src = [f"row {i}" for i in range(x.shape[0])] if sources is None else [str(s) for s in sources]
    if len(src) != x.shape[0]:
        raise InputFileError(f"{len(src)} sources for {x.shape[0]} embeddings")
    return x, names, src


@contextmanager
def _writing(folder: Path, command: str) -> Iterator[Optional[str]]:
    """The writer lock held, an interrupted write cleaned up (yields what was found, or None).

    A write that fails with an exception (a full disk, say) is rolled back (or, past its commit, finished)
    at once, so it leaves no files behind; a killed one is cleaned up by the next writer."""
    lock = S.writer_lock(folder, command).acquire()
    try:
        yield S.recover(folder, S.read_manifest(folder))
    except BaseException:
        try:
            S.recover(folder, S.read_manifest(folder))
        except (OSError, InputFileError) as exc:  # the original error is the one to report
            logger.warning("could not clean up after the failed write: %s", exc)
        raise
    finally:
        lock.release()


def _settings(index: str, fpir: float, index_params, calibration_size: int, recall_sample: int) -> Dict[str, Any]:
    if index != "auto" and index not in V.INDEX_KINDS:
        raise UsageError(f"--index {index!r}: choose one of auto, {', '.join(V.INDEX_KINDS)}")
    if not 0 < fpir < 1:
        raise UsageError(f"--fpir must lie in (0, 1), got {fpir}")
    allowed = [p for names in V.INDEX_PARAMS.values() for p in names] if index == "auto" else V.INDEX_PARAMS[index]
    wrong = [p for p in (index_params or {}) if p not in allowed]
    if wrong:
        raise UsageError(f"--index-param {wrong[0]} is not a setting of the {index} index (its settings: "
                         f"{', '.join(allowed) or 'none'})")
    return {"index": index, "index_params": dict(index_params or {}), "fpir": float(fpir),
            "calibration_size": int(calibration_size), "recall_sample": int(recall_sample)}


def create(folder, vectors, identities, sources=None, model=None, index: str = "auto", fpir: float = 0.01,
           index_params=None, calibration_size: int = CALIBRATION_SIZE, recall_sample: int = RECALL_SAMPLE) -> Gallery:
    folder = Path(folder)
    settings = _settings(index, fpir, index_params, calibration_size, recall_sample)
    x, names, src = _checked_rows(vectors, identities, sources, None)
    if model is not None and model.get("dim") not in (None, x.shape[1]):
        raise UsageError(f"the embeddings are {x.shape[1]}-d but the model makes {model['dim']}-d ones")
    check_new_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _writing(folder, "gallery build") as recovered:
        check_new_folder(folder)  # another build may have committed meanwhile
        base = {"format": S.FORMAT, "format_version": S.FORMAT_VERSION, "version": 0,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "dim": int(x.shape[1]), "model": model,
                "settings": settings, "segments": [], "next_vector_id": 0, "index": {"kind": "exact"}}
        new = [(x, np.arange(x.shape[0], dtype=np.int64), names, src)]
        g = _commit(folder, base, [], new, "build", _summary("enrol", names), None, None, recovered)
    return g


def check_new_folder(folder) -> None:
    """Refuse a ``build`` into a file, a gallery, or a folder holding other files (nothing is overwritten)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--gallery {folder} is a file, not a folder; choose another path")
    if S.read_manifest(folder) is not None:
        raise UsageError(f"{folder} already holds a gallery; enrol more with 'sphereface-plus gallery add --gallery "
                         f"{folder} ...', or build the new one in another folder")
    ours = {S.JOURNAL, S.LOCK, S.DATA}  # (what an interrupted build leaves: it is cleaned up)
    other = sorted(p.name for p in folder.iterdir() if p.name not in ours and not p.name.endswith(".tmp")) \
        if folder.is_dir() else []
    if other:
        raise UsageError(f"{folder} is not empty ({', '.join(other[:3])}{' ...' if len(other) > 3 else ''}); a gallery "
                         f"needs a folder of its own: choose a new or empty one")


def _summary(verb: str, names: Sequence[str]) -> str:
    distinct = list(dict.fromkeys(names))
    shown = ", ".join(distinct[:3]) + (" ..." if len(distinct) > 3 else "")
    return f"{verb} {len(names)} vectors of {len(distinct)} identities: {shown}"


def _fresh(gallery: Gallery) -> Gallery:
    """The committed state under the lock: ``gallery`` itself when no other writer committed since it was read
    (its files were checked then; its index is copied, so that a failed write leaves it whole), else the
    newer version, read and checked."""
    manifest = S.read_manifest(gallery.folder)
    if manifest is None:
        raise InputFileError(f"{gallery.folder} no longer holds a gallery ({S.MANIFEST} is gone)")
    if manifest == gallery.manifest:
        index = gallery.index
        if isinstance(index, V.FaissIndex):
            index = V.FaissIndex(index.kind, V.faiss_module().clone_index(index.index), index.params)
        return Gallery(gallery.folder, manifest, gallery.segments, index)
    return Gallery._load(gallery.folder, manifest, verify=True)


def add(gallery: Gallery, vectors, identities, sources=None, model=None) -> Gallery:
    x, names, src = _checked_rows(vectors, identities, sources, gallery.dim)
    with _writing(gallery.folder, "gallery add") as recovered:
        g = _fresh(gallery)
        check_same_model(g.manifest.get("model"), model, "the new embeddings", g.folder)
        first = int(g.manifest["next_vector_id"])
        ids = np.arange(first, first + x.shape[0], dtype=np.int64)
        kept, new = list(g.segments), [(x, ids, names, src)]
        if len(kept) + 1 > MAX_SEGMENTS:  # merge the smallest segments with the new rows: one segment instead
            kept.sort(key=lambda seg: seg.entry["count"])
            cut = len(kept) + 1 - MAX_SEGMENTS
            merged, kept = kept[:cut], kept[cut:]
            new = [_merge([_segment_rows(seg) for seg in merged] + new)]
            kept.sort(key=lambda seg: seg.entry["name"])
        return _commit(g.folder, g.manifest, kept, new, "add", _summary("enrol", names), g, None, recovered,
                       added=(x, ids))


def remove(gallery: Gallery, names: Sequence[str]) -> Gallery:
    wanted = list(dict.fromkeys(str(n).strip() for n in names))
    if not wanted:
        raise UsageError("name at least one identity to remove (--id NAME)")
    with _writing(gallery.folder, "gallery remove") as recovered:
        g = _fresh(gallery)
        position = {n: i for i, n in enumerate(g.names)}
        unknown = [n for n in wanted if n not in position]
        if unknown:
            near = difflib.get_close_matches(unknown[0], g.names, n=3)
            raise UsageError(f"gallery {g.folder} holds no identity {unknown[0]!r}"
                             + (f" (did you mean {', '.join(repr(v) for v in near)}?)" if near else "")
                             + (f", nor {len(unknown) - 1} more of the names given" if len(unknown) > 1 else "")
                             + "; nothing was removed ('gallery info' counts the identities)")
        codes = np.asarray([position[n] for n in wanted], dtype=np.int64)
        drop_row = np.isin(g.identity_of, codes)
        kept, new = [], []
        for s, seg in enumerate(g.segments):
            drop = drop_row[g._starts[s]:g._starts[s + 1]]
            if not drop.any():
                kept.append(seg)
            elif not drop.all():
                new.append(_segment_rows(seg, ~drop))
        removed = g.vector_ids[drop_row]
        return _commit(g.folder, g.manifest, kept, new, "remove", _summary("remove", [g.names[c] for c in
                                                                                     g.identity_of[drop_row]]),
                       g, removed, recovered)


def _segment_rows(seg: Segment, keep: Optional[np.ndarray] = None) -> Rows:
    keep = np.ones(len(seg.ids), dtype=bool) if keep is None else keep
    sources = seg.sources.subset(keep) if hasattr(seg.sources, "subset") else \
        [v for v, k in zip(seg.sources, keep) if k]
    identities = [seg.names[c] for c in seg.codes[keep]]
    return np.asarray(seg.vectors[keep], dtype=np.float32), seg.ids[keep], identities, sources


def _merge(parts: List[Rows]) -> Rows:
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [v for p in parts for v in p[2]], [v for p in parts for v in p[3]])


def _resolve_kind(settings: Dict[str, Any], n: int) -> str:
    kind = V.choose_kind(n) if settings["index"] == "auto" else settings["index"]
    if V.faiss_module() is None or (kind == "ivfpq" and n < 2):  # (IVF-PQ trains on the vectors it holds)
        return "exact"
    return kind


def _commit(folder: Path, base: dict, kept: List[Segment], new: List[Rows], op: str, summary: str,
            old: Optional[Gallery], removed: Optional[np.ndarray], recovered: Optional[str],
            added: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Gallery:
    """Write ``new`` segments and the index, calibrate, commit the manifest, clean up (module docstring)."""
    version = int(base["version"]) + 1
    settings = base["settings"]
    n = sum(seg.entry["count"] for seg in kept) + sum(len(r[1]) for r in new)
    kind = _resolve_kind(settings, n)
    seg_names = [f"seg-{version:06d}-{i}" for i in range(len(new))]
    index_name = f"index-{version:06d}.faiss" if kind != "exact" else None
    files = [f"{s}.{ext}" for s in seg_names for ext in ("vectors.npy", "rows.npz")] + ([index_name] if index_name
                                                                                         else [])
    S.begin_write(folder, op, base["version"], version, files, summary)
    segments = list(kept)
    for name, (x, ids, identities, sources) in zip(seg_names, new):
        vec_entry = S.write_vectors(folder, f"{name}.vectors.npy", x)
        S.fault_point("segment")
        row_entry = S.write_blob(folder, f"{name}.rows.npz", S.encode_rows(ids, identities, sources))
        S.fault_point("segment")
        table, codes = np.unique(np.asarray(identities, dtype=object).astype(str), return_inverse=True)
        segments.append(Segment({"name": name, "count": int(len(ids)), "vectors": vec_entry, "rows": row_entry},
                                x, ids, [str(v) for v in table], codes, sources))
    index, rebuilt = _index_for(kind, settings, segments, old, removed, added, base)
    spec: Dict[str, Any] = {"kind": kind, "requested": settings["index"], "params": {}}
    if index is not None:
        spec["params"] = index.params
        spec["file"] = S.write_blob(folder, index_name, index.to_bytes())
        S.fault_point("index")
    manifest = {**base, "version": version, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
                "segments": [seg.entry for seg in segments],
                "next_vector_id": int(max([int(base["next_vector_id"])] + [int(r[1].max()) + 1 for r in new if
                                                                           len(r[1])])),
                "index": spec, "last_write": {"op": op, "summary": summary, "version": version}}
    g = Gallery(folder, {**manifest, "calibration": {}}, segments, index)
    manifest["num_vectors"], manifest["num_identities"] = g.num_vectors, len(g.names)
    if index is not None:
        spec["recall"] = base["index"].get("recall") if not rebuilt and base["index"].get("recall") else \
            _recall(g, settings)
    manifest["calibration"] = g.calibrate(settings["fpir"], settings["calibration_size"])
    g.manifest = manifest
    S.commit_manifest(folder, manifest)
    S.end_write(folder, manifest)
    g.recovered = recovered
    logger.info("gallery %s version %d: %s (%d vectors, %d identities, %s index)", folder, version, summary,
                g.num_vectors, len(g.names), kind)
    return g


def _index_for(kind: str, settings: Dict[str, Any], segments: List[Segment], old: Optional[Gallery],
               removed: Optional[np.ndarray], added, base: dict) -> Tuple[Optional[V.VectorIndex], bool]:
    """``(the approximate index to store or None for exact, whether it was built anew)``."""
    if kind == "exact":
        return None, False
    previous = old.index if old is not None and isinstance(old.index, V.FaissIndex) and old.index.kind == kind \
        else None
    if previous is not None and (removed is None or previous.supports_remove):
        if removed is not None and removed.size:
            previous.remove(removed)
        if added is not None:
            previous.add(*added)
        return previous, False
    dim = segments[0].vectors.shape[1] if segments else int(base["dim"])
    vectors = np.concatenate([np.asarray(seg.vectors) for seg in segments]) if segments else np.zeros((0, dim),
                                                                                                       np.float32)
    ids = np.concatenate([seg.ids for seg in segments]) if segments else np.zeros(0, np.int64)
    logger.info("building the %s index over %d vectors", kind, vectors.shape[0])
    return V.build_index(kind, dim, vectors, ids, settings["index_params"] or None), True


def _recall(g: Gallery, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The approximate index's recall@k against the exact search, leave-one-out on a sample of the gallery."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(g.num_vectors, size=min(settings["recall_sample"], g.num_vectors), replace=False))
    exact = V.NumpyExactIndex(g.dim)
    for seg in g.segments:
        exact.add(seg.vectors, seg.ids)
    k = min(RECALL_K, max(g.num_vectors - 1, 1))
    out = V.recall_against_exact(g.search_vectors, exact.search, g.vectors_at(rows), g.vector_ids[rows], k)
    logger.info("%s index: recall@1 %.4f, recall@%d %.4f against exact (%d queries, leave-one-out)",
                g.index.kind, out["recall_at_1"], out["k"], out["recall_at_k"], out["queries"])
    return {**out, "measured_at_version": g.manifest["last_write"]["version"], "num_vectors": g.num_vectors}
