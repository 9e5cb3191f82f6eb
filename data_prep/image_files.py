"""Which files count as images: the one list of image file extensions every command uses.

The extensions are those OpenCV's ``cv2.imread`` decodes (JPEG, PNG, BMP, the Netpbm family, TIFF, WebP,
JPEG 2000), so a folder tree that ``align`` reads is also one that ``train`` (``data.source=folder``),
``verify folder`` and ``export --check-images`` read.
"""
from __future__ import annotations

import os
from typing import Union

__all__ = ["IMAGE_EXTENSIONS", "is_image_file"]

#: lower-case suffixes, with the dot
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp", ".jp2")


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    """True when ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS
