"""Verification pairs: LFW ``pairs.txt``, generic pairs files, insightface ``.bin`` packs, folders.

Every source ends up as a list of :class:`Pair` (two image keys, same/different, fold index); the
k-fold protocol in :mod:`eval.verification_metrics` only needs the fold indices.

- LFW View 2 (docs/theory.md#lfw-protocol): header ``10 300``, then per fold 300 matched ``name n1 n2`` and 300
  mismatched ``name1 n1 name2 n2`` lines; the fold of line ``i`` (1-based after the header) is
  ``ceil(i / 600)``.
- Generic files: ``path1 path2 same`` per line, tab/space or comma separated, optional 4th column
  ``fold``; without it pairs are spread over the folds stratified by label (the i-th positive in
  fold ``i % k``, likewise the negatives), so a file that lists all positives first still gives
  balanced folds.
- insightface packs: a pickle of ``(list of JPEG bytes, list of bools)``, consecutive images form a
  pair; read with a restricted unpickler (an ordinary ``pickle.load`` would run any code the file
  names). Folds are contiguous blocks as in insightface's ``KFold(10, shuffle=False)``, which for
  ``lfw.bin`` are the LFW folds.
- Identity folders: seeded, balanced, person-disjoint folds of positive and negative pairs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep.image_files import IMAGE_EXTENSIONS
from sphereface_plus.errors import InputFileError, MissingFileError
from sphereface_plus.safe_pickle import UnsafePickleError, restricted_loads
from sphereface_plus.utils import read_text

logger = logging.getLogger(__name__)


_TRUE = {"1", "true", "t", "yes", "y", "same", "match", "matched", "genuine", "positive"}
_HEADER_NAMES = {"path1", "path_1", "image1", "image_1", "img1", "file1", "left", "first"}
_FALSE = {"0", "false", "f", "no", "n", "diff", "different", "mismatch", "mismatched", "impostor", "negative"}


class Pair(NamedTuple):
    """One verification trial: image keys (relative paths or pack indices), label, fold index."""

    path1: str
    path2: str
    same: bool
    fold: int


class PairsFormatError(InputFileError):
    """A pairs file line or pack that cannot be read; the message names the file and line."""


def image_extension(ext: str) -> str:
    """``.png`` for ``png`` or ``.png``: an extension with its dot (what ``--ext`` accepts either way)."""
    ext = str(ext).strip()
    return ext if not ext or ext.startswith(".") else "." + ext


def lfw_image_path(name: str, number: int, ext: str = ".jpg") -> str:
    """``Name/Name_0001.jpg``: the relative path of LFW image ``number`` of ``name`` (``ext`` with or
    without its dot)."""
    return f"{name}/{name}_{int(number):04d}{image_extension(ext)}"


def _int_field(value: str, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise PairsFormatError(f"{where}: {value!r} is not an image number") from None
    if n < 1:
        raise PairsFormatError(f"{where}: image number {n} must be >= 1")
    return n


def parse_lfw_pairs(path, ext: str = ".jpg") -> List[Pair]:
    """Parse an LFW View-2 ``pairs.txt`` into 6,000 :class:`Pair` with 0-based fold indices.

    ``ext`` (``.png`` or ``png``) replaces ``.jpg`` when the aligned crops were saved in another format. Raises
    :class:`PairsFormatError` naming the line for a wrong field count or a bad number, and when the
    number of lines does not match the header.
    """
    path = Path(path)
    try:
        lines = read_text(path, "pairs file").splitlines()
    except FileNotFoundError:
        raise MissingFileError(f"pairs file {path} does not exist") from None
    lines = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not lines:
        raise PairsFormatError(f"{path} is empty")
    header_no, header = lines[0]
    fields = header.split()
    try:
        n_folds, n_per = (int(v) for v in fields)
    except ValueError:
        raise PairsFormatError(
            f"{path}:{header_no}: the header must be '<folds> <pairs per class>' (LFW: '10 300'), got {header!r}"
        ) from None
    body = lines[1:]
    block = 2 * n_per
    if len(body) != n_folds * block:
        raise PairsFormatError(
            f"{path}: the header promises {n_folds} folds x {block} pairs = {n_folds * block} lines, "
            f"found {len(body)}"
        )
    pairs: List[Pair] = []
    for i, (line_no, line) in enumerate(body):
        f = line.split()
        where = f"{path}:{line_no}"
        fold = i // block  # fold of line i (1-based) = ceil(i / 600), here 0-based
        if len(f) == 3:
            pairs.append(Pair(lfw_image_path(f[0], _int_field(f[1], where), ext),
                              lfw_image_path(f[0], _int_field(f[2], where), ext), True, fold))
        elif len(f) == 4:
            pairs.append(Pair(lfw_image_path(f[0], _int_field(f[1], where), ext),
                              lfw_image_path(f[2], _int_field(f[3], where), ext), False, fold))
        else:
            raise PairsFormatError(
                f"{where}: expected 3 fields 'name n1 n2' (same person) or 4 fields 'name1 n1 name2 n2' "
                f"(different people), got {len(f)}: {line.strip()!r}"
            )
    return pairs


def _parse_bool(value: str) -> Optional[bool]:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def stratified_folds(issame: Sequence[bool], num_folds: int) -> np.ndarray:
    """Fold index per pair: the i-th positive goes to fold ``i % k`` and the i-th negative too."""
    issame = np.asarray(issame, dtype=bool)
    folds = np.empty(issame.size, dtype=np.int64)
    for label in (True, False):
        idx = np.flatnonzero(issame == label)
        folds[idx] = np.arange(idx.size) % num_folds
    return folds


def contiguous_folds(num_pairs: int, num_folds: int) -> np.ndarray:
    """Fold index per pair for contiguous blocks (``KFold(num_folds, shuffle=False)``)."""
    folds = np.empty(num_pairs, dtype=np.int64)
    for k, idx in enumerate(np.array_split(np.arange(num_pairs), num_folds)):
        folds[idx] = k
    return folds


def parse_pairs_file(path, num_folds: int = 10) -> List[Pair]:
    """Parse a generic pairs file: ``path1 path2 same [fold]`` per line, TSV/whitespace or CSV.

    ``same`` is ``1``/``0``, ``true``/``false``, ``same``/``diff``... Lines starting with ``#`` are
    skipped, and so is a first line whose ``same`` field is not a label (a column header).
    """
    path = Path(path)
    try:
        text = read_text(path, "pairs file")
    except FileNotFoundError:
        raise MissingFileError(f"pairs file {path} does not exist") from None
    rows: List[Tuple[str, str, bool, Optional[int]]] = []
    first = True
    for line_no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if "\t" in s:  # tabs first: a TSV path may hold spaces or commas
            fields = [x.strip() for x in s.split("\t")]
        elif "," in s:
            fields = [x.strip() for x in s.split(",")]
        else:
            fields = s.split()
        where = f"{path}:{line_no}"
        if len(fields) not in (3, 4):
            raise PairsFormatError(
                f"{where}: expected 'path1 path2 same' or 'path1 path2 same fold' (tab, space or comma "
                f"separated), got {len(fields)} field(s): {s!r}"
            )
        same = _parse_bool(fields[2])
        fold: Optional[int] = None
        if len(fields) == 4:
            try:
                fold = int(fields[3])
            except ValueError:
                fold = None
        if first and (same is None or (len(fields) == 4 and fold is None) or fields[0].lower() in _HEADER_NAMES):
            first = False
            logger.debug("%s: skipping header line %r", where, s)
            continue
        if same is None:
            raise PairsFormatError(f"{where}: third field {fields[2]!r} is not a same/different label (1/0, true/false)")
        if len(fields) == 4 and fold is None:
            raise PairsFormatError(f"{where}: fold {fields[3]!r} is not an integer")
        first = False
        rows.append((fields[0], fields[1], same, fold))
    if not rows:
        raise PairsFormatError(f"{path} holds no pairs")
    has_fold = [r[3] is not None for r in rows]
    if any(has_fold) and not all(has_fold):
        raise PairsFormatError(f"{path}: {has_fold.count(False)} line(s) lack the fold column that others have")
    if all(has_fold):
        ids = sorted({r[3] for r in rows})
        remap = {v: i for i, v in enumerate(ids)}
        folds = np.array([remap[r[3]] for r in rows])
    else:
        folds = stratified_folds([r[2] for r in rows], num_folds)
    return [Pair(a, b, s, int(k)) for (a, b, s, _), k in zip(rows, folds)]


def check_protocol_pairs(pairs: Sequence[Pair], where) -> None:
    """Refuse pairs the k-fold protocol cannot score (docs/theory.md#lfw-protocol): each fold's threshold is
    chosen on the other folds and the ROC needs both labels, so at least 2 folds and both same and different
    pairs. :class:`PairsFormatError` naming ``where`` (the pairs file or pack)."""
    folds = {p.fold for p in pairs}
    same = sum(bool(p.same) for p in pairs)
    if len(folds) < 2 or same == 0 or same == len(pairs):
        raise PairsFormatError(f"{where}: {len(pairs)} pairs ({same} same, {len(pairs) - same} different) in "
                               f"{len(folds)} fold(s); the k-fold protocol needs at least 2 folds and both same and "
                               "different pairs (add pairs, or lower --folds)")


def pairs_to_arrays(pairs: Sequence[Pair]):
    """``(unique_paths, index1, index2, issame, folds)``: each distinct image once, pairs as indices."""
    if not pairs:
        raise ValueError("no pairs")
    index: Dict[str, int] = {}
    for p in pairs:
        index.setdefault(p.path1, len(index))
        index.setdefault(p.path2, len(index))
    i1 = np.fromiter((index[p.path1] for p in pairs), dtype=np.int64, count=len(pairs))
    i2 = np.fromiter((index[p.path2] for p in pairs), dtype=np.int64, count=len(pairs))
    issame = np.fromiter((p.same for p in pairs), dtype=bool, count=len(pairs))
    folds = np.fromiter((p.fold for p in pairs), dtype=np.int64, count=len(pairs))
    return list(index), i1, i2, issame, folds


def missing_images(root, rel_paths: Iterable[str]) -> List[str]:
    """The relative paths that do not exist under ``root``."""
    root = Path(root)
    return [p for p in rel_paths if not (root / p).is_file()]


def describe_missing(missing: Sequence[str], total: int, where: str, hint: str = "") -> str:
    """An error message naming how many and which paths are missing."""
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return f"{len(missing)} of {total} images are missing {where}: {shown}" + (f"; {hint}" if hint else "")


# --------------------------------------------------------------------------- insightface .bin packs


def load_bin_pack(path) -> Tuple[List[bytes], np.ndarray]:
    """Read an insightface verification pack: ``(list of encoded image bytes, bool array issame)``.

    The pickle is read with :mod:`sphereface_plus.safe_pickle`, which resolves no global except
    ``_codecs.encode`` (how Python 3 protocol-2 pickles spell ``bytes``); Python 2 packs are read
    with ``encoding='bytes'`` like insightface does. Then the content is checked to be exactly
    bytes, lists, tuples and bools. Anything else raises :class:`PairsFormatError` (an
    :class:`UnsafePickleError` for a forbidden global) before any of it is run.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"pack {path} does not exist") from None
    try:
        obj = restricted_loads(data, allowed={("_codecs", "encode")}, encoding="bytes")
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}. An insightface pack holds only image bytes and bools.") from None
    except Exception as e:  # truncated or not a pickle at all
        raise PairsFormatError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise PairsFormatError(f"{path}: expected a pair (images, issame), got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise PairsFormatError(f"{path}: images and issame must be lists, got {type(bins).__name__}, {type(issame).__name__}")
    bad = [i for i, b in enumerate(bins) if not isinstance(b, (bytes, bytearray))]
    if bad:
        raise PairsFormatError(f"{path}: {len(bad)} image entries are not bytes (first at index {bad[0]}: "
                               f"{type(bins[bad[0]]).__name__})")
    bad = [i for i, s in enumerate(issame) if not isinstance(s, bool)]
    if bad:
        raise PairsFormatError(f"{path}: {len(bad)} issame entries are not bools (first at index {bad[0]}: "
                               f"{type(issame[bad[0]]).__name__})")
    if len(bins) != 2 * len(issame):
        raise PairsFormatError(f"{path}: {len(bins)} images for {len(issame)} pairs; a pack holds 2 images per pair")
    total = sum(len(b) for b in bins)
    if total > len(data):  # the same bytes referenced many times (pickle memo): copying them would not end
        raise PairsFormatError(f"{path}: its {len(bins)} images add up to {total} bytes, more than the file's "
                               f"{len(data)}: the pack repeats references to one object; it is corrupt or malicious")
    return [bytes(b) for b in bins], np.asarray(issame, dtype=bool)


def save_bin_pack(path, images: Sequence[bytes], issame: Sequence[bool], protocol: int = 4) -> None:
    """Write a pack in the insightface layout (for tests and for exporting a pairs set).

    Every slot is stored in full, as insightface's packs store them, even when two pairs share an image:
    pickle would otherwise write one object and references to it, which :func:`load_bin_pack` refuses (a
    pack's images must fit in its file)."""
    import pickle

    from sphereface_plus.utils import atomic_write_bytes

    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    payload = ([bytes(bytearray(b)) for b in images], [bool(s) for s in issame])  # bytearray: a copy per slot
    atomic_write_bytes(path, pickle.dumps(payload, protocol=protocol))


def bin_pack_pairs(issame: np.ndarray, num_folds: int = 10) -> List[Pair]:
    """Pairs of a pack as image-index keys ``"0"``, ``"1"``... with contiguous folds."""
    folds = contiguous_folds(len(issame), num_folds)
    return [Pair(str(2 * i), str(2 * i + 1), bool(s), int(k)) for i, (s, k) in enumerate(zip(issame, folds))]


# --------------------------------------------------------------------------- identity folders


def list_identity_folder(root) -> Dict[str, List[str]]:
    """``{identity: sorted relative image paths}`` for every sub-folder of ``root`` with images."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"identity folder root {root} does not exist")
    out: Dict[str, List[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f.name for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[d.name] = [f"{d.name}/{f}" for f in files]
    if not out:
        raise PairsFormatError(f"{root} has no sub-folders with images ({', '.join(IMAGE_EXTENSIONS)})")
    return out


def folder_pairs(root, num_pairs: int = 6000, num_folds: int = 10, seed: int = 0) -> List[Pair]:
    """Deterministic balanced pairs from ``root/<identity>/<image>``, person-disjoint folds like LFW.

    Identities are shuffled with ``seed`` and dealt into ``num_folds`` groups; each fold gets
    ``num_pairs / (2 k)`` distinct positive pairs (two images of one identity) and as many distinct
    negative pairs (two identities of the fold). When a fold cannot supply that many distinct
    positives, every fold is cut to the smallest count so that folds stay balanced (logged).
    """
    ids = list_identity_folder(root)
    names = sorted(ids)
    if len(names) < 2 * num_folds:
        raise PairsFormatError(f"{root}: {len(names)} identities cannot make {num_folds} person-disjoint folds "
                               f"(need at least {2 * num_folds}); lower --folds")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    groups = [[names[i] for i in sorted(g)] for g in np.array_split(order, num_folds)]
    per_class = max(1, num_pairs // (2 * num_folds))
    capacity = []
    for g in groups:
        n_pos = sum(len(ids[n]) * (len(ids[n]) - 1) // 2 for n in g)
        capacity.append(n_pos)
    take = min(per_class, min(capacity))
    if take == 0:
        raise PairsFormatError(f"{root}: a fold has no identity with 2 or more images; positive pairs are impossible")
    if take < per_class:
        logger.warning("%s: only %d distinct positive pairs in the smallest fold; using %d + %d pairs per fold "
                       "instead of %d + %d", root, take, take, take, per_class, per_class)
    pairs: List[Pair] = []
    for k, g in enumerate(groups):
        pairs += _sample_fold(ids, g, take, k, rng)
    return pairs


def _sample_fold(ids: Dict[str, List[str]], group: List[str], n: int, fold: int, rng) -> List[Pair]:
    multi = [name for name in group if len(ids[name]) >= 2]
    # positives: all candidate pairs enumerated when few, else rejection sampling without repeats
    weights = np.array([len(ids[m]) * (len(ids[m]) - 1) / 2 for m in multi], dtype=np.float64)
    total = int(weights.sum())
    pos: List[Pair] = []
    if total <= 4 * n:
        cands = [(a, b) for m in multi for i, a in enumerate(ids[m]) for b in ids[m][i + 1:]]
        for j in sorted(rng.choice(len(cands), size=n, replace=False)):
            pos.append(Pair(cands[j][0], cands[j][1], True, fold))
    else:
        seen = set()
        p = weights / weights.sum()
        while len(pos) < n:
            m = multi[rng.choice(len(multi), p=p)]
            a, b = sorted(rng.choice(len(ids[m]), size=2, replace=False))
            if (m, a, b) not in seen:
                seen.add((m, a, b))
                pos.append(Pair(ids[m][a], ids[m][b], True, fold))
    neg: List[Pair] = []
    seen = set()
    max_neg = sum(len(ids[a]) * len(ids[b]) for i, a in enumerate(group) for b in group[i + 1:])
    if max_neg < n:
        raise PairsFormatError(f"fold {fold} can make only {max_neg} negative pairs, {n} needed")
    while len(neg) < n:
        a, b = sorted(rng.choice(len(group), size=2, replace=False))
        ia = int(rng.integers(len(ids[group[a]])))
        ib = int(rng.integers(len(ids[group[b]])))
        if (a, ia, b, ib) not in seen:
            seen.add((a, ia, b, ib))
            neg.append(Pair(ids[group[a]][ia], ids[group[b]][ib], False, fold))
    return pos + neg
