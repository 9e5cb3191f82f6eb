"""bf16 support detection, precision resolution, the autocast helper, and bf16 embedding on real LFW crops.

References: the resolution table of the issue written out by hand; float32 embeddings computed here by
calling the model directly on the crop and on its mirror (two plain forwards, default memory format).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sphereface_plus.engine.precision import (autocast, autocast_dtype, bf16_support,  # noqa: E402
                                              cpu_bf16_support, resolve_precision)
from sphereface_plus.errors import UsageError  # noqa: E402
from shared_data import LFW

needs_lfw = pytest.mark.skipif(not (LFW / "lfw_landmark.txt").is_file(), reason=f"real LFW not found at {LFW}")
IMAGES = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
          "Abdullah_Gul/Abdullah_Gul_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0002.jpg",
          "Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Abba_Eban/Abba_Eban_0001.jpg"]
# bf16 keeps 8 significand bits: sphere20's 1024-d crop + mirror feature stays within this cosine of
# the float32 one (measured on a trained sphere20 over all 7,701 LFW pair images: min 0.999996, see
# bench/results/bf16_lfw.md; random weights give about 0.99997); 0.999 leaves a wide margin
BF16_MIN_COSINE = 0.999


# ------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx avx2 fma", "none"),  # Haswell: no AVX-512, oneDNN has no bf16 path
    ("sse2 avx2 avx512f avx512dq avx512bw avx512vl", "emulated"),  # Skylake-SP: bf16 through conversions
    ("avx2 avx512f avx512bw avx512_vnni avx512_bf16", "native"),  # Cooper Lake, Zen 4
    ("avx512f avx512bw amx_tile amx_bf16 amx_int8", "native"),  # Sapphire Rapids (AMX)
    ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimdhp bf16 i8mm", "native"),  # Graviton 3 Features
    ("fp asimd evtstrm aes crc32", "none"),  # Cortex-A72
])
def test_cpu_bf16_support_from_flags(flags, expected):
    if not torch.backends.mkldnn.is_available() and expected == "native":
        expected = "emulated"  # without oneDNN even native flags only reach reference kernels
    assert cpu_bf16_support(flags.split()) == expected
    assert bf16_support("cpu", cpu_flags=flags.split()) == expected


def test_this_cpu_matches_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) and torch.backends.mkldnn.is_available()
    assert (bf16_support("cpu") == "native") == native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


# ------------------------------------------------------------------------------ resolution
@pytest.mark.parametrize("setting, device, support, expected", [
    ("auto", "cpu", "native", "bf16"),
    ("auto", "cpu", "emulated", "fp32"),  # emulated bf16 is slower than float32: auto keeps fp32
    ("auto", "cpu", "none", "fp32"),
    ("bf16", "cpu", "native", "bf16"),
    ("bf16", "cpu", "emulated", "bf16"),  # asked for explicitly and it runs: honoured
    ("bf16", "cpu", "none", "fp32"),  # quiet fallback
    ("fp32", "cpu", "native", "fp32"),
    ("off", "cpu", "native", "fp32"),  # the training config's spelling
    ("fp16", "cpu", "native", "fp32"),  # half precision is CUDA-only here
    ("fp16", "cuda:0", "native", "fp16"),
    ("auto", "cuda:0", "native", "bf16"),
    ("auto", "cuda:0", "emulated", "fp32"),  # pre-Ampere GPU
    ("bf16", "cuda", "none", "fp32"),
])
def test_resolve_precision_table(setting, device, support, expected):
    assert resolve_precision(setting, device, support=support) == expected


def test_resolve_precision_rejects_unknown_values():
    with pytest.raises(UsageError, match="train.precision='half'.*auto, fp32, bf16, fp16, off"):
        resolve_precision("half", "cpu", what="train.precision")
    with pytest.raises(ValueError, match="support"):
        resolve_precision("auto", "cpu", support="fast")
    with pytest.raises(ValueError, match="not resolved"):
        autocast_dtype("auto")


def test_autocast_helper_dtypes():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    # a float32 island inside (what the trainer does around head, loss and MHE)
    with autocast("cpu", "bf16"), torch.autocast("cpu", enabled=False):
        assert (a @ b).dtype == torch.float32


# ------------------------------------------------------------------------------ embedding
def _lfw_crops():
    import cv2

    from data_prep import align_face

    marks = {}
    for line in (LFW / "lfw_landmark.txt").read_text().splitlines():
        f = line.split()
        if f and f[0] in IMAGES:
            marks[f[0]] = np.array(f[1:], dtype=np.float64).reshape(5, 2)
    return [align_face(cv2.imread(str(LFW / "images" / r)), marks[r], template="112x96") for r in IMAGES]


@pytest.fixture(scope="module")
def crops_and_model():
    from sphereface_plus import create_backbone

    torch.manual_seed(0)
    model = create_backbone("sphere20", input_size=(112, 96)).eval()
    crops = _lfw_crops()
    x = torch.stack([(torch.from_numpy(c).permute(2, 0, 1).float() - 127.5) / 128 for c in crops])
    with torch.no_grad():  # two plain float32 forwards: the reference
        ref = torch.cat([model(x), model(x.flip(3))], 1)
    return model, x, ref, crops


@needs_lfw
def test_channels_last_and_batched_flip_match_plain_float32(crops_and_model):
    from eval.features import embed_batch
    from sphereface_plus import create_backbone

    model, x, ref, _ = crops_and_model
    nhwc = create_backbone("sphere20", input_size=(112, 96)).eval()
    nhwc.load_state_dict(model.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = embed_batch(nhwc, x, flip=True, precision="fp32", channels_last=True)
        single = embed_batch(model, x, flip=False, precision="fp32")
    assert got.dtype == torch.float32 and got.shape == (len(IMAGES), 1024)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(single, ref[:, :512], rtol=0, atol=1e-5)


@needs_lfw
def test_bf16_features_are_float32_and_close_to_fp32(crops_and_model):
    from eval.features import ArrayImages, extract_from_dataset

    from sphereface_plus.engine.precision import resolve_precision

    if resolve_precision("bf16", "cpu") != "bf16":  # e.g. an AVX2-only CPU: bf16 falls back to float32
        pytest.skip("this CPU runs no bf16 (no AVX-512 / AMX / ARM BF16), so there is no bf16 result to compare")
    model, _, ref, crops = crops_and_model
    got = extract_from_dataset(model, ArrayImages(crops, (112, 96)), batch_size=4, precision="bf16",
                               channels_last=True)
    assert got.dtype == np.float32 and got.shape == (len(IMAGES), 1024)
    r = ref.double().numpy()
    cos = (got * r).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(r, axis=1)
    assert cos.min() >= BF16_MIN_COSINE, cos
    assert not np.allclose(got, r, atol=1e-6)  # bf16 really ran: the features are not bit-for-bit fp32


def test_onnx_like_models_embed_as_they_are():
    from eval.features import inference_setup

    class OnnxSession:  # what an ONNX Runtime wrapper looks like to the embedder: callable, not a Module
        def __call__(self, x):
            return x

    class Wrapped(torch.nn.Module):
        supports_autocast = False

    assert inference_setup(OnnxSession(), "bf16") == ("fp32", False)
    assert inference_setup(Wrapped(), "auto") == ("fp32", False)
    assert inference_setup(torch.nn.Conv2d(3, 4, 3), "fp32") == ("fp32", False)
    with pytest.raises(UsageError, match="--precision 'fp16'"):
        inference_setup(torch.nn.Conv2d(3, 4, 3), "fp16")


# ------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, crops_and_model):
    import cv2

    model, _, ref, crops = crops_and_model
    d = tmp_path_factory.mktemp("bf16")
    r = ref.double().numpy()
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    torch.save({"model": model.state_dict(), "head": {}, "iteration": 1, "threshold": float(r[0] @ r[1]) - 0.05,
                "config": {"model": {"backbone": "sphere20", "input_size": [112, 96]},
                           "data": {"template": "112x96"}}}, d / "ck.pt")
    for i, c in enumerate(crops):
        cv2.imwrite(str(d / f"{i}.png"), c)
    return d, r


@needs_lfw
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compare_accepts_precision(checkpoint, precision, capsys):
    import re

    from sphereface_plus.cli import main

    d, r = checkpoint
    assert main(["compare", str(d / "0.png"), str(d / "1.png"), "--checkpoint", str(d / "ck.pt"), "--aligned",
                 "--precision", precision]) == 0
    sim = float(re.search(r"cosine similarity: (-?[\d.]+)", capsys.readouterr().out).group(1))
    assert sim == pytest.approx(float(r[0] @ r[1]), abs=1e-4 if precision == "fp32" else 2e-3)


@needs_lfw
def test_megaface_export_and_verify_accept_precision(checkpoint, tmp_path):
    from eval.megaface import feature_path, read_feature
    from sphereface_plus.cli import main

    d, r = checkpoint
    names = [f"{i}.png" for i in range(len(IMAGES))]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    assert main(["megaface", "export", "--checkpoint", str(d / "ck.pt"), "--list", str(tmp_path / "list.txt"),
                 "--root", str(d), "--out", str(tmp_path / "f"), "--workers", "0", "--precision", "bf16"]) == 0
    got = np.stack([read_feature(feature_path(tmp_path / "f", n)) for n in names])
    assert (got * r).sum(1).min() >= BF16_MIN_COSINE
    # verify: a pairs file over the crops; fp32 and bf16 both run and agree on the accuracy here
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("0.png 1.png 1 0\n2.png 3.png 1 0\n0.png 4.png 0 0\n2.png 5.png 0 0\n"
                     "0.png 1.png 1 1\n2.png 3.png 1 1\n1.png 5.png 0 1\n3.png 4.png 0 1\n")
    reports = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        assert main(["verify", "pairs", "--checkpoint", str(d / "ck.pt"), "--root", str(d), "--pairs", str(pairs),
                     "--folds", "2", "--workers", "0", "--precision", precision, "--json", str(out)]) == 0
        reports[precision] = json.loads(out.read_text())
    assert reports["fp32"]["num_pairs"] == reports["bf16"]["num_pairs"] == 8


def test_cli_rejects_unknown_precision(capsys):
    from sphereface_plus.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "a.png", "b.png", "--checkpoint", "x.pt", "--precision", "fp16"])
    assert e.value.code == 2 and "--precision" in capsys.readouterr().err
