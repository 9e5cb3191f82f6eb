"""Packs and datasets: insightface ``.bin`` pickles, RecordIO ``.rec/.idx``, ``align --pack`` arrays."""
from __future__ import annotations

import pickle
import random
import struct
from pathlib import Path
from typing import Any, List, Optional, Sequence

from ..mutate import mutate_bytes, mutate_tree
from . import Case, Target
from .common import checkpoint_bytes, crop, encode, mutate_json, tiny_checkpoint_state
from .images import image_hot_offsets, hostile_images

#: what a hostile pickle asks for: the harness's stray-write check sees the file if any of them runs
CANARY = "pwned"


def hostile_pickles() -> List[bytes]:
    """Pickles that run code, or blow up when unpickled without care (each refused by a safe reader)."""
    touch = f"touch {CANARY}".encode()
    out = [
        b"cos\nsystem\n(S'" + touch + b"'\ntR.",
        b"cposix\nsystem\n(S'" + touch + b"'\ntR.",
        b"cbuiltins\nexec\n(S'open(\"" + CANARY.encode() + b"\", \"w\")'\ntR.",
        b"c__builtin__\neval\n(S'__import__(\"os\").system(\"" + touch + b"\")'\ntR.",
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(touch)]) + touch
        + b"\x85R.",
        b"csubprocess\ncall\n((S'touch'\nS'" + CANARY.encode() + b"'\nltR.",
        b"cnumpy\nload\n(S'/etc/passwd'\ntR.",
        b"ctorch\nload\n(S'/etc/passwd'\ntR.",
    ]
    # a "bytes" built by nested _codecs.encode(..., 'hex') calls: 2**30 bytes from a few hundred
    core = b"h\x00X\x01\x00\x00\x00aX\x06\x00\x00\x00latin1\x86R"
    for _ in range(30):
        core = b"h\x00(" + core + b"X\x03\x00\x00\x00hext" + b"R"
    out.append(b"\x80\x02c_codecs\nencode\nq\x000(" + core + b"l]\x86.")
    # one 1 MiB bytearray (protocol 5) referenced 2000 times: 2 GiB if every reference is copied
    big = b"\x80\x05\x96" + struct.pack("<Q", 1 << 20) + b"\0" * (1 << 20) + b"\x94"
    refs = b"(" + b"h\x00" * 2000 + b"l" + b"]" + b"\x86."
    out.append(big + refs)
    return out


class BinPack(Target):
    name = "bin_pack"
    reader = "eval.pairs.load_bin_pack + eval.packs (insightface .bin pickles and their images); verify bin"
    outputs = ("report.json",)
    weight = 1.5

    def seeds(self, context: Path) -> List[Case]:
        (context / "model.pt").write_bytes(checkpoint_bytes(tiny_checkpoint_state()))
        jpgs = [encode(crop(i % 3, i // 3, "112x112"), ".jpg") for i in range(8)]
        pngs = [encode(crop(i % 3, i // 3, "112x112"), ".png") for i in range(8)]
        issame = [True, False, True, False]
        out = []
        for images, protocol in ((jpgs, 4), (pngs, 2), (jpgs, 5)):
            out.append({"pack.bin": pickle.dumps((images, issame), protocol=protocol)})
        # the Python 2 layout: str (bytes) images, protocol 2, read with encoding='bytes'
        py2 = (b"\x80\x02(]q\x00(" + b"".join(b"T" + struct.pack("<I", len(j)) + j for j in jpgs)
               + b"e]q\x01(\x88\x89\x88\x89et.")
        out.append({"pack.bin": py2})
        return out

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        data = case["pack.bin"]
        roll = rng.random()
        if roll < 0.05:
            return {"pack.bin": rng.choice(hostile_pickles())}
        try:
            images, issame = pickle.loads(data, encoding="bytes")
        except Exception:  # noqa: BLE001 - a seed that is not a plain pickle: bytes only
            return {"pack.bin": mutate_bytes(rng, data)}
        if roll < 0.35:  # one image damaged (or replaced by a hostile one)
            images = list(images)
            k = rng.randrange(len(images))
            if rng.random() < 0.3:
                images[k] = rng.choice(hostile_images())
            else:
                images[k] = mutate_bytes(rng, bytes(images[k]), hot=image_hot_offsets(bytes(images[k])))
            return {"pack.bin": pickle.dumps((images, issame), protocol=rng.choice((2, 4, 5)))}
        if roll < 0.6:  # wrong types / structure
            tree = mutate_tree(rng, [list(images), list(issame)], skip=lambda v: isinstance(v, bytes) and len(v) > 64)
            try:
                return {"pack.bin": pickle.dumps(tree, protocol=rng.choice((2, 4, 5)))}
            except (RecursionError, pickle.PicklingError):
                return {"pack.bin": mutate_bytes(rng, data)}
        return {"pack.bin": mutate_bytes(rng, data, [s["pack.bin"] for s in seeds])}

    def run(self, case: Path) -> Any:
        from eval.features import EncodedImages
        from eval.packs import LoadedPack, check_pack_size
        from eval.pairs import load_bin_pack

        images, issame = load_bin_pack(case / "pack.bin")
        if images:
            check_pack_size(LoadedPack("pack", case / "pack.bin", images, issame), (112, 96))
        data = EncodedImages(images, (112, 96), case / "pack.bin")
        return images, issame, [data[i].shape for i in range(len(data))]

    def check(self, result: Any, case: Path) -> Optional[str]:
        images, issame, shapes = result
        if len(images) != 2 * len(issame):
            return f"{len(images)} images for {len(issame)} pairs"
        if any(tuple(s) != (3, 112, 96) for s in shapes):
            return f"tensor shapes {set(map(tuple, shapes))}"
        return None

    def argv(self, case: Path) -> List[str]:
        return ["verify", "bin", "--checkpoint", str(self.context / "model.pt"), "--pack", "pack.bin", "--folds", "2",
                "--workers", "0", "--json", "report.json"]


def _rec_case(images: Sequence[bytes], labels: Sequence[int], header: bool) -> Case:
    import tempfile

    from test_datasets import _irheader, _write_rec  # the byte-by-byte writer of the dataset tests

    records = []
    if header:
        n_id = max(labels) + 1
        a, b = 1 + len(images), 1 + len(images) + n_id
        records.append((0, _irheader(2, 0.0, 0) + struct.pack("<2f", a, b)))
    for k, (img, lab) in enumerate(zip(images, labels), start=1):
        head = _irheader(1, 0.0, k) + struct.pack("<f", lab) if k == 2 else _irheader(0, float(lab), k)
        records.append((k, head + img))
    with tempfile.TemporaryDirectory() as d:
        _write_rec(Path(d), records)
        return {"train.rec": (Path(d) / "train.rec").read_bytes(), "train.idx": (Path(d) / "train.idx").read_bytes()}


def _record_offsets(rec: bytes) -> List[int]:
    """Offsets of the magic / length words and IRHeader fields of every record (the ``hot`` offsets)."""
    out, pos = [], 0
    while pos + 8 <= len(rec):
        lrec = struct.unpack_from("<I", rec, pos + 4)[0]
        out += [pos, pos + 4, pos + 8, pos + 12, pos + 16]
        pos += 8 + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
    return out


class RecordIO(Target):
    name = "recordio"
    reader = "data_prep.recordio.RecordIODataset (insightface train.rec + train.idx)"

    def seeds(self, context: Path) -> List[Case]:
        imgs = [encode(crop(i % 3, i // 3, "112x112"), ".jpg") for i in range(6)]
        pngs = [encode(crop(i % 3, i // 3), ".png") for i in range(4)]
        return [_rec_case(imgs, [0, 1, 2, 0, 1, 2], True), _rec_case(pngs, [0, 0, 1, 1], False)]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        from ..mutate import mutate_text

        out = dict(case)
        if rng.random() < 0.3:
            out["train.idx"] = mutate_text(rng, case["train.idx"])
        else:
            rec = case["train.rec"]
            out["train.rec"] = mutate_bytes(rng, rec, [s["train.rec"] for s in seeds], hot=_record_offsets(rec))
        return out

    def run(self, case: Path) -> Any:
        from data_prep.recordio import RecordIODataset

        ds = RecordIODataset(case, input_size=(112, 96))
        items = [ds[i] for i in range(len(ds))]
        return ds, items

    def check(self, result: Any, case: Path) -> Optional[str]:
        ds, items = result
        if ds.num_classes <= 0:
            return f"{ds.num_classes} classes"
        for x, label, _ in items:
            if tuple(x.shape) != (3, 112, 96) or not 0 <= label < ds.num_classes:
                return f"a sample of shape {tuple(x.shape)}, label {label} of {ds.num_classes} classes"
        return None


class Packed(Target):
    name = "packed"
    reader = "data_prep.packed.PackedReader + datasets.PackedDataset (packed.npy + packed.json); check"
    ok_status = (0, 1)  # check: 1 with a BAD line for a damaged pack (its report, not an error)

    def seeds(self, context: Path) -> List[Case]:
        import tempfile

        from data_prep.packed import PackWriter

        out = []
        for n, chunk in ((5, 2), (3, 256)):
            with tempfile.TemporaryDirectory() as d:
                import data_prep.packed as P

                old, P.CHUNK_ITEMS = P.CHUNK_ITEMS, chunk
                try:
                    with PackWriter(Path(d), n, 112, 96) as w:
                        for i in range(n):
                            w.add(crop(i % 3, i // 3))
                        w.finish([f"id{i % 3}/{i}.jpg" for i in range(n)], [i % 3 for i in range(n)],
                                 ["id0", "id1", "id2"], "112x96")
                finally:
                    P.CHUNK_ITEMS = old
                out.append({"packed.npy": (Path(d) / "packed.npy").read_bytes(),
                            "packed.json": (Path(d) / "packed.json").read_bytes()})
        return out

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        out = dict(case)
        if rng.random() < 0.5:
            out["packed.json"] = mutate_json(rng, case["packed.json"])
        else:
            npy = case["packed.npy"]
            head = list(range(0, min(len(npy), 128), 2))
            out["packed.npy"] = mutate_bytes(rng, npy, hot=head)
            if rng.random() < 0.3:  # the header's shape text
                out["packed.npy"] = npy.replace(b"(5, 112", rng.choice((b"(50000000, 112", b"(-1, 112", b"(5, 1120")))
        return out

    def run(self, case: Path) -> Any:
        from data_prep.datasets import PackedDataset
        from data_prep.packed import PackedReader

        reader = PackedReader(case)
        reader.verify()
        crops = [reader[i] for i in range(len(reader))]
        ds = PackedDataset(case, input_size=(112, 96))
        return reader, crops, [ds[i] for i in range(len(ds))]

    def check(self, result: Any, case: Path) -> Optional[str]:
        reader, crops, items = result
        for image, label in crops:
            if image.shape != tuple(reader.image_shape) or not 0 <= label < reader.num_classes:
                return f"a crop {image.shape} label {label}"
        return None

    def argv(self, case: Path) -> List[str]:
        return ["check", "."]


TARGETS = [BinPack, RecordIO, Packed]
