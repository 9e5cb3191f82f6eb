"""Full-state training checkpoints: atomic, rank-0 written, ``weights_only``-loadable.

A checkpoint is a ``torch.save`` dict of tensors and plain Python containers only (docs/interfaces.md):

- ``model`` / ``head``: state dicts (the head's holds the A-Softmax iteration counter that drives the
  lambda annealing of SPEC section 4, so lambda survives resume);
- ``optimizer``, ``scheduler``, ``scaler``: their state dicts;
- ``rng``: python / numpy / torch (/ CUDA) generator states, converted to lists and tensors so that
  ``torch.load(weights_only=True)`` accepts them (numpy's state is an ndarray: stored as a tensor);
- ``sampler``: the data-order seed and round (the position is ``iteration * batch``), ``iteration``,
  ``config`` (the resolved config as nested dicts), ``rollbacks`` and ``bad_images``.

Files: ``<out_dir>/checkpoints/last.pt`` (always the newest) and ``ckpt_<iteration>.pt`` every
``checkpoint.every`` iterations, the ``checkpoint.keep`` newest of them kept. Every file is written to
a temporary file and moved into place (``os.replace``), so a kill at any moment leaves either the old
or the new file, never a torn one.
"""
from __future__ import annotations

import io
import logging
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from sphereface_plus.utils import atomic_write_bytes, safe_torch_load

logger = logging.getLogger(__name__)

__all__ = [
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
    "find_resume_checkpoint",
    "checkpoint_dir",
    "serialize",
]

_PERIODIC = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def capture_rng() -> Dict[str, Any]:
    """Every library's generator state as tensors / lists / ints (no numpy objects)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: Dict[str, Any] = {
        "python": {"version": int(version), "state": [int(s) for s in state], "gauss": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has %d CUDA RNG states, this machine %d GPUs: CUDA RNG not restored",
                           len(cuda_states), torch.cuda.device_count())


def serialize(state: Dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(state: Dict[str, Any], out_dir, every: int, keep: int) -> Path:
    """Write ``last.pt`` (and ``ckpt_<iteration>.pt`` when the iteration is a multiple of ``every``).

    ``last.pt`` is written first, so after a kill between the two writes the newest state is still
    ``last.pt``; periodic files beyond the ``keep`` newest are removed afterwards.
    """
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = serialize(state)
    last = folder / "last.pt"
    atomic_write_bytes(last, data)
    it = int(state["iteration"])
    if every > 0 and it % every == 0:
        atomic_write_bytes(folder / f"ckpt_{it:07d}.pt", data)
        if keep > 0:
            for old in periodic_checkpoints(folder)[:-keep]:
                old.unlink(missing_ok=True)
    logger.info("saved checkpoint at iteration %d: %s", it, last)
    return last


def periodic_checkpoints(folder) -> List[Path]:
    """``ckpt_<iteration>.pt`` files sorted by iteration (oldest first)."""
    found = []
    for p in Path(folder).glob("ckpt_*.pt"):
        m = _PERIODIC.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def load_checkpoint(path, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` with an error that names the file on failure."""
    # MissingFileError / CheckpointError (sphereface_plus.errors) with a one-line message that never
    # repeats torch's advice to turn weights_only off
    return safe_torch_load(Path(path), map_location=map_location)


def find_resume_checkpoint(out_dir) -> Optional[Path]:
    """The newest readable checkpoint of a run folder (``--resume auto``), or None.

    Compares ``last.pt`` with the newest periodic file by their stored iteration, skipping files that
    do not load (with a warning), so a damaged ``last.pt`` falls back to the previous periodic one.
    """
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return None
    candidates = list(reversed(periodic_checkpoints(folder)))
    if (folder / "last.pt").is_file():
        candidates.insert(0, folder / "last.pt")
    best, best_it = None, -1
    for p in candidates:
        try:
            it = int(load_checkpoint(p)["iteration"])
        except Exception as exc:  # a damaged file must not block the resume
            logger.warning("skipping unreadable checkpoint %s: %s", p, exc)
            continue
        if it > best_it:
            best, best_it = p, it
        if p.name != "last.pt":
            break  # periodic files are sorted newest first: the first readable one is enough
    return best
