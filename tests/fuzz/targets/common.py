"""Seed material shared by the targets: synthetic faces, aligned crops, a features file, a small model."""
from __future__ import annotations

import functools
import io
import random
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..mutate import mutate_bytes, mutate_tree


@functools.lru_cache(maxsize=None)
def face(identity: int, index: int, size: int = 160) -> Tuple[np.ndarray, np.ndarray]:
    """A synthetic face photo (BGR uint8, ``size`` x ``size``) and its 5 landmarks (5 x 2)."""
    from data_prep.synthetic import identity_params, image_params, render_image

    image, points = render_image(identity_params(7, identity), image_params(7, identity, index), size)
    return image, np.asarray(points, dtype=np.float64).reshape(5, 2)


@functools.lru_cache(maxsize=None)
def crop(identity: int, index: int, template: str = "112x96") -> np.ndarray:
    """The aligned crop of :func:`face` (BGR uint8, 112 x 96 or 112 x 112)."""
    from data_prep import align_face

    image, points = face(identity, index)
    return align_face(image, points, template=template)


def encode(image: np.ndarray, ext: str = ".jpg", *params: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return buf.tobytes()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def features_npz(paths: Sequence[str], dim: int = 8, seed: int = 0) -> bytes:
    """An ``.npz`` as ``verify --save-features`` writes it: ``paths`` and unit-norm ``features``."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(len(paths), dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return npz_bytes(paths=np.asarray(list(paths), dtype=str), features=feats)


def mutate_npz(rng: random.Random, data: bytes) -> bytes:
    """An ``.npz`` whose arrays have the wrong shape, type or values (rebuilt), or damaged bytes."""
    if rng.random() < 0.4:
        return mutate_bytes(rng, data)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays: Dict[str, np.ndarray] = {k: z[k] for k in z.files}
    name = rng.choice(sorted(arrays))
    a = arrays[name]
    choices = [
        lambda: a[: rng.randrange(len(a) + 1)] if a.ndim else a,
        lambda: np.concatenate([a, a]) if a.ndim else a,
        lambda: a.reshape(-1) if a.ndim else a,
        lambda: np.zeros((0,) + a.shape[1:], a.dtype) if a.ndim else a,
        lambda: np.full(a.shape, np.nan, np.float32),
        lambda: a.astype(np.float64) if a.dtype.kind == "f" else np.arange(a.size).reshape(a.shape),
        lambda: np.asarray("x"),
        lambda: np.zeros((len(a) if a.ndim else 1, 0), np.float32),
        lambda: np.ones((2, 3, 4), np.float32),
        lambda: a.astype(np.float16) if a.dtype.kind == "f" else a.astype("S"),
    ]
    arrays[name] = rng.choice(choices)()
    if rng.random() < 0.2:
        arrays.pop(rng.choice(sorted(arrays)))
    if rng.random() < 0.1:
        arrays["extra"] = np.arange(3)
    return npz_bytes(**arrays)


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    """A JSON file with wrong types in it (parsed, mutated as a tree, written back), or damaged text."""
    import json

    from ..mutate import mutate_text

    if rng.random() < 0.3:
        return mutate_text(rng, data)
    tree = json.loads(data)
    return json.dumps(mutate_tree(rng, tree, aliases=False), allow_nan=True).encode()


def lfw_names(count: int) -> List[str]:
    return [f"Person_{chr(65 + i)}{chr(97 + i)}" for i in range(count)]


TINY_MODEL = {"backbone": "mobilefacenet", "input_size": [112, 96], "embedding_dim": 16,
              "kwargs": {"scale": 1, "blocks": [1, 1, 1, 1]}}


def tiny_checkpoint_state(input_size=(112, 96), seed: int = 0) -> dict:
    """A training checkpoint's content (docs/interfaces.md) for a 0.47 M-parameter MobileFaceNet, as
    ``verify``, ``compare``, ``export`` and ``megaface`` read it."""
    import torch

    from sphereface_plus.models import backbone_from_config

    torch.manual_seed(seed)
    model_cfg = dict(TINY_MODEL, input_size=list(input_size))
    net = backbone_from_config(model_cfg).eval()
    template = f"{input_size[0]}x{input_size[1]}"
    return {"model": net.state_dict(), "iteration": 3,
            "config": {"model": model_cfg, "data": {"template": template}}}


def checkpoint_bytes(state: dict, integrity: bool = True) -> bytes:
    """``torch.save`` bytes of ``state``, with the checksum entry the engine adds (or without)."""
    from sphereface_plus.engine.checkpoint import INTEGRITY_KEY, serialize, state_digest

    if integrity:
        state = {**state, INTEGRITY_KEY: {"algorithm": "sha256", "digest": state_digest(state)}}
    return serialize(state)


def crops_and_pairs(folder: Path) -> Tuple[Path, Path]:
    """``folder/crops`` (8 aligned 112x96 JPEG crops: ``id<k>/<i>.jpg``, 4 identities of 2 images) and
    ``folder/pairs.txt`` (4 same + 4 different pairs in 2 folds): what ``verify pairs --checkpoint`` reads."""
    crops = folder / "crops"
    for i in range(8):  # identity i % 4, its image i // 4
        rel = f"id{i % 4}/{i}.jpg"
        (crops / rel).parent.mkdir(parents=True, exist_ok=True)
        (crops / rel).write_bytes(encode(crop(i % 4, i // 4), ".jpg"))
    pairs = folder / "pairs.txt"
    pairs.write_text("".join(f"id{k}/{k}.jpg id{k}/{k + 4}.jpg 1 {k % 2}\n"
                             f"id{k}/{k}.jpg id{(k + 1) % 4}/{(k + 1) % 4}.jpg 0 {k % 2}\n" for k in range(4)))
    return crops, pairs
