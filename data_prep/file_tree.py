"""The files of a dataset tree as ``align`` sees them: :func:`scan_tree` lists the inputs under a folder
(links followed once, hidden entries and an output folder inside the input left out) and
:func:`output_complete` tells a finished crop from one an interrupted run left (its format's trailer).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Sequence

logger = logging.getLogger(__name__)

__all__ = ["scan_tree", "output_complete"]


def output_complete(path: str) -> bool:
    """True when ``path`` is a finished crop: non-empty and ending with its format's trailer."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size < 16:
                return False
            fh.seek(size - 16)
            tail = fh.read()
    except OSError:
        return False
    if path.endswith(".png"):
        return tail.endswith(b"IEND\xaeB`\x82")
    return tail.rstrip(b"\x00").endswith(b"\xff\xd9")


def scan_tree(input_dir: Path, skip: Sequence[Path] = ()) -> List[str]:
    """Every file under ``input_dir`` as a sorted relative POSIX path.

    Hidden entries (names starting with '.', e.g. .DS_Store or our own temporary files) are ignored;
    so is any folder in ``skip`` (an output folder inside the input). Symlinked folders are followed
    (trees assembled from links are common), each real folder once, so link cycles end.
    """
    skip_real = {os.path.realpath(s) for s in skip}
    skip_ino = {os.stat(s).st_ino for s in skip_real if os.path.isdir(s)}
    seen = {os.path.realpath(input_dir)}
    out: List[str] = []

    def walk(folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            logger.warning("cannot list %s: %s", folder, exc)
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = prefix + e.name
            try:
                is_dir = e.is_dir()  # follows symlinks; d_type, no extra system call for plain entries
            except OSError:
                is_dir = False
            if not is_dir:
                out.append(rel)
                continue
            # realpath (a dozen system calls) only for links and for a possible output folder
            if e.is_symlink() or e.inode() in skip_ino:
                real = os.path.realpath(e.path)
                if real in seen or real in skip_real:
                    continue
                seen.add(real)
            walk(e.path, rel + "/")

    walk(str(input_dir), "")
    out.sort()
    return out
