"""A gallery's files on disk: immutable checksummed data files, one manifest whose atomic replacement is the
one commit point, a journal of the write in progress, and the writer lock (docs/gallery.md#storage).

::

    DIR/gallery.json                   the manifest: model, segments, index, calibration, and its own sha256
    DIR/journal.json                   only while an add / remove / build runs (or after one was killed)
    DIR/.gallery.lock                  the writer lock (flock; the kernel drops it when the writer dies)
    DIR/data/seg-<v>-<n>.vectors.npy   N x d float32 L2-normalised embeddings (memory-mapped when read)
    DIR/data/seg-<v>-<n>.rows.npz      their vector ids, identities and sources (no pickled objects)
    DIR/data/index-<v>.faiss           the approximate index, when there is one (exact: rebuilt on open)

A write (``<v>`` is the version it makes) takes the lock, records in the journal which files it will
create, writes them (each atomically, its size and sha256 kept for the manifest), then replaces
``gallery.json`` atomically: that rename is the commit. Afterwards it removes the files no manifest refers
to any more and the journal. Killed at any moment, the folder holds either the old manifest (and maybe
some new files nobody refers to) or the new one: the gallery is exactly as before or as after the write.
The next writer removes the leftovers and says which (:func:`recover`); a reader says it too
(:func:`interrupted_write`) and reads its snapshot: the manifest it read and the files it names, which
nothing ever changes in place (a file a concurrent writer removed after reading means a newer version:
the reader starts again from the new manifest).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sphereface_plus.errors import InputFileError, MissingFileError
from sphereface_plus.utils import atomic_open, atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

FORMAT = "sphereface-plus-gallery"
FORMAT_VERSION = 1
MANIFEST = "gallery.json"
JOURNAL = "journal.json"
LOCK = ".gallery.lock"
DATA = "data"
#: the largest manifest or journal read (a foreign file cannot make a reader allocate more)
MAX_JSON_BYTES = 256 << 20
#: ``point:kill`` / ``point:sleep=SECONDS`` (comma separated, ``*`` for every point): the crash tests'
#: way to stop a writer at a named step (``journal``, ``segment``, ``index``, ``commit``, ``committed``)
FAULT_ENV = "SPHEREFACE_PLUS_GALLERY_FAULT"


def fault_point(name: str) -> None:
    """Sleep or die here when :data:`FAULT_ENV` names this point (crash-safety tests; a no-op otherwise)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, action = item.strip().partition(":")
        if point not in (name, "*"):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep="):
            time.sleep(float(action[len("sleep="):]))


# --------------------------------------------------------------------------- checksummed files


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class _HashingWriter:
    """A write-only file object that hashes and counts what goes through it (np.save streams into it)."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self.sha.update(data)
        self.size += data.nbytes
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def data_path(folder, name: str) -> Path:
    return Path(folder) / DATA / name


def write_vectors(folder, name: str, vectors: np.ndarray) -> Dict[str, Any]:
    """Write ``vectors`` as float32 ``.npy`` atomically, streaming; returns its manifest entry."""
    with atomic_open(data_path(folder, name), "wb") as fh:
        w = _HashingWriter(fh)
        np.save(w, np.ascontiguousarray(vectors, dtype="<f4"), allow_pickle=False)
    return {"name": name, "bytes": w.size, "sha256": w.sha.hexdigest()}


def write_blob(folder, name: str, data: bytes) -> Dict[str, Any]:
    atomic_write_bytes(data_path(folder, name), data)
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check_entry(folder, entry: Dict[str, Any], what: str, verify: bool) -> Path:
    """The path of a manifest entry, after its size (and with ``verify`` its sha256) are checked."""
    path = data_path(folder, entry["name"])
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingFileError(f"gallery {folder}: {what} {path.name} is missing (listed in {MANIFEST}); the gallery "
                               f"is damaged: restore the folder from a backup") from None
    if size != entry["bytes"]:
        raise InputFileError(f"gallery {folder}: {what} {path.name} has {size} bytes, {MANIFEST} says "
                             f"{entry['bytes']}; the file is damaged (nothing was changed): restore the folder from "
                             f"a backup")
    if verify:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != entry["sha256"]:
            raise InputFileError(f"gallery {folder}: {what} {path.name} does not match its sha256 in {MANIFEST}; the "
                                 f"file is damaged (nothing was changed): restore the folder from a backup")
    return path


def read_vectors(folder, entry: Dict[str, Any], rows: int, dim: int, verify: bool = True) -> np.ndarray:
    """The memory-mapped ``rows x dim`` float32 vectors of a segment, checked against the manifest."""
    path = _check_entry(folder, entry, "vector file", verify)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputFileError(f"gallery {folder}: vector file {path.name} is not a readable .npy ({exc})") from None
    if arr.dtype != np.dtype("<f4") or arr.shape != (rows, dim):
        raise InputFileError(f"gallery {folder}: vector file {path.name} holds {arr.dtype} {arr.shape}, {MANIFEST} "
                             f"says float32 ({rows}, {dim}); the gallery is damaged")
    return arr


def read_blob(folder, entry: Dict[str, Any], what: str, verify: bool = True) -> bytes:
    """The bytes of a small data file (a row table, an index), its size and sha256 checked."""
    path = _check_entry(folder, entry, what, verify=False)
    data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InputFileError(f"gallery {folder}: {what} {path.name} does not match its sha256 in {MANIFEST}; the "
                             f"file is damaged (nothing was changed): restore the folder from a backup")
    return data


# --------------------------------------------------------------------------- segment rows


def _pack_strings(values: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


class Strings:
    """UTF-8 strings stored as one byte array and offsets, decoded one at a time (1M sources stay compact)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, where: str):
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != blob.size or \
                (np.diff(offsets) < 0).any():
            raise InputFileError(f"{where}: string offsets do not fit the {blob.size}-byte table; the file is damaged")
        self.blob, self.offsets, self.where = blob, offsets, where

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, i: int) -> str:
        try:
            return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise InputFileError(f"{self.where}: string {i} is not UTF-8; the file is damaged") from None

    def subset(self, keep: np.ndarray) -> List[str]:
        return [self[int(i)] for i in np.flatnonzero(keep)]

    def all(self) -> List[str]:
        return [self[i] for i in range(len(self))]


def encode_rows(vector_ids: np.ndarray, identities: Sequence[str], sources: Sequence[str]) -> bytes:
    """The ``.rows.npz`` bytes of a segment: ids, identity codes into its own name table, sources."""
    names, codes = np.unique(np.asarray(list(identities), dtype=object).astype(str), return_inverse=True)
    name_blob, name_off = _pack_strings(list(names))
    src_blob, src_off = _pack_strings(list(sources))
    buf = io.BytesIO()
    np.savez(buf, vector_ids=np.asarray(vector_ids, dtype="<i8"), identity_codes=codes.astype("<i4"),
             names_blob=name_blob, names_offsets=name_off, sources_blob=src_blob, sources_offsets=src_off)
    return buf.getvalue()


def decode_rows(data: bytes, rows: int, where: str) -> Tuple[np.ndarray, List[str], np.ndarray, Strings]:
    """``(vector ids, the segment's identity names, per-row codes into them, sources)`` of ``.rows.npz`` bytes."""
    import zipfile

    try:  # members must be stored, not compressed: what is read is bounded by the file's own size
        if any(m.compress_type != zipfile.ZIP_STORED for m in zipfile.ZipFile(io.BytesIO(data)).infolist()):
            raise InputFileError(f"{where}: compressed members; a gallery row table is written uncompressed")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in ("vector_ids", "identity_codes", "names_blob", "names_offsets",
                                                    "sources_blob", "sources_offsets")}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputFileError(f"{where} is not a readable row table ({type(exc).__name__}); the gallery is damaged") \
            from None
    ids, codes = arrays["vector_ids"].astype(np.int64), arrays["identity_codes"].astype(np.int64)
    names = Strings(arrays["names_blob"].astype(np.uint8), arrays["names_offsets"].astype(np.int64), where)
    sources = Strings(arrays["sources_blob"].astype(np.uint8), arrays["sources_offsets"].astype(np.int64), where)
    if ids.shape != (rows,) or codes.shape != (rows,) or len(sources) != rows or \
            (rows and (codes.min() < 0 or codes.max() >= len(names))):
        raise InputFileError(f"{where}: the row table does not hold {rows} rows as {MANIFEST} says; the gallery is "
                             f"damaged")
    return ids, names.all(), codes, sources


# --------------------------------------------------------------------------- the manifest


def read_json_file(path: Path, what: str) -> Optional[dict]:
    """The JSON object in ``path`` (None when the file does not exist); a damaged file is one error line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_JSON_BYTES:
        raise InputFileError(f"{path}: {size} bytes, more than a gallery {what} can be ({MAX_JSON_BYTES}); it is not "
                             f"a gallery file")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: the gallery {what} is damaged ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:80]}); nothing was changed: restore it from a backup") \
            from None
    if not isinstance(obj, dict):
        raise InputFileError(f"{path}: the gallery {what} is damaged (not a JSON object)")
    return obj


def read_manifest(folder) -> Optional[dict]:
    """The committed manifest of ``folder`` (None when it holds no gallery), its checksum and format checked."""
    path = Path(folder) / MANIFEST
    obj = read_json_file(path, "manifest")
    if obj is None:
        return None
    if obj.get("format") != FORMAT:
        raise InputFileError(f"{path} is not a gallery manifest (format {obj.get('format')!r}, expected {FORMAT!r})")
    if not isinstance(obj.get("format_version"), int) or obj["format_version"] > FORMAT_VERSION:
        raise InputFileError(f"{path}: gallery format version {obj.get('format_version')!r} is newer than this "
                             f"toolkit reads ({FORMAT_VERSION}); upgrade sphereface-plus")
    stored = obj.pop("sha256", None)
    if stored != hashlib.sha256(_canonical(obj)).hexdigest():
        raise InputFileError(f"{path}: the manifest does not match its sha256 (the file is damaged or was edited); "
                             f"nothing was changed: restore it from a backup")
    problem = _manifest_problem(obj)
    if problem:
        raise InputFileError(f"{path}: {problem}; it was not written by this toolkit")
    return obj


def _file_entry_problem(entry: Any) -> Optional[str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
            not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
        return "a data file entry lacks name, bytes or sha256"
    name = entry["name"]
    if name.startswith(".") or not name.replace("-", "").replace(".", "").replace("_", "").isalnum():
        return f"data file name {name!r} is not a plain file name"
    return None


def _manifest_problem(m: dict) -> Optional[str]:
    """Why a manifest (its checksum right) cannot be a gallery's, or None: keys, types, plain file names."""
    for key, kind in (("version", int), ("dim", int), ("segments", list), ("index", dict), ("settings", dict),
                      ("next_vector_id", int), ("num_vectors", int), ("num_identities", int),
                      ("calibration", dict)):
        if not isinstance(m.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    if m["dim"] < 1:
        return f"dimension {m['dim']}"
    for seg in m["segments"]:
        if not isinstance(seg, dict) or not isinstance(seg.get("count"), int) or seg["count"] < 0:
            return "a segment lacks its row count"
        problem = _file_entry_problem(seg.get("vectors")) or _file_entry_problem(seg.get("rows"))
        if problem:
            return problem
    if m["index"].get("file") is not None:
        return _file_entry_problem(m["index"]["file"])
    return None


def commit_manifest(folder, manifest: dict) -> None:
    """Write the manifest with its sha256 and replace ``gallery.json`` atomically: THE commit point."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    data = json.dumps({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}, indent=1).encode() + b"\n"
    fault_point("commit")
    atomic_write_bytes(Path(folder) / MANIFEST, data)
    _fsync_dir(Path(folder))
    fault_point("committed")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a crash of the machine, not only of the process)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def referenced_files(manifest: Optional[dict]) -> List[str]:
    """Every data file name a manifest refers to."""
    if not manifest:
        return []
    names = [f["name"] for seg in manifest["segments"] for f in (seg["vectors"], seg["rows"])]
    if manifest["index"].get("file"):
        names.append(manifest["index"]["file"]["name"])
    return names


# --------------------------------------------------------------------------- journal, recovery, lock


def begin_write(folder, op: str, version_before: int, version_after: int, files: Sequence[str],
                summary: str) -> None:
    """Record the write about to start (the files it will create) before creating any of them."""
    atomic_write_json(Path(folder) / JOURNAL, {
        "op": op, "version_before": int(version_before), "version_after": int(version_after), "files": list(files),
        "summary": summary, "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    _fsync_dir(Path(folder))
    fault_point("journal")


def end_write(folder, manifest: dict) -> None:
    """After the commit: remove the files no manifest refers to, then the journal."""
    collect_garbage(folder, manifest)
    fault_point("cleanup")
    try:
        os.unlink(Path(folder) / JOURNAL)
    except FileNotFoundError:
        pass


def collect_garbage(folder, manifest: Optional[dict]) -> List[str]:
    """Remove data files ``manifest`` does not refer to and temporary files of interrupted atomic writes."""
    keep = set(referenced_files(manifest))
    removed = []
    for where in (Path(folder) / DATA, Path(folder)):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            if (where.name == DATA and p.name not in keep) or stale_tmp:
                try:
                    p.unlink()
                    removed.append(p.name)
                except OSError:  # pragma: no cover - vanished
                    pass
    return removed


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def interrupted_write(folder, manifest: Optional[dict]) -> Optional[Tuple[str, str]]:
    """``(state, message)`` when the journal shows a write: ``running`` (its writer is alive), or ``before`` /
    ``after`` (its writer died: the gallery is as before it, or as after it), else None."""
    try:
        journal = read_json_file(Path(folder) / JOURNAL, "journal")
    except InputFileError:
        journal = {"op": "write", "summary": "unknown (its journal is damaged)"}
    if journal is None:
        return None
    if journal.get("host") == socket.gethostname() and _pid_alive(journal.get("pid")) and \
            journal.get("pid") != os.getpid():
        return "running", f"a {journal.get('op', 'write')} by process {journal.get('pid')} is in progress"
    version = manifest["version"] if manifest else 0
    after = version == journal.get("version_after")
    state = "after" if after else "before"
    what = f"the {journal.get('op', 'write')} ({journal.get('summary', '')}) started {journal.get('started', '?')} " \
           f"by process {journal.get('pid', '?')}"
    if manifest is None:
        where = "the folder holds no gallery yet"
    else:
        where = (f"the gallery is as {'after' if after else 'before'} it: version {version}, "
                 f"{manifest['num_vectors']} vectors of {manifest['num_identities']} identities")
    verb = "had committed before it was interrupted" if after else "was interrupted before it committed"
    return state, f"{what} {verb}: {where}"


def recover(folder, manifest: Optional[dict]) -> Optional[str]:
    """With the writer lock held: finish or roll back a write whose writer died, and say which."""
    found = interrupted_write(folder, manifest)
    removed = collect_garbage(folder, manifest)
    if found is None:
        if removed:
            logger.info("removed %d file(s) no manifest refers to: %s", len(removed), ", ".join(removed[:5]))
        return None
    _, message = found
    try:
        os.unlink(Path(folder) / JOURNAL)
    except FileNotFoundError:
        pass
    message += f" ({len(removed)} leftover file(s) removed)"
    logger.warning("%s", message)
    return message


def writer_lock(folder, command: str):
    """The gallery's writer lock (acquire / release): a second writer is refused with the holder's details."""
    from sphereface_plus.engine.run_folder import RunLock

    return RunLock(folder, command, name=LOCK, holder="another gallery writer",
                   busy_fix="wait for it to finish (searches may go on meanwhile); one add, remove or build at a time")
