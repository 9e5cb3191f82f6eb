"""Images: JPEG, PNG, BMP, PNM, TIFF, WebP crops and photos, through every image reader of the toolkit."""
from __future__ import annotations

import functools
import random
import struct
import zlib
from pathlib import Path
from typing import Any, List, Optional, Sequence

from ..mutate import mutate_bytes
from . import Case, Target
from .common import checkpoint_bytes, crop, encode, face, tiny_checkpoint_state


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, bit_depth: int = 8, color: int = 2, payload: int = 1 << 16) -> bytes:
    """A well-formed PNG (valid CRCs) whose header claims ``width`` x ``height`` pixels; its IDAT holds the
    zlib stream of ``payload`` zero bytes, so the file is small and decoding it would allocate the claim."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * payload, 9)) \
        + _chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF marker is rewritten to claim ``width`` x ``height``."""
    import numpy as np

    data = bytearray(encode(np.full((16, 16, 3), 128, np.uint8), ".jpg"))
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP header (24-bit, uncompressed) claiming ``width`` x ``height`` with a few bytes of pixels."""
    header = struct.pack("<2sIHHI", b"BM", 54 + 64, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\0" * 64


@functools.lru_cache(maxsize=None)
def hostile_images() -> List[bytes]:
    """Decompression bombs: small files whose headers claim more pixels than any face photo has."""
    return [
        png_claiming(100_000, 100_000),  # 10 G pixels
        png_claiming(30_000, 30_000),  # 0.9 G pixels: under OpenCV's own limit, 2.7 GB to decode
        png_claiming(20_000, 20_000, bit_depth=16, color=6),  # 16-bit RGBA: 3.2 GB
        png_claiming(1 << 24, 8),  # one dimension past OpenCV's own cap
        jpeg_claiming(30_000, 30_000),
        jpeg_claiming(65_500, 65_500),
        bmp_claiming(30_000, 30_000),
        bmp_claiming(30_000, -30_000),
        b"P6\n30000 30000\n255\n" + b"\0" * 64,
        b"P5 100000 100000 65535 " + b"\0" * 64,
    ]


def image_hot_offsets(data: bytes) -> List[int]:
    """Where the width / height fields of a PNG, JPEG or BMP header are (the ``hot`` offsets)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return [8, 16, 18, 20, 22, 24, 25]
    if data[:2] == b"\xff\xd8":
        return [i + k for i in range(2, min(len(data) - 9, 4096)) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xCF
                for k in (2, 5, 7)]
    if data[:2] == b"BM":
        return [2, 10, 14, 18, 22, 28, 30, 34]
    return []


class Image(Target):
    name = "image"
    reader = ("every image reader: eval.embedder.read_image, eval.features.ImageFiles / EncodedImages, "
              "data_prep.datasets (ImageFolderDataset), eval.export.folder_crops; compare --aligned")
    weight = 1.5

    def seeds(self, context: Path) -> List[Case]:
        import cv2
        import numpy as np

        (context / "model.pt").write_bytes(checkpoint_bytes(tiny_checkpoint_state()))
        c = crop(0, 0)
        wide = crop(1, 0, "112x112")
        gray = cv2.cvtColor(c, cv2.COLOR_BGR2GRAY)
        rgba = np.dstack([c, np.full(c.shape[:2], 200, np.uint8)])
        return [
            {"image.jpg": encode(c, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90)},
            {"image.jpg": encode(wide, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)},
            {"image.png": encode(c, ".png")},
            {"image.png": encode(gray, ".png")},
            {"image.png": encode(rgba, ".png")},
            {"image.png": encode((c.astype(np.uint16) * 257), ".png")},
            {"image.bmp": encode(c, ".bmp")},
            {"image.ppm": encode(c, ".ppm")},
            {"image.webp": encode(c, ".webp", cv2.IMWRITE_WEBP_QUALITY, 90)},
            {"image.tif": encode(c, ".tiff")},
            {"image.jpg": encode(face(0, 1)[0], ".jpg")},  # a photo, not a crop: refused as the wrong size
        ]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        (name, data), = case.items()
        if rng.random() < 0.08:
            return {name: rng.choice(hostile_images())}
        others = [s[n] for s in seeds for n in s if n == name and s[n] != data]
        return {name: mutate_bytes(rng, data, others, hot=image_hot_offsets(data))}

    def run(self, case: Path) -> Any:
        from eval.embedder import read_image
        from eval.export import folder_crops
        from eval.features import EncodedImages, ImageFiles

        (path,) = [p for p in case.iterdir() if p.is_file()]
        out = [read_image(path)]
        out.append(ImageFiles(case, [path.name], input_size=(112, 96))[0])
        out.append(EncodedImages([path.read_bytes()], (112, 96))[0])
        out += folder_crops(case, (112, 96), 1)
        return out

    def check(self, result: Any, case: Path) -> Optional[str]:
        image = result[0]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype.name != "uint8":
            return f"read_image returned {image.shape} {image.dtype}"
        return None

    def argv(self, case: Path) -> List[str]:
        (path,) = [p for p in case.iterdir() if p.is_file()]
        return ["compare", path.name, path.name, "--checkpoint", str(self.context / "model.pt"), "--aligned",
                "--threshold", "0.3"]


class TrainingImages(Target):
    """The training reader: a folder tree of crops (the fast JPEG decoder first, then OpenCV's)."""

    name = "train_images"
    reader = "data_prep.datasets.ImageFolderDataset / decode_crop (simplejpeg, then OpenCV) over a tree of crops"
    weight = 1.5

    def seeds(self, context: Path) -> List[Case]:
        import cv2

        jpgs = {f"tree/id{i % 2}/{i}.jpg": encode(crop(i % 2, i // 2), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 92)
                for i in range(4)}
        mixed = {f"tree/id{i % 2}/{i}.png": encode(crop(i % 2, i // 2), ".png") for i in range(4)}
        return [jpgs, mixed]

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        out = dict(case)
        for name in rng.sample(sorted(case), rng.choice((1, 1, 2, 4))):
            if rng.random() < 0.08:
                out[name] = rng.choice(hostile_images())
            else:
                out[name] = mutate_bytes(rng, case[name], hot=image_hot_offsets(case[name]))
        return out

    def run(self, case: Path) -> Any:
        from data_prep.datasets import ImageFolderDataset

        ds = ImageFolderDataset(case / "tree", input_size=(112, 96))
        return ds, [ds[i] for i in range(len(ds))]

    def check(self, result: Any, case: Path) -> Optional[str]:
        ds, items = result
        for x, label, _ in items:
            if tuple(x.shape) != (3, 112, 96) or not 0 <= label < ds.num_classes:
                return f"a sample {tuple(x.shape)} label {label}"
        return None


TARGETS = [Image, TrainingImages]
