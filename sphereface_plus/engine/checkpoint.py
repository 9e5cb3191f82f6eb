"""Checkpoints for every trainer: atomic, rank-0 written, keep-N, ``weights_only``-loadable, resumable.

A checkpoint is a ``torch.save`` dict of tensors and plain Python containers only (docs/interfaces.md),
so ``torch.load(path, weights_only=True)`` reads it and a file never runs code. Each trainer decides
what goes in (the face trainer: ``model``, ``head``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``,
``iteration``, ``config``, counters; CIFAR: ``model``, ``optimizer``, ``scheduler``, ``iteration``,
``config``, its metric windows); the engine requires only an integer ``iteration``.

- :func:`save_checkpoint` writes ``<out_dir>/checkpoints/last.pt`` (always the newest) and, every
  ``every`` iterations, ``ckpt_<iteration>.pt``, keeping the ``keep`` newest periodic files. Each file
  goes to a temporary file that is moved into place (``os.replace``), so a kill at any moment leaves
  the old or the new file, never a torn one.
- Every file carries a checksum of its contents (``integrity``: SHA-256 over every tensor's bytes and
  every value, :func:`state_digest`), verified by :func:`load_checkpoint`: flipped bytes that would
  still unpickle are refused with a line naming the file (files without the entry, from older
  versions, load as before).
- :func:`find_resume_checkpoint` / :func:`load_resume_state` find the newest *readable* one: a
  damaged ``last.pt`` (truncated, or failing its checksum) falls back to the newest periodic file that
  loads; a folder whose checkpoints all fail is refused rather than restarted from scratch.
- :func:`check_settings` is the one "settings changed since the last run?" check, with one policy:
  a resume (or a rerun into the same folder) with settings that differ from the stored ones, other
  than those a trainer declares free to change (the total iteration count, paths that move between
  machines), is refused with a message that lists the differences and says what to do.
- :func:`capture_rng` / :func:`restore_rng`: python / numpy / torch (/ CUDA) generator states as
  tensors and lists (numpy's state is an ndarray: stored as a tensor).
"""
from __future__ import annotations

import hashlib
import io
import logging
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from sphereface_plus.errors import CheckpointError, UsageError
from sphereface_plus.utils import atomic_write_bytes, safe_torch_load

logger = logging.getLogger(__name__)

__all__ = [
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "save_best_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
    "with_integrity",
    "find_resume_checkpoint",
    "load_resume_state",
    "periodic_checkpoints",
    "checkpoint_dir",
    "serialize",
    "settings_changes",
    "check_settings",
    "resume_run_state",
    "state_digest",
    "INTEGRITY_KEY",
]

#: the checkpoint entry holding ``{"algorithm": "sha256", "digest": <hex>}`` of everything else
INTEGRITY_KEY = "integrity"

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
    """The bytes ``torch.save`` writes for ``state`` (the one place checkpoints are serialised)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _feed(h, obj: Any, budget: Callable[[], None] = lambda: None) -> None:
    """Hash ``obj`` canonically: types, shapes and values (dict keys in a fixed order); ``budget()`` per value."""
    budget()
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            t = t.to("cpu").contiguous().reshape(-1)
            h.update(t.view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k, budget)
            _feed(h, obj[k], budget)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _feed(h, v, budget)
    elif isinstance(obj, bool) or obj is None:
        h.update(f"B{obj};".encode())
    elif isinstance(obj, (int, float, str)):
        text = repr(obj)
        h.update(f"{type(obj).__name__[0]}{len(text)}:{text};".encode())
    else:  # torch.dtype, torch.Size... (what a weights_only load accepts)
        text = f"{type(obj).__name__}:{obj!r}"
        h.update(f"O{len(text)}:{text};".encode())


#: values a checksum visits at most: a checkpoint holds thousands; a file whose pickle repeats references to one
#: list (10 references to a list of 10 references ... 9 levels deep: 10**9 values in a few hundred bytes) is refused
MAX_DIGEST_VALUES = 1_000_000


class _Budget:
    """Counts the values :func:`_feed` visits; too many is a :class:`CheckpointError`."""

    def __init__(self, limit: int):
        self.left = limit

    def __call__(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise CheckpointError(f"the checkpoint holds more than {MAX_DIGEST_VALUES} values (a structure that "
                                  "repeats references to itself): it is damaged or not written by this toolkit")


def state_digest(state: Dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's contents, the ``integrity`` entry left out.

    A structure of more than :data:`MAX_DIGEST_VALUES` values or nested too deeply for Python's recursion
    limit is a :class:`CheckpointError` (no checkpoint is either)."""
    h = hashlib.sha256()
    try:
        _feed(h, {k: v for k, v in state.items() if k != INTEGRITY_KEY}, _Budget(MAX_DIGEST_VALUES))
    except RecursionError:
        raise CheckpointError("the checkpoint nests containers too deeply to be one written by this toolkit") from None
    return h.hexdigest()


def with_integrity(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` plus its ``integrity`` entry (what every checkpoint file carries, :func:`read_checkpoint` checks)."""
    return {**state, INTEGRITY_KEY: {"algorithm": "sha256", "digest": state_digest(state)}}


def write_checkpoint(path, state: Dict[str, Any]) -> Path:
    """Write one checkpoint file outside a run's ``checkpoints/`` (``verify --save-model``, ``import``, the
    demo's model) with its checksum, atomically."""
    path = Path(path)
    atomic_write_bytes(path, serialize(with_integrity(state)))
    return path


def save_checkpoint(state: Dict[str, Any], out_dir, every: int = 0, keep: int = 0) -> Path:
    """Write ``last.pt`` (and ``ckpt_<iteration>.pt`` when the iteration is a multiple of ``every`` > 0).

    ``last.pt`` is written first, so after a kill between the two writes the newest state is still
    ``last.pt``; periodic files beyond the ``keep`` newest (``keep`` 0: all kept) are removed afterwards.
    Call it on rank 0 only.
    """
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = with_integrity(state)
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


def save_best_checkpoint(state: Dict[str, Any], out_dir) -> Path:
    """Write ``<out_dir>/checkpoints/best.pt`` atomically (rank 0 only): the state of the best validation
    so far, which the trainer decides. Never a resume candidate (:func:`load_resume_state` reads
    ``last.pt`` and the periodic files only), so keeping it never changes where a run continues."""
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint(folder / "best.pt", state)
    logger.info("saved best checkpoint at iteration %d: %s", int(state["iteration"]), path)
    return path


def periodic_checkpoints(folder) -> List[Path]:
    """``ckpt_<iteration>.pt`` files sorted by iteration (oldest first)."""
    found = []
    for p in Path(folder).glob("ckpt_*.pt"):
        m = _PERIODIC.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_checkpoint(path, map_location: Any = "cpu") -> Dict[str, Any]:
    """The one loader of every consumer of a checkpoint file (``verify``, ``compare``, ``export``, ``megaface``,
    ``check``, ``train.init_from``, resume): ``torch.load(weights_only=True)``, a dict, and the checksum it
    carries verified (:func:`verify_integrity`; a file without one, from an older version, loads as before).

    A missing or unreadable file, or one that fails its checksum, is a :class:`~sphereface_plus.errors.
    MissingFileError` / :class:`~sphereface_plus.errors.CheckpointError` whose one line names it and never
    repeats torch's advice to turn ``weights_only`` off."""
    state = safe_torch_load(Path(path), map_location=map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} is not a valid checkpoint (not written by this toolkit: it holds a "
                              f"{type(state).__name__}, not a dict)")
    verify_integrity(state, path)
    return state


def load_checkpoint(path, map_location: Any = "cpu") -> Dict[str, Any]:
    """:func:`read_checkpoint` of a training checkpoint: it must also hold its ``iteration``."""
    state = read_checkpoint(path, map_location)
    if "iteration" not in state:
        raise CheckpointError(f"{str(path)!r} is not a valid checkpoint (not written by this toolkit: no 'iteration' entry)")
    return state


def verify_integrity(state: Dict[str, Any], path: Any = "the checkpoint") -> bool:
    """Check the stored checksum; False for a file without one (older versions), CheckpointError on a mismatch."""
    stored = state.get(INTEGRITY_KEY)
    if not isinstance(stored, dict) or "digest" not in stored:
        return False
    try:
        digest = state_digest(state)
    except CheckpointError as exc:  # a structure no checkpoint has: the file is named here
        raise CheckpointError(f"{str(path)!r}: {exc}") from None
    if stored.get("algorithm", "sha256") != "sha256" or stored["digest"] != digest:
        raise CheckpointError(f"{str(path)!r} failed its checksum: the file changed after it was written (a damaged "
                              "disk, an interrupted copy, an edit); use an earlier checkpoint (--resume auto falls "
                              "back to the newest good one by itself)")
    return True


def load_resume_state(out_dir, map_location: Any = "cpu",
                      refuse_unreadable: bool = False) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(path, state)`` of the newest readable checkpoint of a run folder, or None when there is none.

    Compares ``last.pt`` with the newest periodic file by their stored iteration, skipping files that
    do not load (with a warning), so a damaged ``last.pt`` falls back to the previous periodic one.
    ``refuse_unreadable``: when the folder has checkpoint files but none of them loads, raise the
    :class:`CheckpointError` instead of returning None (a resume must not start over silently).
    """
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return None
    candidates = list(reversed(periodic_checkpoints(folder)))
    if (folder / "last.pt").is_file():
        candidates.insert(0, folder / "last.pt")
    best: Optional[Tuple[Path, Dict[str, Any]]] = None
    failures: List[str] = []
    for p in candidates:
        try:
            state = load_checkpoint(p, map_location)
        except CheckpointError as exc:  # a damaged file must not block the resume
            logger.warning("skipping unreadable checkpoint %s: %s", p, exc)
            failures.append(p.name)
            continue
        if best is None or int(state["iteration"]) > int(best[1]["iteration"]):
            best = (p, state)
        if p.name != "last.pt":
            break  # periodic files are sorted newest first: the first readable one is enough
    if best is None and failures and refuse_unreadable:
        raise CheckpointError(f"no checkpoint in {folder} can be read ({', '.join(failures)}: truncated or failing "
                              "their checksum); resume from a good copy with --resume PATH, or start over in "
                              "another output folder")
    return best


def find_resume_checkpoint(out_dir) -> Optional[Path]:
    """The path of :func:`load_resume_state` (``--resume auto``), or None."""
    found = load_resume_state(out_dir)
    return found[0] if found else None


def settings_changes(old: Dict[str, Any], new: Dict[str, Any], may_change: Iterable[str] = (),
                     prefix: str = "") -> List[str]:
    """``key: old -> new`` for every dotted key whose value differs, except the keys in ``may_change``."""
    free = set(may_change)
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if key in free:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_changes(a, b, free, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def check_settings(saved: Dict[str, Any], current: Dict[str, Any], where, may_change: Iterable[str] = (),
                   fix: str = "use the original settings, or another output folder for the new ones") -> None:
    """The one policy: refuse to continue a run whose settings changed (see the module docstring)."""
    changes = settings_changes(saved or {}, current, may_change)
    if changes:
        raise UsageError(f"cannot continue the run in {where}: its settings changed since the last run "
                         f"({'; '.join(changes)}); {fix}")


def resume_run_state(out_dir, resume, config: Dict[str, Any], may_change: Iterable[str] = (),
                     map_location: Any = "cpu", fix: str = "use the original flags, or a new --out folder for the "
                     "new settings", view: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
                     ) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The one resume policy of every runner: ``(path, state)`` to continue from, or None for a fresh start.

    ``resume``: None/False (a fresh run: a folder that already holds a checkpoint is refused, so a run is
    never overwritten by accident; :class:`~sphereface_plus.engine.run_folder.RunFolder` refuses it
    before anything is written), True/``"auto"`` (the newest checkpoint that loads and passes its
    checksum, None when there is none; a folder whose checkpoints all fail is refused) or a path. The
    saved settings must agree with ``config`` (:func:`check_settings`; only ``may_change`` may differ),
    both seen through ``view`` when given (a runner's normal form of a config, e.g. one that fills in
    defaults a checkpoint of an earlier release did not record).
    """
    if resume and resume is not True and resume != "auto":
        path = Path(resume)
        found: Optional[Tuple[Path, Dict[str, Any]]] = (path, load_checkpoint(path, map_location))
    else:
        found = load_resume_state(out_dir, map_location, refuse_unreadable=bool(resume))
        if found is None:
            return None
        if not resume:
            raise UsageError(f"{out_dir} already holds a run ({found[0]}); pass --resume to continue it, or choose "
                             "another output folder")
    path, state = found
    view = view or (lambda c: c)
    check_settings(view(state.get("config", {})), view(config), path, may_change, fix=fix)
    return found
