"""``sphereface-plus check``: verify checkpoints and packed datasets before a long run (docs/robustness.md).

    sphereface-plus check runs/casia/checkpoints/last.pt
    sphereface-plus check runs/casia            # every checkpoint of a run folder
    sphereface-plus check casia-112x96          # a pack written by 'align --pack' (packed.json)

A checkpoint passes when it loads with ``weights_only`` and its stored SHA-256 matches its contents
(:func:`sphereface_plus.engine.checkpoint.load_checkpoint`); a pack when every chunk of crops matches
its SHA-256 in ``packed.json`` (:class:`data_prep.packed.PackedReader`). One line per file; exit status
0 when everything passed, 1 when something is damaged (it names the file), 2 for a path that is none
of these.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Tuple

from sphereface_plus.errors import MissingFileError, ToolkitError, UsageError

logger = logging.getLogger(__name__)

HELP = "verify checkpoints (their checksum) and packed datasets (per-chunk checksums) before a long run"
DESCRIPTION = __doc__

__all__ = ["HELP", "add_arguments", "run", "check_path"]


def _targets(path: Path) -> List[Tuple[str, Path]]:
    if path.is_file() and path.suffix == ".pt":
        return [("checkpoint", path)]
    if path.is_file() and path.name.endswith((".json", ".npy")):
        return [("pack", path)]
    if path.is_dir():
        found: List[Tuple[str, Path]] = []
        if (path / "packed.json").is_file():
            found.append(("pack", path))
        ck = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found += [("checkpoint", p) for p in sorted(ck.glob("*.pt"))]
        if found:
            return found
        raise UsageError(f"{path} holds no checkpoint (*.pt, checkpoints/*.pt) and no pack (packed.json)")
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    raise UsageError(f"{path} is neither a checkpoint (.pt) nor a pack (packed.json / packed.npy)")


def check_path(kind: str, path: Path) -> str:
    """A line ``ok ...``; raises the ToolkitError of a damaged file."""
    if kind == "checkpoint":
        from sphereface_plus.engine.checkpoint import load_checkpoint, verify_integrity

        state = load_checkpoint(path)
        verified = verify_integrity(state, path)
        return (f"ok  {path}: checkpoint of iteration {state['iteration']}, "
                + ("checksum verified" if verified else "no checksum (written by an older version)"))
    from data_prep.packed import PackedReader

    reader = PackedReader(path)
    chunks = reader.verify()
    return (f"ok  {reader.data_path}: {len(reader)} crops, "
            + (f"{chunks} chunks verified" if chunks else "no checksums (an older pack: re-pack to add them)"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a checkpoint (.pt), a run folder (its checkpoints/*.pt), or a pack folder (packed.json)")


def run(args: argparse.Namespace) -> int:
    targets = [t for p in args.paths for t in _targets(Path(p))]
    damaged = 0
    for kind, path in targets:
        try:
            print(check_path(kind, path), flush=True)
        except ToolkitError as exc:
            damaged += 1
            print(f"BAD {path}: {exc}", flush=True)
    if damaged:
        print(f"{damaged} of {len(targets)} file(s) damaged")
        return 1
    return 0
