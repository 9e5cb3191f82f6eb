"""Image files: the one list of image file extensions, and the one checked way to decode one.

The extensions are those OpenCV's ``cv2.imread`` decodes (JPEG, PNG, BMP, the Netpbm family, TIFF, WebP,
JPEG 2000; GIF is read too), so a folder tree that ``align`` reads is also one that ``train`` (``data.source=folder``),
``verify folder`` and ``export --check-images`` read.

Every image the toolkit decodes goes through :func:`decode_image` (bytes), :func:`read_image_file` (a
path) or :func:`read_image` (bytes to BGR uint8 with ``align``'s checks: truncated JPEG, bit depth, channels), or is checked by :func:`check_image_header` before another decoder sees it (the training reader's
simplejpeg, nvJPEG). The header is read first and an image of more than :func:`max_image_pixels` pixels is
refused before anything is allocated: a 100 KB PNG may claim 100,000 x 100,000 pixels, 30 GB to decode (a
decompression bomb). The limit is :data:`DEFAULT_MAX_PIXELS` (40 megapixels: a 7,300 x 5,500 photo; a
16-bit RGBA image of that size decodes in about 0.5 GB), changed with the environment variable
:data:`MAX_PIXELS_ENV` (``SPHEREFACE_PLUS_MAX_IMAGE_PIXELS=100000000``); docs/fuzzing.md#image-pixel-limit. A file
whose size cannot be read from its header (truncated, or a format outside the list above) is refused too.
"""
from __future__ import annotations

import os
import struct
import sys
from typing import List, Optional, Tuple, Union

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "DEFAULT_MAX_PIXELS", "MAX_PIXELS_ENV", "max_image_pixels",
           "image_size", "check_image_header", "decode_image", "read_image_file", "read_image"]

#: lower-case suffixes, with the dot
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp", ".jp2")
#: the pixel limit of a decoded image unless :data:`MAX_PIXELS_ENV` says otherwise
DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "SPHEREFACE_PLUS_MAX_IMAGE_PIXELS"


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    """True when ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def max_image_pixels() -> int:
    """The pixel limit in force: :data:`MAX_PIXELS_ENV` when set (read per call), else :data:`DEFAULT_MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        from sphereface_plus.errors import UsageError

        raise UsageError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is not a positive number of pixels "
                         f"(default {DEFAULT_MAX_PIXELS})")
    return value


# ------------------------------------------------------------------------------------ header sizes
def _jpeg(data: bytes) -> Optional[Tuple[int, int]]:
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7):  # no length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            if pos + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame
            return None
        pos += 2 + length
    return None


def _png(data: bytes) -> Optional[Tuple[int, int]]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _bmp(data: bytes) -> Optional[Tuple[int, int]]:
    if len(data) < 26:
        return None
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)  # a negative height is a top-down bitmap


def _pnm(data: bytes) -> Optional[Tuple[int, int]]:
    head = data[:4096]
    if head[:2] == b"P7":  # PAM: WIDTH / HEIGHT lines up to ENDHDR
        fields = dict(line.split(None, 1) for line in head.decode("ascii", "replace").splitlines()
                      if len(line.split(None, 1)) == 2)
        try:
            return int(fields["WIDTH"]), int(fields["HEIGHT"])
        except (KeyError, ValueError):
            return None
    tokens, i = [], 2
    while len(tokens) < 2 and i < len(head):
        c = head[i:i + 1]
        if c == b"#":
            while i < len(head) and head[i:i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isspace():
            i += 1
        else:
            j = i
            while j < len(head) and head[j:j + 1].isdigit():
                j += 1
            if j == i:
                return None
            tokens.append(int(head[i:j]))
            i = j
    return (tokens[0], tokens[1]) if len(tokens) == 2 else None


def _tiff(data: bytes) -> Optional[Tuple[int, int]]:
    e = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack_from(e + "H", data, 2)
    big = version == 43
    if big:
        if len(data) < 16:
            return None
        (ifd,) = struct.unpack_from(e + "Q", data, 8)
        count_fmt, entry_size, value_at = "Q", 20, 12
    else:
        (ifd,) = struct.unpack_from(e + "I", data, 4)
        count_fmt, entry_size, value_at = "H", 12, 8
    if ifd + 8 > len(data):
        return None
    (count,) = struct.unpack_from(e + count_fmt, data, ifd)
    first = ifd + struct.calcsize(count_fmt)
    found = {}
    for k in range(min(count, (len(data) - first) // entry_size)):
        at = first + k * entry_size
        tag, kind = struct.unpack_from(e + "HH", data, at)
        if tag in (256, 257):  # ImageWidth, ImageLength
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                return None
            (found[tag],) = struct.unpack_from(e + fmt, data, at + value_at)
    return (found[256], found[257]) if len(found) == 2 else None


def _webp(data: bytes) -> Optional[Tuple[int, int]]:
    kind, body = data[12:16], 20
    if kind == b"VP8 " and len(data) >= body + 10 and data[body + 3:body + 6] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, body + 6)
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(data) >= body + 5 and data[body] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, body + 1)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= body + 10:
        w = int.from_bytes(data[body + 4:body + 7], "little") + 1
        h = int.from_bytes(data[body + 7:body + 10], "little") + 1
        return w, h
    return None


def _gif(data: bytes) -> Optional[Tuple[int, int]]:
    return struct.unpack_from("<HH", data, 6) if len(data) >= 10 else None


def _jp2(data: bytes) -> Optional[Tuple[int, int]]:
    if data[:4] == b"\xff\x4f\xff\x51":  # a raw codestream: the SIZ segment
        if len(data) < 24:
            return None
        xs, ys, xo, yo = struct.unpack_from(">IIII", data, 8)
        return max(0, xs - xo), max(0, ys - yo)
    pos, end = 0, len(data)
    while pos + 8 <= end:  # boxes: length, type (a 'jp2h' superbox holds 'ihdr': height, width)
        length, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if length == 1:
            if pos + 16 > end:
                return None
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            head = 16
        elif length == 0:
            length = end - pos
        if kind == b"ihdr" and pos + 16 <= end:
            h, w = struct.unpack_from(">II", data, pos + head)
            return w, h
        if length < head:
            return None
        pos = pos + head if kind == b"jp2h" else pos + length
    return None


_SIGNATURES = ((b"\xff\xd8\xff", "JPEG", _jpeg), (b"\x89PNG\r\n\x1a\n", "PNG", _png), (b"BM", "BMP", _bmp),
               (b"II*\x00", "TIFF", _tiff), (b"MM\x00*", "TIFF", _tiff), (b"II+\x00", "TIFF", _tiff),
               (b"MM\x00+", "TIFF", _tiff), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000", _jp2),
               (b"\xff\x4f\xff\x51", "JPEG 2000", _jp2), (b"GIF87a", "GIF", _gif), (b"GIF89a", "GIF", _gif)) + tuple(
    (b"P%d" % k, "PNM", _pnm) for k in range(1, 8))


def image_size(data: bytes) -> Tuple[str, Optional[Tuple[int, int]]]:
    """``(format, (width, height))`` from the header of an encoded image; ``(format, None)`` when its header
    is cut short or damaged, ``("", None)`` for content that is none of the formats the toolkit reads."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if data[:3] == b"\xff\xd8\xff":  # the common case first
        kind, reader = "JPEG", _jpeg
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind, reader = "WebP", _webp
    else:
        kind, reader = next(((k, r) for sig, k, r in _SIGNATURES if data.startswith(sig)), ("", None))
    if reader is None:
        return "", None
    try:
        return kind, reader(data)
    except (struct.error, ValueError, IndexError):
        return kind, None


def check_image_header(data: bytes, name: Optional[str] = None) -> Tuple[int, int]:
    """``(width, height)`` of an encoded image that may be decoded; :class:`~sphereface_plus.errors.InputFileError`
    (a ``ValueError``; its message starts with ``name`` when given) for one over the pixel limit, or whose size
    its header does not give."""
    from sphereface_plus.errors import InputFileError

    where = f"{name}: " if name else ""
    kind, size = image_size(data)
    if size is None:
        if not kind:
            raise InputFileError(f"{where}not an image file (unrecognised content, first bytes {bytes(data[:8])!r})")
        raise InputFileError(f"{where}corrupt {kind} data: its header is damaged or cut short ({len(data)} bytes)")
    width, height = size
    if width <= 0 or height <= 0:
        raise InputFileError(f"{where}corrupt {kind} data: its header says {width}x{height} pixels")
    limit = max_image_pixels()
    if width * height > limit:
        raise InputFileError(f"{where}a {width}x{height} {kind} ({width * height:,} pixels) is over the limit of "
                             f"{limit:,} pixels; refused before decoding (a face crop is 112x96, a photo a few "
                             f"megapixels; raise the limit with {MAX_PIXELS_ENV}=<pixels> for a larger genuine image)")
    return width, height


class _QuietDecoder:
    """OpenCV's log and the C libraries' own messages ("libpng error: ...", "Corrupt JPEG data: ...") off for one
    decode: the toolkit reports what failed in its own one line, and a second ``error:`` line from libpng would
    contradict it. File descriptor 2 points at /dev/null meanwhile (four system calls)."""

    null: Optional[int] = None

    def __enter__(self) -> None:
        if _QuietDecoder.null is None:
            import cv2

            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            _QuietDecoder.null = os.open(os.devnull, os.O_WRONLY)
        try:
            self.saved: Optional[int] = os.dup(2)
        except OSError:  # no stderr at all: nothing to hide
            self.saved = None
            return
        os.dup2(_QuietDecoder.null, 2)

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)


def decode_image(data: bytes, flags: Optional[int] = None, name: Optional[str] = None):
    """``cv2.imdecode(data, flags)`` (default ``IMREAD_COLOR``: BGR uint8) after :func:`check_image_header`.

    Returns None where OpenCV cannot decode the data (as ``cv2.imdecode`` does); raises the
    :class:`~sphereface_plus.errors.InputFileError` of :func:`check_image_header` before decoding.
    """
    import cv2
    import numpy as np

    check_image_header(data, name)
    with _QuietDecoder():
        try:
            image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR if flags is None else flags)
        except cv2.error:  # OpenCV raises for some damaged files instead of returning None
            return None
    return image if image is not None and image.size else None


def read_image_file(path: Union[str, os.PathLike], flags: Optional[int] = None):
    """:func:`decode_image` of the file at ``path`` (None when it is missing or OpenCV cannot decode it)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return decode_image(data, flags, str(path))


def read_image(data: bytes) -> Tuple[object, List[str]]:
    """Decode an image file's bytes into BGR uint8; return (image, notes). Raises ValueError.

    Grayscale is expanded to three channels and an alpha channel dropped (both noted); 16-bit images
    are scaled to 8 bits. A JPEG without its end-of-image marker is reported as truncated: libjpeg
    would otherwise fill the missing rows with grey and only print a warning.
    """
    import cv2
    import numpy as np

    if len(data) == 0:
        raise ValueError("empty file (0 bytes)")
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    if is_jpeg:
        tail = data.rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            # tolerate trailing junk after a real end-of-image marker, but not a missing one
            if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
                raise ValueError(f"truncated JPEG: no end-of-image marker ({len(data)} bytes)")
    img = decode_image(data, cv2.IMREAD_UNCHANGED)  # the header's size is checked against the pixel limit first
    if img is None:
        kind = image_size(data)[0]
        if kind:
            raise ValueError(f"corrupt {kind} data: OpenCV could not decode it ({len(data)} bytes)")
        raise ValueError(f"not an image file (unrecognised content, first bytes {data[:8]!r})")
    notes: List[str] = []
    if img.dtype == np.uint16:
        # the high byte of each sample (x >> 8), taken as a view: no 16-bit temporary as large as the image
        high = 1 if sys.byteorder == "little" else 0
        img = np.ascontiguousarray(img.view(np.uint8)[..., high::2])
        notes.append("16-bit input scaled to 8 bit")
    elif img.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {img.dtype} (expected 8- or 16-bit)")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        img = cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
        notes.append("grayscale input expanded to BGR")
    elif img.ndim == 3 and img.shape[2] == 4:
        img = np.ascontiguousarray(img[:, :, :3])
        notes.append("alpha channel dropped")
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise ValueError(f"unsupported image layout {img.shape}")
    return img, notes
