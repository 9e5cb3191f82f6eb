"""What a gallery enrols and searches: precomputed embeddings (``E.npy`` + ``IDS.txt``), or images embedded by
a checkpoint (a photo, a folder of photos, a tree of identity folders), each with the identity of the model
that made them (docs/gallery.md#inputs).

- ``E.npy``: ``N x d`` numbers (any float dtype; no pickled objects), ``IDS.txt``: one identity per line,
  line ``i`` naming row ``i``. An ``E.model.json`` beside ``E.npy`` (written by :func:`save_embeddings`) records
  the model that made them; without it, ``--checkpoint`` declares it (the file is hashed, not run).
- Images: a file (its identity is its name without the extension), or a folder whose images directly
  inside are named likewise and whose sub-folders are identities (``TREE/<identity>/**/<image>``). An
  image of the model's crop size is taken as an aligned crop; any other is a photo: its face is
  detected and aligned to the model's template (``eval.embedder.FaceEmbedder``), or aligned with the
  5 points of a landmark file (``landmarks``).
- The model's identity: the checkpoint's file name and sha256, its backbone and preprocessing
  (template, colour order, normalisation), the flip policy and the embedding dimension.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_prep.image_files import is_image_file
from sphereface_plus.errors import InputFileError, MissingFileError, require_file
from sphereface_plus.utils import atomic_write_bytes, atomic_write_json, read_text, sha256_file

logger = logging.getLogger(__name__)

EMBED_CHUNK = 256  # images decoded and aligned at a time (bounded memory for large trees)


# --------------------------------------------------------------------------- embeddings files


def read_embeddings(path) -> np.ndarray:
    """The ``N x d`` matrix of an ``.npy`` file (no pickled objects; bounded by the file's size)."""
    path = require_file(path, "--embeddings", "give an .npy file of N x d embeddings")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFileError(f"--embeddings {path}: not a readable .npy file of numbers ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:100] if str(exc) else ''})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise InputFileError(f"--embeddings {path}: expected an N x d matrix of numbers, got {x.dtype} {x.shape}")
    return np.asarray(x, dtype=np.float32)


def read_ids(path, n: int) -> List[str]:
    """One identity per line of ``path``; there must be exactly ``n`` (one per embedding row)."""
    path = require_file(path, "--ids", "give a text file with one identity per line")
    lines = read_text(path, "--ids").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise InputFileError(f"--ids {path}, line {i}: empty; every line names the identity of one embedding row")
    if len(lines) != n:
        raise InputFileError(f"--ids {path}: {len(lines)} lines for {n} embedding rows; give one identity per row, "
                             f"in the order of the rows")
    return [v.strip() for v in lines]


def model_file(embeddings_path) -> Path:
    """Where the model identity of ``E.npy`` is kept: ``E.model.json`` beside it."""
    return Path(embeddings_path).with_suffix(".model.json")


def read_embeddings_model(path) -> Optional[dict]:
    """The model identity recorded beside an embeddings file, or None."""
    side = model_file(path)
    if not side.is_file():
        return None
    from eval.gallery_store import read_json_file

    obj = read_json_file(side, "embeddings model record")
    if not isinstance(obj.get("model"), dict) or not obj["model"].get("sha256"):
        raise InputFileError(f"{side}: not a model record of sphereface-plus (no 'model' with a 'sha256'); move it "
                             f"away or pass --checkpoint to say which model made {Path(path).name}")
    return obj["model"]


def save_embeddings(path, vectors: np.ndarray, model: Optional[dict], names: Optional[Sequence[str]] = None) -> None:
    """``E.npy`` (float32) and, with a model identity, ``E.model.json`` recording it (and the rows' names)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    if model is not None:
        atomic_write_json(model_file(path), {"model": model, "names": list(names) if names is not None else None})


# --------------------------------------------------------------------------- the model's identity


def model_identity(checkpoint, info: Dict[str, Any], flip: Optional[str], dim: int) -> Dict[str, Any]:
    """What identifies the embedding space of ``checkpoint`` (``info``: ``eval.features.load_embedding_model``'s).

    ``path`` is kept so that later images can be embedded by the same file; it is not compared. ``flip``: how
    crop and mirror were combined (``concat|sum|none``; None when unknown)."""
    from sphereface_plus.importers.preprocessing import Preprocessing

    pre = info.get("preprocessing") or Preprocessing(template=info["template"]).to_dict()
    return {"file": Path(checkpoint).name, "path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint),
            "backbone": info.get("backbone"),
            "preprocessing": pre, "flip": flip, "dim": int(dim)}


def declared_model(checkpoint, dim: int) -> Dict[str, Any]:
    """The identity of the model a user says made some embeddings (``--checkpoint`` with ``--embeddings``)."""
    from eval.features import load_embedding_model

    _, info = load_embedding_model(require_file(checkpoint, "--checkpoint"))
    return model_identity(checkpoint, info, None, dim)


# --------------------------------------------------------------------------- images


def list_images(path, identities: bool = True) -> List[Tuple[str, Path, str]]:
    """``(name, file, identity)`` of every image under ``path`` (a file or a folder), sorted by name.

    ``identities``: name them as the module docstring says (for enrolment); the name is the path relative
    to ``path`` either way."""
    path = Path(path)
    if path.is_file():
        if not is_image_file(path):
            raise InputFileError(f"--images {path} is not an image file (or give a folder of images)")
        return [(path.name, path, path.stem)]
    if not path.is_dir():
        raise MissingFileError(f"--images {path} does not exist; give an image, a folder of images or a tree of "
                               f"identity folders")
    found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p) and
                   not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise InputFileError(f"--images {path} holds no images (.jpg, .png, ...)")
    out = []
    for p in found:
        rel = p.relative_to(path)
        ident = rel.parts[0] if len(rel.parts) > 1 else p.stem
        out.append((rel.as_posix(), p, ident if identities else ""))
    return out


class ImageEmbedder:
    """Images to L2-normalised embeddings with a checkpoint, in bounded chunks, naming what failed.

    ``landmarks`` (relative name -> 5 x 2 points) aligns photos without a detector; ``aligned`` forces
    every image to be taken as a crop (None: decide by size). Other arguments are ``FaceEmbedder``'s."""

    def __init__(self, checkpoint, device="cpu", detector: str = "mtcnn", flip: bool = True,
                 precision: str = "auto", batch_size: int = 32, landmarks: Optional[Dict[str, np.ndarray]] = None,
                 aligned: Optional[bool] = None):
        from eval.embedder import FaceEmbedder

        self.checkpoint = require_file(checkpoint, "--checkpoint")
        self.embedder = FaceEmbedder(self.checkpoint, device=device, detector=detector, flip=flip,
                                     batch_size=batch_size, precision=precision)
        self.landmarks, self.aligned = landmarks, aligned
        policy = self.embedder.info.get("flip_policy") or "concat"
        self.flip = policy if flip and policy != "none" else "none"
        self._model: Optional[Dict[str, Any]] = None

    def crop_sizes(self) -> set:
        size = tuple(self.embedder.info["input_size"])
        return {size, (size[0], size[0])}  # a 112x112 crop also feeds a 112x96 model (eval.features.fit_crop)

    def model(self, dim: int) -> Dict[str, Any]:
        if self._model is None:
            self._model = model_identity(self.checkpoint, self.embedder.info, self.flip, dim)
        return self._model

    def _crop(self, name: str, file: Path) -> np.ndarray:
        from data_prep import align_face
        from eval.embedder import read_image

        image = read_image(file)
        if self.landmarks is not None:
            if name not in self.landmarks:
                raise InputFileError(f"{name} has no line in the landmark file")
            return align_face(image, self.landmarks[name], template=self.embedder.template)
        if self.aligned or (self.aligned is None and tuple(image.shape[:2]) in self.crop_sizes()):
            return image
        return self.embedder.align(image, name)

    def embed(self, items: Sequence[Tuple[str, Path, str]]) -> Tuple[np.ndarray, List[int], List[Tuple[str, str]]]:
        """``(embeddings of the images that worked, their positions in items, [(name, why) of the others]``."""
        from sphereface_plus.utils import progress

        feats, ok, failed = [], [], []
        bar = progress(total=len(items), desc="embed", unit="image")
        for a in range(0, len(items), EMBED_CHUNK):
            crops, names, where = [], [], []
            for i, (name, file, _) in enumerate(items[a:a + EMBED_CHUNK], a):
                try:
                    crops.append(self._crop(name, file))
                except InputFileError as exc:  # no face, unreadable: listed, the others go on
                    failed.append((name, str(exc)))
                    continue
                names.append(name)
                where.append(i)
            if crops:
                feats.append(self.embedder.embed(crops, aligned=True, names=names))
                ok += where
            bar.update(min(EMBED_CHUNK, len(items) - a))
        bar.close()
        if not feats:
            raise InputFileError(f"no face could be embedded from {len(items)} image(s); first problem: "
                                 f"{failed[0][1] if failed else 'none'}")
        for name, why in failed[:10]:
            logger.warning("skipped %s: %s", name, why)
        if len(failed) > 10:
            logger.warning("... and %d more images skipped", len(failed) - 10)
        return np.concatenate(feats), ok, failed

