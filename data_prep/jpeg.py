"""The training reader's JPEG decoder: ``simplejpeg`` (libjpeg-turbo, no copies) when installed, else OpenCV.

Decoding is most of the per-image cost of a folder, list or RecordIO training set (``bench/input_pipeline.py``,
``docs/performance.md``). :func:`decode_bgr` decodes a JPEG's bytes straight into a BGR ``uint8`` array with
``simplejpeg.decode_jpeg`` (accurate integer DCT and fancy upsampling, the settings OpenCV's own libjpeg-turbo
uses, so the pixels match ``cv2.imdecode`` within JPEG decoder tolerance: ``tests/test_speed.py``) and returns
None for anything it does not handle (not a JPEG, no end-of-image marker, CMYK, a decoder error): the caller
then takes the checked OpenCV path (:func:`data_prep.image_files.read_image`), which decodes every format and says
what is wrong with a bad file.

Which decoder: ``SPHEREFACE_JPEG_DECODER=auto|simplejpeg|cv2`` in the environment (read per call, so a
DataLoader worker follows its parent): ``auto`` (the default) uses simplejpeg when it imports, ``cv2`` never
does. simplejpeg is the optional extra ``fast-jpeg`` (``pip install sphereface-plus[fast-jpeg]``); Pillow-SIMD
replaces Pillow itself, needs a compiler and would still copy through a PIL image, so it is not used.

On CUDA, :func:`decode_batch_cuda` decodes a whole batch of JPEG bytes on the GPU with
``torchvision.io.decode_jpeg(..., device='cuda')`` (nvJPEG) and applies flip and normalisation there: the
option for a GPU that takes images faster than the CPU workers can decode them (``docs/performance.md``).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["DECODERS", "decoder_name", "simplejpeg_available", "decode_bgr", "decode_batch_cuda"]

#: values of ``SPHEREFACE_JPEG_DECODER``
DECODERS = ("auto", "simplejpeg", "cv2")
ENV = "SPHEREFACE_JPEG_DECODER"


@functools.lru_cache(maxsize=None)
def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def simplejpeg_available() -> bool:
    return _simplejpeg() is not None


def decoder_name() -> str:
    """The JPEG decoder in force: ``simplejpeg`` or ``cv2`` (see the module docstring)."""
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in DECODERS:
        from sphereface_plus.errors import UsageError

        raise UsageError(f"{ENV}={want!r} is not valid; choose one of {', '.join(DECODERS)}")
    if want == "cv2":
        return "cv2"
    if _simplejpeg() is None:
        if want == "simplejpeg":
            from sphereface_plus.errors import UsageError

            raise UsageError(f"{ENV}=simplejpeg but simplejpeg is not installed: pip install simplejpeg "
                             f"(or the extra sphereface-plus[fast-jpeg]), or set {ENV}=auto")
        return "cv2"
    return "simplejpeg"


def _complete_jpeg(data: bytes) -> bool:
    """A JPEG with its end-of-image marker (the check of :func:`data_prep.image_files.read_image`)."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    if data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return True
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda")


def decode_bgr(data: bytes, decoder: Optional[str] = None) -> Optional[np.ndarray]:
    """``H x W x 3`` BGR uint8 of a complete JPEG by simplejpeg; None where the caller must use OpenCV.

    ``decoder`` overrides :func:`decoder_name` (``"cv2"`` always returns None).
    """
    if (decoder or decoder_name()) != "simplejpeg" or not _complete_jpeg(data):
        return None
    sj = _simplejpeg()
    if sj is None:
        return None
    from data_prep.image_files import check_image_header

    try:
        check_image_header(data)  # over the pixel limit: OpenCV's path refuses it and says why
    except ValueError:
        return None
    try:
        return sj.decode_jpeg(data, colorspace="BGR", fastdct=False, fastupsample=False)
    except (ValueError, RuntimeError, OSError):  # CMYK, corrupt data...: OpenCV decides and explains
        return None


def decode_batch_cuda(datas: Sequence[bytes], flips: Sequence[bool], input_size: Tuple[int, int],
                      device="cuda"):
    """A batch of JPEG crops decoded on ``device`` -> ``B x 3 x H x W`` float32 ``(x - 127.5) / 128``, BGR.

    ``torchvision.io.decode_jpeg`` takes the list of byte tensors in one call (nvJPEG batched decode on
    CUDA; it also runs on ``device='cpu'``, which is how its pixels are compared with OpenCV's). Crops
    must already be ``input_size`` or 16 columns wider (a 112x112 crop for a 112x96 model is cut to its
    central columns, like :func:`data_prep.datasets.preprocess`); ``flips[i]`` mirrors crop ``i``.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from data_prep.image_files import check_image_header

    h, w = (int(v) for v in input_size)
    for i, d in enumerate(datas):  # a decompression bomb is refused before nvJPEG allocates it
        check_image_header(d, f"JPEG {i}")
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; decode_jpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), 3, h, w), dtype=torch.float32, device=device)
    for i, img in enumerate(images):  # C x H x W RGB uint8
        ih, iw = img.shape[-2:]
        if ih != h or iw < w or (iw - w) % 2:  # data_prep.geometry.cut_wide_crop's rule
            raise ValueError(f"JPEG {i} is {iw}x{ih} (WxH), the model expects {w}x{h} (or a wider crop, "
                             f"e.g. {w + 16}x{h})")
        x0 = (iw - w) // 2
        img = img[:, :, x0:x0 + w].flip(0)  # RGB -> BGR, the channel order of the training crops
        if flips[i]:
            img = img.flip(2)
        out[i] = img
    return out.sub_(127.5).div_(128.0)
