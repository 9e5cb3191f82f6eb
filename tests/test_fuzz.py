"""The quick fuzz lane (``make test``; docs/fuzzing.md): every reader of a user's file against a few
hundred seeded mutations of valid seeds, with the contract judged for each input; the reproducers of every bug
the campaigns found, replayed; and the harness itself shown to catch each kind of failure.

The long lane is ``make fuzz`` (``python -m tests.fuzz``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fuzz import contract
from fuzz.runner import Lane, campaign, replay
from fuzz.targets import Target, all_targets

TARGETS = all_targets()
#: inputs of a target of weight 1 (an expensive target runs ``QUICK_INPUTS / weight``), fixed seed
QUICK_INPUTS = 240
#: every n-th input also runs in a forked child under RLIMIT_AS and the 10 s alarm (its command line, if any)
CHILD_EVERY = 24
REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_quick_lane(name, tmp_path):
    target = TARGETS[name]
    report = campaign(target, count=int(QUICK_INPUTS / target.weight), seed=0,
                      lane=Lane(in_process=True, child_every=CHILD_EVERY), failures_dir=tmp_path / "failures",
                      workdir=tmp_path / "work")
    assert report.failures == 0, report.summary() + "\n" + "\n".join(report.examples.values())
    # the mutations reach both outcomes: inputs that still read and inputs that are refused
    assert report.ok > 0 and report.refused > 0, report.summary()
    assert report.in_child >= 2


@pytest.mark.parametrize("folder", sorted(p for p in REGRESSIONS.glob("*/*") if p.is_dir()),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression(folder):
    """Each reproducer of a bug a campaign found (its failure.txt says which): read or refused in one line now,
    in this process and in a child under the limits, through the API and the command line."""
    verdicts = replay(TARGETS[folder.parent.name], folder)
    assert not any(v.failed for v in verdicts), [(v.mode, v.kind, v.detail[-1500:]) for v in verdicts]


# ---------------------------------------------------------------------------------------- the harness
class _Probe(Target):
    """A target whose reader misbehaves as told (to show that the judge sees each kind of failure)."""

    name = "probe"
    outputs = ("out.txt",)

    def __init__(self, behaviour: str):
        super().__init__()
        self.behaviour = behaviour

    def seeds(self, context):
        return [{"in.txt": b"x"}]

    def run(self, case):
        from sphereface_plus.errors import InputFileError

        b = self.behaviour
        if b == "ok":
            (case / "out.txt").write_text("result")
            return 1
        if b == "refuse":
            raise InputFileError(f"{case / 'in.txt'}: not what was expected")
        if b == "unnamed":
            raise InputFileError("something is wrong")
        if b == "traceback":
            return {}["missing"]
        if b == "memory":
            return np.ones(3 << 30, dtype=np.uint8)  # 3 GiB, over the 1 GiB the child may add
        if b == "hang":
            while True:
                pass
        if b == "crash":
            os.abort()
        if b == "stray":
            (case.parent / "elsewhere.txt").write_text("x")
            return 1
        if b == "overwrite":
            (case / "in.txt").write_text("changed")
            return 1
        raise AssertionError(b)

    def check(self, result, case):
        return "zero is not a result" if result == 0 else None


@pytest.mark.parametrize("behaviour,status,kind", [
    ("ok", "ok", ""), ("refuse", "refused", ""), ("unnamed", "fail", "error-line"),
    ("traceback", "fail", "traceback"), ("memory", "fail", "memory"), ("hang", "fail", "hang"),
    ("crash", "fail", "crash"), ("stray", "fail", "stray-write"), ("overwrite", "fail", "stray-write"),
])
def test_the_judge_sees_every_kind_of_failure(behaviour, status, kind, tmp_path, monkeypatch):
    monkeypatch.setattr(contract, "HANG_SECONDS", 1)
    target = _Probe(behaviour)
    target.prepare(tmp_path / "context")
    case = tmp_path / "sandbox" / "case"
    case.mkdir(parents=True)
    (case / "in.txt").write_text("x")
    verdict = contract.judge_in_child(target, case, tmp_path / "sandbox", target.names(case))
    assert (verdict.status, verdict.kind) == (status, kind), verdict
    if behaviour == "memory":  # refused by RLIMIT_AS, not taken from the machine
        assert verdict.peak_mib is not None and verdict.peak_mib < 1024


def test_the_judge_reads_a_command_line_strictly():
    names = ["pairs.txt"]
    ok, one, two, bare, trace = (
        contract.judge_cli(0, "12:00 INFO x: done\n", names, (0,)),
        contract.judge_cli(2, "sphereface-plus verify: error: pairs.txt:3: bad field\n", names, (0,)),
        contract.judge_cli(2, "libpng error: IDAT: CRC error\nsphereface-plus verify: error: pairs.txt: bad\n", names,
                           (0,)),
        contract.judge_cli(2, "sphereface-plus verify: error: something is wrong\n", names, (0,)),
        contract.judge_cli(1, "Traceback (most recent call last):\n  File x\nValueError: y\n", names, (0,)))
    assert ok.status == "ok" and one.status == "refused"
    assert (two.kind, bare.kind, trace.kind) == ("error-line", "error-line", "traceback")


# ---------------------------------------------------------------------------- contracts in particular
def test_hostile_pickles_run_nothing_and_allocate_nothing(tmp_path, monkeypatch):
    """Code from a pickle (os.system, exec, eval, subprocess), a hex-encoding bomb through the one allowed global
    (_codecs.encode: 2**30 bytes from 500) and one bytearray referenced 2000 times are all refused."""
    from eval.pairs import load_bin_pack
    from fuzz.targets.packs import CANARY, hostile_pickles
    from sphereface_plus.errors import InputFileError

    monkeypatch.chdir(tmp_path)
    for i, data in enumerate(hostile_pickles()):
        (tmp_path / f"{i}.bin").write_bytes(data)
        with pytest.raises(InputFileError, match=f"{i}.bin"):
            load_bin_pack(tmp_path / f"{i}.bin")
    assert not (tmp_path / CANARY).exists()


@pytest.mark.parametrize("which", range(10))
def test_decompression_bombs_are_refused_from_the_header(which, tmp_path):
    """A small file whose header claims 10**8..10**10 pixels is refused by every image reader before decoding
    (none of them allocates the claim), naming the file and the limit."""
    from data_prep.image_files import MAX_PIXELS_ENV, check_image_header, read_image_file
    from eval.embedder import read_image
    from fuzz.targets.images import hostile_images
    from sphereface_plus.errors import InputFileError

    data = hostile_images()[which]
    path = tmp_path / "bomb.img"
    path.write_bytes(data)
    with pytest.raises(InputFileError, match="is over the limit of 40,000,000 pixels"):
        check_image_header(data)
    with pytest.raises(InputFileError, match=f"bomb.img.*{MAX_PIXELS_ENV}"):
        read_image(path)
    with pytest.raises(InputFileError, match="bomb.img"):
        read_image_file(path)


def test_the_pixel_limit_is_one_setting(tmp_path, monkeypatch):
    """SPHEREFACE_PLUS_MAX_IMAGE_PIXELS moves the limit for every reader; the default reads a 40 MP photo."""
    from data_prep.image_files import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, check_image_header, max_image_pixels
    from fuzz.targets.common import crop, encode
    from fuzz.targets.images import png_claiming
    from sphereface_plus.errors import InputFileError, UsageError

    assert max_image_pixels() == DEFAULT_MAX_PIXELS == 40_000_000
    assert check_image_header(png_claiming(8000, 5000)) == (8000, 5000)  # exactly the limit
    with pytest.raises(InputFileError):
        check_image_header(png_claiming(8001, 5000))
    jpeg = encode(crop(0, 0), ".jpg")
    assert check_image_header(jpeg) == (96, 112)
    monkeypatch.setenv(MAX_PIXELS_ENV, "10000")  # below a 112x96 crop
    with pytest.raises(InputFileError, match="10,000 pixels"):
        check_image_header(jpeg)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1e9")
    assert check_image_header(png_claiming(30_000, 30_000)) == (30_000, 30_000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(UsageError, match=MAX_PIXELS_ENV):
        max_image_pixels()


def test_image_sizes_from_the_header_match_the_decoded_images():
    """The header reader against OpenCV's decoder, for every format the toolkit reads (the sizes decide the limit)."""
    import cv2

    from data_prep.image_files import image_size
    from fuzz.targets.common import crop, encode

    image = np.ascontiguousarray(crop(2, 1)[:101, :77])  # odd sizes: no format pads them
    for ext, extra in ((".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", []), (".bmp", []),
                       (".ppm", []), (".pgm", []), (".tiff", []), (".webp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
                       (".jp2", []), (".pam", [])):
        data = encode(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if ext == ".pgm" else image, ext, *extra)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image_size(data)[1] == (decoded.shape[1], decoded.shape[0]) == (77, 101), ext


def test_a_yaml_alias_bomb_is_refused_in_a_moment(tmp_path):
    """Nine levels of ten aliases (10**9 values in 300 bytes) and 100,000 nested brackets: one line each."""
    from sphereface_plus.config import ConfigError
    from sphereface_plus.face.config import load_config

    bomb = "a: &a [" + "x," * 10 + "]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(9))
    (tmp_path / "bomb.yaml").write_text(bomb + "model: {kwargs: {x: *j}}\n")
    with pytest.raises(ConfigError, match="bomb.yaml.*expands"):
        load_config(str(tmp_path / "bomb.yaml"))
    (tmp_path / "deep.yaml").write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="deep.yaml"):
        load_config(str(tmp_path / "deep.yaml"))


# ------------------------------------------- reproducers too large to store as files, rebuilt from the seeds
@pytest.mark.parametrize("change", ["blocks", "block-count", "embedding", "kwargs-type", "builder-value", "config-type",
                                    "laughs", "negative-width", "infinite-blocks", "preprocessing-laughs"])
def test_a_checkpoint_config_the_weights_cannot_justify_is_refused(change, tmp_path):
    """The campaign's checkpoint reproducers (2 MB each): a config asking for a network far larger than the file
    (it used to be built: 2 TB asked of the allocator; a block count of 10**30 was built part by part on the meta
    device until the 10 s limit), values the builder rejects with ValueError, config
    entries of the wrong type, and a billion-laughs structure under a kept checksum: one CheckpointError each,
    before anything large is allocated."""
    from eval.features import load_embedding_model
    from fuzz.mutate import wide_alias
    from fuzz.targets.common import checkpoint_bytes, tiny_checkpoint_state
    from sphereface_plus.errors import CheckpointError

    state = tiny_checkpoint_state()
    model = state["config"]["model"]
    if change == "blocks":
        model["kwargs"] = {"scale": 1, "blocks": [1000, 1000, 1000, 1000]}
    elif change == "block-count":
        model["kwargs"] = {"scale": 1, "blocks": [1, 1, 1, 10 ** 30]}
    elif change == "embedding":
        model["embedding_dim"] = 10 ** 9
    elif change == "kwargs-type":
        model["kwargs"] = {"scale": ""}
    elif change == "builder-value":
        model["kwargs"] = {"blocks": []}
    elif change == "config-type":
        state["config"] = dict(state["config"], data=7)
    elif change == "negative-width":  # the builder's own RuntimeError (a tensor of negative size)
        model["embedding_dim"] = -1
    elif change == "infinite-blocks":  # int(inf) in the builder: OverflowError
        model["kwargs"] = {"scale": 1, "blocks": [1, 1, float("inf"), 1]}
    elif change == "preprocessing-laughs":  # an imported model's text field as a billion-laughs list (its repr hung)
        from sphereface_plus.importers.preprocessing import INSIGHTFACE

        state["preprocessing"] = dict(INSIGHTFACE.to_dict(), template="112x96", embedding=wide_alias(9))
    else:
        state["config"]["notes"] = wide_alias(9)
    path = tmp_path / "model.pt"
    if change == "preprocessing-laughs":  # as the campaign wrote it: without a checksum (an older toolkit's file)
        path.write_bytes(checkpoint_bytes(state, integrity=False))
    else:
        path.write_bytes(checkpoint_bytes(state) if change != "laughs" else _keep_digest(state))
    with pytest.raises(CheckpointError, match="model.pt"):
        load_embedding_model(path)


@pytest.mark.parametrize("weights", ["nan", "zero"])
def test_verify_names_the_checkpoint_whose_features_cannot_be_scored(weights, tmp_path, capsys):
    """The campaign's reproducers (2 MB each, rebuilt): weights that give NaN features, or the same feature for
    every image, are refused by ``verify`` in one line that names the checkpoint (it named no file)."""
    import torch

    from fuzz.targets.common import checkpoint_bytes, crops_and_pairs, tiny_checkpoint_state
    from sphereface_plus.cli import main

    crops, pairs = crops_and_pairs(tmp_path)
    state = tiny_checkpoint_state()
    last = [k for k, v in state["model"].items() if v.is_floating_point() and v.dim() >= 2][-1]
    fill = float("nan") if weights == "nan" else 0.0
    state["model"] = dict(state["model"], **{last: torch.full_like(state["model"][last], fill)})
    (tmp_path / "model.pt").write_bytes(checkpoint_bytes(state))
    status = main(["verify", "pairs", "--checkpoint", str(tmp_path / "model.pt"), "--root", str(crops), "--pairs",
                   str(pairs), "--workers", "0", "--runtime", "torch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "model.pt" in err[0], err


def _keep_digest(state) -> bytes:
    """``state`` saved with the digest of the tiny model's intact state (computing its own would not end)."""
    import io

    import torch

    from fuzz.targets.common import tiny_checkpoint_state
    from sphereface_plus.engine.checkpoint import INTEGRITY_KEY, state_digest

    buf = io.BytesIO()
    torch.save({**state, INTEGRITY_KEY: {"algorithm": "sha256", "digest": state_digest(tiny_checkpoint_state())}}, buf)
    return buf.getvalue()


def test_megaface_export_writes_nothing_outside_its_folder(tmp_path, monkeypatch):
    """A list entry '../x.jpg' made ``megaface export`` write --out/../x.jpg_sphereface.bin: refused now, before
    anything is written (the list names the file and the entry)."""
    from fuzz.targets.common import checkpoint_bytes, crops_and_pairs, tiny_checkpoint_state
    from sphereface_plus.cli import main

    crops, _ = crops_and_pairs(tmp_path)
    (tmp_path / "model.pt").write_bytes(checkpoint_bytes(tiny_checkpoint_state()))
    (crops / "id0" / "x.jpg").write_bytes((crops / "id0" / "0.jpg").read_bytes())
    (tmp_path / "list.txt").write_text("id0/0.jpg\nid0/../id0/x.jpg\n")
    monkeypatch.chdir(tmp_path)
    before = contract.snapshot(tmp_path)
    assert main(["megaface", "export", "--checkpoint", "model.pt", "--list", "list.txt", "--root", str(crops),
                 "--out", "feats/sub", "--workers", "0"]) == 2
    assert contract.stray_writes(before, contract.snapshot(tmp_path), []) == []


def test_caffe_margin_settings_and_mhe_gan_step_are_checked(tmp_path):
    """Found while writing those targets (their seeds are 30-45 MB): a negative A-Softmax lambda_min in fc6 raised
    the head's ValueError; a NaN global_step in an MHE-GAN bundle raised int()'s."""
    from fuzz.targets.models import _bundle
    from sphereface_plus.errors import CheckpointError
    from sphereface_plus.importers.caffe import import_caffe
    from sphereface_plus.importers.mhe_gan import import_mhe_gan
    from test_import import caffe_weights, mhe_gan_variables, release_prototxt, write_caffemodel

    text = release_prototxt((0, 0, 0, 0), margin=5)
    bad = text.replace("lambda_min: 5", "lambda_min: -5")
    (tmp_path / "net.prototxt").write_text(text)
    write_caffemodel(tmp_path / "w.caffemodel", bad, caffe_weights((0, 0, 0, 0), classes=5))
    with pytest.raises(CheckpointError, match="w.caffemodel.*fc6"):
        import_caffe(tmp_path / "net.prototxt", tmp_path / "w.caffemodel")
    variables = mhe_gan_variables()
    variables["global_step"] = np.array(float("nan"), np.float32)
    for name, data in _bundle(variables).items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match="global_step"):
        import_mhe_gan(tmp_path / "model.ckpt-7")
