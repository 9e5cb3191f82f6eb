"""Tests of ``sphereface-plus align`` (data_prep.prepare) on trees built here from real LFW images.

The trees mix real images with every kind of bad input the command must report (corrupt and
truncated JPEGs, empty and non-image files, grayscale and RGBA images, bad landmark lines, landmark
entries without an image). Crops are checked against align_face on the same image (tested on its
own in test_geometry.py), labels against the sorted folder order, resume against file identities.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep.geometry import align_face
from data_prep.image_files import read_image
from data_prep.file_tree import output_complete
from data_prep.prepare import LFW_OVERLAP_CASIA
from sphereface_plus.cli import main as cli_main
from shared_data import LFW

ROOT = Path(__file__).resolve().parents[1]
needs_lfw = pytest.mark.skipif(not (LFW / "lfw_landmark.txt").is_file(), reason=f"real LFW data not found at {LFW}")


def _align(*argv) -> int:
    return cli_main(["align", *map(str, argv)])


def _manifest(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        assert set(r) == {"path", "status", "reason"}, r
        assert r["status"] in ("aligned", "skipped", "failed")
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "one manifest line per input"
    return {r["path"]: r for r in rows}


def _lfw_landmarks() -> dict:
    out = {}
    for line in (LFW / "lfw_landmark.txt").read_text().splitlines():
        parts = line.split()
        out[parts[0]] = np.array(parts[1:], dtype=np.float64).reshape(5, 2)
    return out


def _fmt(rel: str, pts: np.ndarray) -> str:
    return rel + "\t" + "\t".join(f"{v:g}" for v in pts.reshape(-1))


@pytest.fixture(scope="module")
def lfw_lm():
    if not (LFW / "lfw_landmark.txt").is_file():
        pytest.skip(f"real LFW data not found at {LFW}")
    return _lfw_landmarks()


@pytest.fixture()
def bad_tree(tmp_path, lfw_lm):
    """An identity tree of real LFW images and bad inputs, its landmark file and the expectations."""
    src = tmp_path / "in"
    people = sorted({k.split("/")[0] for k in lfw_lm if k.endswith("_0002.jpg")})[:3]
    lines, expect, ref = [], {}, {}  # expect: rel -> (status, reason fragment); ref: rel -> (source image, landmarks)

    def put(rel, data):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)

    for p in people:
        for k in (1, 2):
            rel = f"{p}/{p}_{k:04d}.jpg"
            put(rel, (LFW / "images" / rel).read_bytes())
            lines.append(_fmt(rel, lfw_lm[rel]))
            expect[rel] = ("aligned", "landmarks.txt line")
            ref[rel] = (src / rel, lfw_lm[rel])
    # a repeated line for an image: the first one is used
    first = f"{people[0]}/{people[0]}_0001.jpg"
    lines.append(_fmt(first, lfw_lm[first] + 5.0))
    donor = f"{people[1]}/{people[1]}_0001.jpg"
    real = (LFW / "images" / donor).read_bytes()
    p2, p3 = people[1], people[2]
    put(f"{p2}/notes.txt", b"photographer: unknown\n")
    expect[f"{p2}/notes.txt"] = ("failed", "not an image")
    put(f"{p2}/empty.jpg", b"")
    expect[f"{p2}/empty.jpg"] = ("failed", "empty file")
    put(f"{p3}/truncated.jpg", real[: len(real) * 6 // 10])
    lines.append(_fmt(f"{p3}/truncated.jpg", lfw_lm[donor]))
    expect[f"{p3}/truncated.jpg"] = ("failed", "truncated JPEG")
    rng = np.random.default_rng(0)
    put(f"{p3}/corrupt.jpg", b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + b"\xff\xd9")
    lines.append(_fmt(f"{p3}/corrupt.jpg", lfw_lm[donor]))
    expect[f"{p3}/corrupt.jpg"] = ("failed", "corrupt JPEG")
    bgr = cv2.imread(str(LFW / "images" / donor), cv2.IMREAD_COLOR)
    ok, gray_png = cv2.imencode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    put("Gray_Person/Gray_Person_0001.png", gray_png.tobytes())
    lines.append(_fmt("Gray_Person/Gray_Person_0001.png", lfw_lm[donor]))
    expect["Gray_Person/Gray_Person_0001.png"] = ("aligned", "grayscale")
    ref["Gray_Person/Gray_Person_0001.png"] = (src / "Gray_Person/Gray_Person_0001.png", lfw_lm[donor])
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 128, np.uint8)])
    put("Alpha_Person/Alpha_Person_0001.png", cv2.imencode(".png", bgra)[1].tobytes())
    lines.append(_fmt("Alpha_Person/Alpha_Person_0001.png", lfw_lm[donor]))
    expect["Alpha_Person/Alpha_Person_0001.png"] = ("aligned", "alpha")
    ref["Alpha_Person/Alpha_Person_0001.png"] = (src / "Alpha_Person/Alpha_Person_0001.png", lfw_lm[donor])
    # landmark-line problems for images that exist
    for i, name in enumerate(("good", "fields", "number", "noline")):
        rel = f"Bad_Lines/Bad_Lines_{i + 1:04d}.jpg"
        put(rel, real)
        if name == "good":
            lines.append(_fmt(rel, lfw_lm[donor]))
            expect[rel] = ("aligned", "landmarks.txt line")
            ref[rel] = (src / rel, lfw_lm[donor])
        elif name == "fields":
            lines.append(rel + "\t" + "\t".join(["100"] * 9))  # 9 numbers
            expect[rel] = ("failed", "expected a path and 10 numbers")
        elif name == "number":
            lines.append(rel + " abc " + " ".join(["100"] * 9))  # space separated, one non-number
            expect[rel] = ("failed", "'abc' is not a number")
        else:
            expect[rel] = ("skipped", "no entry in the landmark file")
    # a landmark entry without an image is unused (not in the manifest), a top-level README is no input,
    # a top-level image is an input outside any identity folder
    lines.append(_fmt("Ghost/Ghost_0001.jpg", lfw_lm[donor]))
    put("README.txt", b"not a face\n")
    put("Stray.jpg", real)
    expect["Stray.jpg"] = ("failed", "not inside an identity folder")
    lm_file = tmp_path / "landmarks.txt"
    lm_file.write_text("\n".join(lines) + "\n")
    return src, lm_file, expect, ref


def _crop_ref(path: Path, pts: np.ndarray) -> np.ndarray:
    return align_face(cv2.imread(str(path), cv2.IMREAD_COLOR), pts)


@needs_lfw
def test_bad_inputs_are_reported_and_good_ones_aligned(bad_tree, tmp_path):
    src, lm_file, expect, ref = bad_tree
    out = tmp_path / "out"
    assert _align("--input", src, "--output", out, "--landmarks", lm_file, "--format", "png", "--workers", "2") == 3
    man = _manifest(out)
    assert set(man) == set(expect)
    for rel, (status, frag) in expect.items():
        assert man[rel]["status"] == status, (rel, man[rel])
        assert frag in man[rel]["reason"], (rel, man[rel])
    # bad landmark lines are named by line number
    assert "landmarks.txt line" in man["Bad_Lines/Bad_Lines_0002.jpg"]["reason"]
    # every aligned crop equals align_face on the same picture (png: bit exact)
    for rel, (path, pts) in ref.items():
        crop = cv2.imread(str(out / (os.path.splitext(rel)[0] + ".png")), cv2.IMREAD_UNCHANGED)
        assert crop.shape == (112, 96, 3)
        np.testing.assert_array_equal(crop, _crop_ref(path, pts), err_msg=rel)
    # no output for anything that was not aligned; no temporary file left
    made = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert made == {os.path.splitext(r)[0] + ".png" for r in ref}
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
    # list: aligned crops only, labels 0..C-1 in sorted identity-folder order
    rows = [line.split() for line in (out / "list.txt").read_text().splitlines()]
    classes = sorted({r.split("/")[0] for r in ref})
    assert sorted(r[0] for r in rows) == sorted(made)
    for path, label in rows:
        assert int(label) == classes.index(path.split("/")[0])
    assert sorted({int(lab) for _, lab in rows}) == list(range(6))  # 6 folders with aligned crops, no gaps


@needs_lfw
def test_resume_keeps_finished_crops(bad_tree, tmp_path):
    src, lm_file, expect, ref = bad_tree
    out = tmp_path / "out"
    assert _align("--input", src, "--output", out, "--landmarks", lm_file, "--format", "png") == 3
    first = _manifest(out)
    crops = sorted(out.rglob("*.png"))
    gone, half, kept = crops[0], crops[1], crops[2:]
    gone.unlink()
    data = half.read_bytes()
    half.write_bytes(data[: len(data) // 2])  # what a power loss could leave without the final sync
    stray = crops[2].parent / f".{crops[2].name}.4242.tmp"
    stray.write_bytes(data[:100])
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
    (out / "list.txt").unlink()
    assert _align("--input", src, "--output", out, "--landmarks", lm_file, "--format", "png") == 3
    second = _manifest(out)
    assert {k: v["status"] for k, v in second.items()} == {k: v["status"] for k, v in first.items()}
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == stamps  # not redone
    assert not stray.exists()
    for p in (gone, half):
        rel = next(r for r in ref if os.path.splitext(r)[0] == os.path.splitext(p.relative_to(out).as_posix())[0])
        np.testing.assert_array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), _crop_ref(*ref[rel]))
    resumed = [k for k, v in second.items() if "done in an earlier run" in v["reason"]]
    assert len(resumed) == len(kept)
    assert all("landmarks.txt line" in second[k]["reason"] for k in resumed)  # kept from the first manifest
    assert (out / "list.txt").read_text().count("\n") == len(crops)
    # resuming with settings that change the crops is a usage error
    assert _align("--input", src, "--output", out, "--landmarks", lm_file, "--format", "jpg") == 2


@needs_lfw
def test_killed_run_resumes_without_redoing_work(tmp_path, lfw_lm):
    """SIGKILL a real `python -m sphereface_plus align` mid-run, check no partial crop, then resume."""
    src = tmp_path / "in"
    src.mkdir()
    people, n = [], 0
    by_person = {}
    for rel in lfw_lm:
        by_person.setdefault(rel.split("/")[0], []).append(rel)
    for p in sorted(by_person):
        os.symlink(LFW / "images" / p, src / p)  # symlinked identity folders are followed
        people.append(p)
        n += len(by_person[p])
        if n >= 1500:
            break
    lm_file = tmp_path / "lm.txt"
    lm_file.write_text("".join(_fmt(r, lfw_lm[r]) + "\n" for p in people for r in by_person[p]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sphereface_plus", "align", "--input", str(src), "--output", str(out),
           "--landmarks", str(lm_file), "--workers", "2"]
    env = dict(os.environ, SPHEREFACE_PLUS_PROGRESS="0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and sum(1 for _ in out.glob("*/*.jpg")) >= 40:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = sorted(out.glob("*/*.jpg"))
    assert 40 <= len(done) < n
    assert not (out / "manifest.jsonl").exists()
    for p in done:  # every crop under its final name is complete
        assert output_complete(str(p)), p
        img = cv2.imread(str(p))
        assert img is not None and img.shape == (112, 96, 3), p
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}
    assert _align("--input", src, "--output", out, "--landmarks", lm_file, "--workers", "2") == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == stamps
    man = _manifest(out)
    assert len(man) == n and all(v["status"] == "aligned" for v in man.values())
    assert sum("done in an earlier run" in v["reason"] for v in man.values()) == len(done)
    assert sum(1 for _ in out.glob("*/*.jpg")) == n
    assert not [p for p in out.rglob(".*.tmp")]
    # crops from the killed run and from the resumed one are the same as a fresh computation
    rng = np.random.default_rng(0)
    for rel in rng.choice(sorted(man), size=10, replace=False):
        crop = cv2.imread(str(out / rel))
        ref = _crop_ref(LFW / "images" / rel, lfw_lm[rel])
        assert np.abs(crop.astype(int) - ref.astype(int)).mean() < 2.0  # JPEG quality 95


def _casia_tree(tmp_path):
    """A CASIA-like tree (7-digit identity folders, NNN.jpg) of synthetic faces with a landmark file."""
    from data_prep.synthetic import make_synthetic_dataset

    syn = make_synthetic_dataset(tmp_path / "syn", 20, 2, seed=1, pairs_per_fold=2, workers=1)
    ids = ["0000045", LFW_OVERLAP_CASIA[0], "0200000", LFW_OVERLAP_CASIA[1], LFW_OVERLAP_CASIA[2], "2000000"]
    src = tmp_path / "casia"
    lines = []
    for k, ident in enumerate(ids):
        for j in range(2):
            rel = f"{ident}/{j + 1:03d}.jpg"
            (src / ident).mkdir(parents=True, exist_ok=True)
            name = syn.identities[k]
            shutil.copy(syn.images / f"{name}/{name}_{j + 1:04d}.jpg", src / rel)
            lines.append(_fmt(rel, syn.landmarks[f"{name}/{name}_{j + 1:04d}.jpg"]))
    (tmp_path / "casia_lm.txt").write_text("\n".join(lines) + "\n")
    return src, tmp_path / "casia_lm.txt"


def test_exclude_lfw_overlap_and_labels(tmp_path):
    src, lm = _casia_tree(tmp_path)
    out = tmp_path / "out"
    lst = tmp_path / "train.txt"
    assert _align("--input", src, "--output", out, "--landmarks", lm, "--exclude-lfw-overlap", "--list", lst,
                  "--template", "112x112", "--workers", "1") == 0
    man = _manifest(out)
    assert sorted(man) == [f"{i}/{j:03d}.jpg" for i in ("0000045", "0200000", "2000000") for j in (1, 2)]
    rows = [line.split() for line in lst.read_text().splitlines()]
    assert rows == [[f"{i}/{j:03d}.jpg", str(lab)] for lab, i in enumerate(("0000045", "0200000", "2000000")) for j in (1, 2)]
    assert cv2.imread(str(out / rows[0][0])).shape == (112, 112, 3)
    assert not any((out / i).exists() for i in LFW_OVERLAP_CASIA)
    # without the option all six identities are aligned and labelled in sorted order
    out2 = tmp_path / "out2"
    assert _align("--input", src, "--output", out2, "--landmarks", lm, "--workers", "1") == 0
    labels = {line.split()[0].split("/")[0]: int(line.split()[1]) for line in (out2 / "list.txt").read_text().splitlines()}
    assert labels == {i: k for k, i in enumerate(sorted(labels))} and len(labels) == 6
    # MATLAB 1-based landmarks (every value + 1) with --landmark-base 1 give the very same crops
    lm1 = tmp_path / "lm1.txt"
    lm1.write_text("".join(p[0] + "\t" + "\t".join(f"{float(v) + 1:.4f}" for v in p[1:]) + "\n"
                           for p in (ln.split() for ln in lm.read_text().splitlines())))
    out3 = tmp_path / "out3"
    assert _align("--input", src, "--output", out3, "--landmarks", lm1, "--landmark-base", "1", "--format", "png",
                  "--workers", "1") == 0
    out4 = tmp_path / "out4"
    assert _align("--input", src, "--output", out4, "--landmarks", lm, "--format", "png", "--workers", "1") == 0
    for p in out4.rglob("*.png"):
        assert (out3 / p.relative_to(out4)).read_bytes() == p.read_bytes()


def test_fallback_and_usage_errors(tmp_path):
    src, lm = _casia_tree(tmp_path)
    lines = lm.read_text().splitlines()
    lm.write_text("\n".join(lines[1:]) + "\n")  # 0000045/001.jpg has no entry now
    out = tmp_path / "out"
    assert _align("--input", src, "--output", out, "--landmarks", lm, "--workers", "1") == 3
    assert _manifest(out)["0000045/001.jpg"]["status"] == "skipped"
    out2 = tmp_path / "out2"
    assert _align("--input", src, "--output", out2, "--landmarks", lm, "--fallback", "--workers", "1") == 0
    r = _manifest(out2)["0000045/001.jpg"]
    assert r["status"] == "aligned" and "fallback" in r["reason"]
    # an output folder inside the input is not read back as an identity
    inner = src / "aligned"
    assert _align("--input", src, "--output", inner, "--landmarks", lm, "--workers", "1") == 3
    assert not [k for k in _manifest(inner) if k.startswith("aligned/")]
    assert _align("--input", src, "--output", inner, "--landmarks", lm, "--workers", "1") == 3
    shutil.rmtree(inner)
    assert _align("--input", tmp_path / "nowhere", "--output", out) == 2
    (tmp_path / "empty").mkdir()
    assert _align("--input", tmp_path / "empty", "--output", tmp_path / "out3", "--landmarks", lm) == 2
    assert _align("--input", src, "--output", out, "--landmarks", tmp_path / "missing.txt") == 2
    assert _align("--input", src, "--output", src) == 2
    with pytest.raises(SystemExit) as e:
        _align("--input", src, "--output", out, "--template", "96x96")
    assert e.value.code == 2


def test_read_image_classification():
    bgr = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    jpg = cv2.imencode(".jpg", bgr)[1].tobytes()
    img, notes = read_image(jpg)
    assert img.shape == (40, 30, 3) and notes == []
    with pytest.raises(ValueError, match="truncated JPEG"):
        read_image(jpg[: len(jpg) - 50])
    img, _ = read_image(jpg + b"trailing junk after the end marker")
    assert img.shape == (40, 30, 3)
    img16 = (bgr.astype(np.uint16) * 257)
    img, notes = read_image(cv2.imencode(".png", img16)[1].tobytes())
    np.testing.assert_array_equal(img, bgr)
    assert notes == ["16-bit input scaled to 8 bit"]
    with pytest.raises(ValueError, match="corrupt PNG"):
        read_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ValueError, match="empty file"):
        read_image(b"")


def _detector_or_skip(name):
    try:
        from data_prep.detectors import create_detector
    except ImportError as exc:
        pytest.skip(f"detectors not available: {exc}")
    try:
        return create_detector(name)
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"{name} weights not installed ({exc}); run sphereface-plus fetch-weights")


@needs_lfw
@pytest.mark.parametrize("name", ["mtcnn", "retinaface"])
def test_detector_path(tmp_path, lfw_lm, name):
    det = _detector_or_skip(name)
    from data_prep.detectors import select_face

    src = tmp_path / "in"
    rels = [r for r in sorted(lfw_lm) if r.endswith("_0001.jpg")][:2]
    for rel in rels:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(LFW / "images" / rel, src / rel)
    (src / "Nobody").mkdir()
    cv2.imwrite(str(src / "Nobody/Nobody_0001.jpg"), np.full((250, 250, 3), 127, np.uint8))
    out = tmp_path / "out"
    assert _align("--input", src, "--output", out, "--detector", name, "--workers", "1", "--format", "png") == 3
    man = _manifest(out)
    assert man["Nobody/Nobody_0001.jpg"]["status"] == "skipped"
    assert "no face" in man["Nobody/Nobody_0001.jpg"]["reason"]
    for rel in rels:
        assert man[rel]["status"] == "aligned" and name in man[rel]["reason"]
        crop = cv2.imread(str(out / rel.replace(".jpg", ".png")))
        img = cv2.imread(str(src / rel))
        boxes, pts = det.detect(img)
        _, _, p = select_face(boxes, pts, img.shape, policy="center")
        np.testing.assert_array_equal(crop, align_face(img, p), err_msg=rel)  # wiring: detector -> crop
        # and the detector's points are close to the landmark file's: the crops correlate strongly
        ref = _crop_ref(src / rel, lfw_lm[rel]).astype(np.float64).ravel()
        assert np.corrcoef(crop.astype(np.float64).ravel(), ref)[0, 1] > 0.8, rel
    only = tmp_path / "nobody"
    (only / "Nobody").mkdir(parents=True)
    shutil.copy(src / "Nobody/Nobody_0001.jpg", only / "Nobody/Nobody_0001.jpg")
    out2 = tmp_path / "out2"
    assert _align("--input", only, "--output", out2, "--detector", name, "--workers", "1", "--fallback") == 0
    r = _manifest(out2)["Nobody/Nobody_0001.jpg"]
    assert r["status"] == "aligned" and "fallback" in r["reason"]
