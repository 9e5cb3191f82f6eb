"""Fixtures shared by several test modules."""
import os

import pytest
import torch

# train.compile=auto would compile the backbone of every trainer a test builds with the default (long)
# train.iterations; tests that want compilation say train.compile=true (sphereface_plus.engine.compile)
os.environ.setdefault("SPHEREFACE_PLUS_COMPILE_AUTO", "eager")
# --runtime auto would export every checkpoint a test embeds to ONNX (seconds each) and compare onnxruntime's
# features with references computed in PyTorch; tests of the runtime (tests/test_runtime.py) name it (eval.runtime)
os.environ.setdefault("SPHEREFACE_PLUS_RUNTIME", "torch")


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """The folder of exported graphs for the whole session: never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    old = os.environ.get("SPHEREFACE_PLUS_ONNX_CACHE")
    os.environ["SPHEREFACE_PLUS_ONNX_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("SPHEREFACE_PLUS_ONNX_CACHE", None)
    else:
        os.environ["SPHEREFACE_PLUS_ONNX_CACHE"] = old


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A test that sets torch's thread count does not leak it: later tests compare float reductions bit for bit
    with subprocesses that run at the default count (tests/test_train.py's SIGKILL resume)."""
    old = torch.get_num_threads()
    yield
    if torch.get_num_threads() != old:
        torch.set_num_threads(old)


@pytest.fixture
def two_torch_threads():
    """Run the test with 2 torch CPU threads (the machine's cores), restoring the previous setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A small synthetic face set (20 identities x 3 images, 112x96, 2 pairs per fold) for the CLI training
    runs of several modules; made once per session, read only."""
    from data_prep.training_set import prepare_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(root, 20, 3, 0, "112x96", pairs_per_fold=2)
    return root
