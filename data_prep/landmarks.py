"""The one reader of 5-point landmark files: ``relative/path x1 y1 x2 y2 ... x5 y5`` per line.

Whitespace (tab or space) separated, 0-based pixels, order left eye, right eye, nose, left and right
mouth corner; blank lines and ``#`` comments are skipped, ``./`` prefixes and backslashes normalised.
:func:`parse_landmark_file` keeps going over bad lines and reports each (the ``align`` command records
them in its manifest); :func:`read_landmarks` is the strict form for evaluation and the synthetic sets
(the first bad line is an error naming the file and the line).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from sphereface_plus.errors import InputFileError

__all__ = ["LandmarkEntry", "parse_landmark_file", "read_landmarks", "norm_rel"]


@dataclass
class LandmarkEntry:
    line: int
    points: Optional[Tuple[float, ...]]  # x1, y1, ..., x5, y5; None when the line is bad
    error: str = ""


def parse_landmark_file(path) -> Tuple[Dict[str, LandmarkEntry], List[Tuple[str, int, str]]]:
    """Parse a sphereface landmark file.

    Returns (entries by normalised relative path, problems that name no usable path as
    (text, line, reason)). A bad line whose first field looks like a path is kept as an entry with
    ``points=None`` and an ``error``, so that its image is reported as failed with that reason.
    A repeated path keeps its first line; the repeat is reported as a problem.
    """
    path = Path(path)
    entries: Dict[str, LandmarkEntry] = {}
    problems: List[Tuple[str, int, str]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputFileError(f"cannot read the landmark file {path}: {exc}") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        rel = norm_rel(fields[0])
        where = f"{path.name} line {n}"
        if len(fields) != 11:
            entry = LandmarkEntry(n, None, f"{where}: expected a path and 10 numbers, got {len(fields)} fields")
        else:
            try:
                vals = [float(v) for v in fields[1:]]
            except ValueError:
                bad = next(v for v in fields[1:] if not _is_float(v))
                entry = LandmarkEntry(n, None, f"{where}: {bad!r} is not a number")
            else:
                if not all(math.isfinite(v) for v in vals):
                    entry = LandmarkEntry(n, None, f"{where}: non-finite landmark value")
                else:
                    entry = LandmarkEntry(n, tuple(vals))
        if rel in entries:
            problems.append((rel, n, f"{where}: repeats the path of line {entries[rel].line}; the first line is used"))
            continue
        entries[rel] = entry
    return entries, problems


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def norm_rel(p: str) -> str:
    p = p.replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def read_landmarks(path) -> Dict[str, np.ndarray]:
    """``relative path -> 5 x 2`` float64 points of a landmark file; a bad or repeated line is an error."""
    entries, problems = parse_landmark_file(path)
    if problems:
        raise InputFileError(f"{path}: {problems[0][2]}")
    out: Dict[str, np.ndarray] = {}
    for rel, entry in entries.items():
        if entry.points is None:
            raise InputFileError(f"{path}: {entry.error}")
        out[rel] = np.asarray(entry.points, dtype=np.float64).reshape(5, 2)
    return out
