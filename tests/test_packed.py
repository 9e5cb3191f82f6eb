"""Tests of the packed crop format (data_prep.packed) and of ``align --pack``."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep.packed import INDEX_NAME, PackedReader, PackWriter, pack_folder
from sphereface_plus.cli import main as cli_main


def _crops(n, h=112, w=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_writer_reader_round_trip(tmp_path):
    imgs = _crops(7)
    paths = [f"id{i % 3}/{i}.jpg" for i in range(7)]
    labels = [i % 3 for i in range(7)]
    with PackWriter(tmp_path, 7, 112, 96) as w:
        for im in imgs:
            w.add(im)
        w.finish(paths, labels, ["id0", "id1", "id2"], "112x96")
    r = PackedReader(tmp_path)
    assert len(r) == 7 and r.num_classes == 3 and r.image_shape == (112, 96, 3) and r.template == "112x96"
    np.testing.assert_array_equal(r.labels, labels)
    for i in (6, 0, 3, -1):  # random access, negative index
        img, lab = r[i]
        np.testing.assert_array_equal(img, imgs[i])
        assert lab == labels[i] and img.dtype == np.uint8 and img.flags.writeable
    assert r.path(4) == paths[4]
    with pytest.raises(IndexError):
        r[7]
    # the file is a plain .npy: numpy maps it directly
    arr = np.load(tmp_path / "packed.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape == (7, 112, 96, 3)
    # lossless bytes for decoders, and pickling for DataLoader workers (the map is not pickled)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(r.read_bytes(2), np.uint8), cv2.IMREAD_COLOR), imgs[2])
    r2 = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(r2[5][0], imgs[5])
    # the reader also accepts the index or the data file path
    assert len(PackedReader(tmp_path / INDEX_NAME)) == 7 and len(PackedReader(tmp_path / "packed.npy")) == 7


def test_failed_write_leaves_previous_pack(tmp_path):
    imgs = _crops(3)
    with PackWriter(tmp_path, 3, 112, 96) as w:
        for im in imgs:
            w.add(im)
        w.finish(["a/1", "a/2", "b/1"], [0, 0, 1], ["a", "b"], "112x96")
    before = (tmp_path / "packed.npy").read_bytes(), (tmp_path / INDEX_NAME).read_bytes()
    with pytest.raises(ValueError, match="112, 112, 3"):
        with PackWriter(tmp_path, 3, 112, 96) as w:
            w.add(imgs[0])
            w.add(np.zeros((112, 112, 3), np.uint8))  # a crop of another template
    with pytest.raises(ValueError, match="incomplete"):
        with PackWriter(tmp_path, 3, 112, 96) as w:
            w.add(imgs[0])
            w.finish(["x"], [0], ["x"], "112x96")
    assert ((tmp_path / "packed.npy").read_bytes(), (tmp_path / INDEX_NAME).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.json", "packed.npy"]  # no temp files


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--pack"):
        PackedReader(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a sphereface-plus-pack"):
        PackedReader(tmp_path)
    idx = {"format": "sphereface-plus-pack", "version": 1, "data": "packed.npy", "shape": [2, 4, 4, 3],
           "template": "112x96", "classes": ["a"], "paths": ["a/1", "a/2"], "labels": [0, 0]}
    (tmp_path / INDEX_NAME).write_text(json.dumps(idx))
    np.save(tmp_path / "packed.npy", np.zeros((3, 4, 4, 3), np.uint8))  # disagrees with the index
    with pytest.raises(ValueError, match="says"):
        PackedReader(tmp_path)[0]
    idx["labels"] = [0, 1]
    (tmp_path / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="labels outside"):
        PackedReader(tmp_path)


def test_align_pack_round_trip(tmp_path):
    """`align --pack` on synthetic faces: the pack equals the crops on disk and the list file."""
    from data_prep.synthetic import make_synthetic_dataset

    syn = make_synthetic_dataset(tmp_path / "syn", 20, 4, seed=2, pairs_per_fold=2, workers=1)
    out = tmp_path / "aligned"
    rc = cli_main(["align", "--input", str(syn.images), "--output", str(out), "--landmarks", str(syn.landmarks_file),
                   "--pack", "--workers", "2"])
    assert rc == 0
    r = PackedReader(out)
    rows = [line.split() for line in (out / "list.txt").read_text().splitlines()]
    assert len(r) == len(rows) == 80 and r.num_classes == 20
    assert r.classes == sorted(syn.identities)
    for i, (rel, lab) in enumerate(rows):
        assert r.path(i) == rel and int(r.labels[i]) == int(lab)
    for i in np.random.default_rng(0).choice(80, 12, replace=False):
        img, lab = r[i]
        np.testing.assert_array_equal(img, cv2.imread(str(out / rows[i][0]), cv2.IMREAD_COLOR))
        assert r.classes[lab] == Path(rows[i][0]).parts[0]
    # pack_folder directly, with worker processes, gives the same bytes
    again = pack_folder(out, [(a, int(b)) for a, b in rows], r.classes, "112x96", 112, 96,
                        out_dir=tmp_path / "p2", workers=2)
    assert (tmp_path / "p2" / "packed.npy").read_bytes() == (out / "packed.npy").read_bytes()
    assert again == tmp_path / "p2" / INDEX_NAME
