"""Training datasets: RecordIO written byte by byte here, folder and list sources, bad-image handling."""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_prep.datasets import ImageFolderDataset, ListDataset, PackedDataset, preprocess
from data_prep.recordio import RecordIODataset

MAGIC = 0xCED7230A


def _model_input(bgr: np.ndarray, flip: bool = False) -> np.ndarray:
    """docs/theory.md#preprocessing written out: BGR channels first, (x - 127.5) / 128, optional mirror."""
    x = bgr[:, ::-1] if flip else bgr
    return (np.transpose(x, (2, 0, 1)).astype(np.float64) - 127.5) / 128.0


def _image(rng, h=112, w=96) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png(img: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".png", img)  # lossless: the decoded pixels are known exactly
    assert ok
    return enc.tobytes()


# ------------------------------------------------------------------------------------------ RecordIO
def _irheader(flag: int, label: float, id_: int, id2: int = 0) -> bytes:
    return struct.pack("<IfQQ", flag, label, id_, id2)


def _write_record(fh, payload: bytes) -> int:
    """dmlc RecordIOWriter: split the payload at every 4-aligned magic word (the reader re-inserts it)."""
    offset = fh.tell()
    magic = struct.pack("<I", MAGIC)
    parts, start = [], 0
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i: i + 4] == magic:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    for j, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if j == 0 else (3 if j == len(parts) - 1 else 2))
        fh.write(magic + struct.pack("<I", (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4))
    return offset


def _write_rec(folder: Path, records):
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    with open(folder / "train.rec", "wb") as fh:
        for key, payload in records:
            index.append(f"{key}\t{_write_record(fh, payload)}\n")
    (folder / "train.idx").write_text("".join(index))


def test_recordio_with_insightface_header(tmp_path):
    rng = np.random.default_rng(0)
    images = [_image(rng, 112, 112) for _ in range(5)]  # insightface crops are 112x112
    labels = [0, 0, 1, 2, 2]
    n_img, n_id = len(images), 3
    a, b = 1 + n_img, 1 + n_img + n_id
    records = [(0, _irheader(2, 0.0, 0) + struct.pack("<2f", a, b))]
    for k, (img, lab) in enumerate(zip(images, labels), start=1):
        if k == 2:  # labels given as a float array (flag = 1)
            head = _irheader(1, 0.0, k) + struct.pack("<f", lab)
        elif k == 3:  # id field holding the magic word: the writer splits this record in two
            head = _irheader(0, float(lab), MAGIC)
        else:
            head = _irheader(0, float(lab), k)
        records.append((k, head + _png(img)))
    starts = [0, 2, 3]
    for j in range(n_id):  # identity records: (first, last + 1) image keys; not training samples
        end = starts[j + 1] if j + 1 < n_id else n_img
        records.append((a + j, _irheader(2, 0.0, 0) + struct.pack("<2f", starts[j] + 1, end + 1)))
    _write_rec(tmp_path, records)
    raw = (tmp_path / "train.rec").read_bytes()
    assert raw.count(struct.pack("<I", MAGIC)) == len(records) + 1  # record 3 was written in two parts

    ds = RecordIODataset(tmp_path, input_size=(112, 96))
    assert len(ds) == n_img and ds.num_classes == n_id
    for i, (img, lab) in enumerate(zip(images, labels)):
        x, y, bad = ds[(i, i % 2 == 1)]
        assert (y, bad) == (lab, 0)
        # 112x112 -> 112x96 is the central 96 columns (same template shifted by 8 px)
        np.testing.assert_allclose(x.numpy(), _model_input(img[:, 8:104], flip=i % 2 == 1), rtol=0, atol=1e-6)


def test_recordio_without_header_and_corrupt_record(tmp_path, caplog):
    rng = np.random.default_rng(1)
    images = [_image(rng) for _ in range(3)]
    records = [(k, _irheader(0, float(lab), k) + _png(img)) for k, (img, lab) in enumerate(zip(images, [4, 1, 4]))]
    records.append((3, _irheader(0, 2.0, 3) + b"not an image"))
    _write_rec(tmp_path, records)
    ds = RecordIODataset(tmp_path / "train.rec")
    assert len(ds) == 4 and ds.num_classes == 5
    with caplog.at_level(logging.WARNING):
        x, y, bad = ds[3]  # undecodable -> replaced by the next sample (wraps to record 0)
    assert (y, bad) == (4, 1)
    np.testing.assert_allclose(x.numpy(), _model_input(images[0]), atol=1e-6)
    assert "train.rec" in caplog.text and "record key 3" in caplog.text

    (tmp_path / "train.rec").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="magic"):
        RecordIODataset(tmp_path)


# ------------------------------------------------------------------------------------ folder / list
@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(2)
    imgs = {}
    for name in ("bob", "alice", "carol"):  # created out of order: labels follow sorted names
        (tmp_path / name).mkdir()
        for j in range(2):
            img = _image(rng)
            cv2.imwrite(str(tmp_path / name / f"{name}_{j}.png"), img)
            imgs[f"{name}/{name}_{j}.png"] = img
    (tmp_path / "notes.txt").write_text("not an identity")
    return tmp_path, imgs


def test_folder_labels_in_sorted_order_and_preprocessing(folder):
    root, imgs = folder
    ds = ImageFolderDataset(root)
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3 and len(ds) == 6
    for i, rel in enumerate(ds.paths):
        assert ds.label(i) == ["alice", "bob", "carol"].index(rel.split("/")[0])
        x, y, bad = ds[(i, True)]
        assert x.dtype == torch.float32 and x.shape == (3, 112, 96) and bad == 0
        np.testing.assert_allclose(x.numpy(), _model_input(imgs[rel], flip=True), atol=1e-6)


def test_list_file(folder, tmp_path_factory):
    root, imgs = folder
    lst = tmp_path_factory.mktemp("lists") / "train.txt"
    lst.write_text("# comment\ncarol/carol_1.png 7\n\nalice/alice_0.png 0\n")
    ds = ListDataset(root, lst)
    assert len(ds) == 2 and ds.num_classes == 8
    x, y, _ = ds[0]
    assert y == 7
    np.testing.assert_allclose(x.numpy(), _model_input(imgs["carol/carol_1.png"]), atol=1e-6)
    lst.write_text("alice/alice_0.png 0\nbob/bob_0.png minus-one\n")
    with pytest.raises(ValueError, match=r"train\.txt:2"):
        ListDataset(root, lst)


def test_packed_source(folder, tmp_path_factory):
    from data_prep.packed import PackWriter

    root, imgs = folder
    out = tmp_path_factory.mktemp("pack")
    rels = sorted(imgs)
    classes = sorted({r.split("/")[0] for r in rels})
    labels = [classes.index(r.split("/")[0]) for r in rels]
    with PackWriter(out, len(rels), 112, 96) as w:
        for r in rels:
            w.add(imgs[r])
        w.finish(rels, labels, classes, "112x96")
    ds = PackedDataset(out)
    assert len(ds) == len(rels) and ds.num_classes == 3
    for i, r in enumerate(rels):
        x, y, bad = ds[(i, i % 2 == 0)]
        assert (y, bad) == (labels[i], 0)
        np.testing.assert_allclose(x.numpy(), _model_input(imgs[r], flip=i % 2 == 0), atol=1e-6)


def test_wrong_size_and_missing_images_are_replaced(folder, caplog):
    root, imgs = folder
    ds = ImageFolderDataset(root)
    (root / ds.paths[1]).write_bytes(b"\xff\xd8 truncated jpeg")
    cv2.imwrite(str(root / ds.paths[2]), np.zeros((50, 40, 3), np.uint8))  # not an aligned crop
    with caplog.at_level(logging.WARNING):
        x, y, bad = ds[1]
    assert bad == 2 and y == ds.label(3)  # 1 and 2 unreadable -> sample 3
    np.testing.assert_allclose(x.numpy(), _model_input(imgs[ds.paths[3]]), atol=1e-6)
    assert str(root / ds.paths[1]) in caplog.text and str(root / ds.paths[2]) in caplog.text
    with pytest.raises(ValueError, match="expects 96x112"):
        preprocess(np.zeros((50, 40, 3), np.uint8), (112, 96))


def test_training_run_leaves_out_a_broken_file(folder, tmp_path_factory):
    """End to end: a 0-byte file in the training folder is left out at start-up and training finishes."""
    from sphereface_plus.face.config import load_config
    from sphereface_plus.commands.train import train

    root, _ = folder
    ds = ImageFolderDataset(root)
    broken = ds.paths[4]
    (root / broken).write_bytes(b"")
    ds = ImageFolderDataset(root)
    assert len(ds) == 5 and broken not in ds.paths and ds.num_classes == 3
    assert ds.bad_images == [{"path": str(root / broken), "reason": "empty file (0 bytes)"}]
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"out_dir={out}", "data.source=folder", f"data.root={root}", "data.num_workers=0",
                             "model.backbone=sphere4", "model.embedding_dim=16", "train.iterations=1",
                             "train.batch_size=5", "train.tensorboard=false", "train.log_every=1"])
    summary = train(cfg)
    assert summary["iteration"] == 1 and summary["num_classes"] == 3
