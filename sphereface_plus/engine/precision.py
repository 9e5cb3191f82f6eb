"""Numeric precision of the backbone: detect bfloat16 support, resolve a setting, one autocast helper.

Training and embedding share these three pieces:

* :func:`bf16_support` says how well a device runs bfloat16: ``"native"`` where the hardware has
  bf16 dot products (x86 AVX512-BF16 or AMX-BF16, AArch64 BF16; CUDA compute capability >= 8.0),
  ``"emulated"`` where bf16 runs but through conversions (x86 AVX-512 without BF16, older CUDA
  devices with emulation), ``"none"`` where it does not run in oneDNN at all.
* :func:`resolve_precision` turns a user setting into the precision actually used, ``"fp32"``,
  ``"bf16"`` or ``"fp16"``. ``auto`` is bf16 where it is native (measured faster: 1.7-1.9x for
  sphere20 on an AVX512-BF16/AMX CPU, ``bench/results/embed_throughput.md`` and
  ``train_throughput.md``) and fp32 elsewhere; an explicit ``bf16`` falls back quietly (an
  ``info`` log line) to fp32 where bf16 is not supported at all; ``fp16`` is CUDA-only (half
  precision on a CPU has no fast kernels and needs a GradScaler) and falls back to fp32 elsewhere.
  ``off`` is the training config's spelling of ``fp32``.
* :func:`autocast` is the one context manager to put around the backbone forward. Only the
  backbone runs in reduced precision: heads, losses and MHE are computed in float32 (the trainer
  turns autocast off around them) and embeddings are returned as float32, so thresholds and
  cosines compare across precisions.

No torch state is touched at import; detection runs when called (and is cached per device type).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import platform
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from sphereface_plus.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "SETTINGS", "EMBED_SETTINGS", "bf16_support", "cpu_bf16_support",
           "resolve_precision", "autocast_dtype", "autocast"]

#: precisions a resolved setting can be (what ``summary.json`` reports)
PRECISIONS = ("fp32", "bf16", "fp16")
#: every accepted setting: ``auto``, the precisions, and the training config's ``off`` (= fp32)
SETTINGS = ("auto", "fp32", "bf16", "fp16", "off")
#: the settings of the embedding commands' ``--precision`` (fp16 is a training-on-CUDA option)
EMBED_SETTINGS = ("auto", "fp32", "bf16")

# /proc/cpuinfo flags of native bf16 dot products: x86 AVX512-BF16 (Cooper Lake, Zen 4+),
# AMX-BF16 (Sapphire Rapids+); AArch64 FEAT_BF16 ("bf16" in the Features line)
_NATIVE_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# oneDNN runs bf16 on x86 from AVX-512 (core) up, converting through float32 (slower than fp32)
_EMULATED_FLAGS = frozenset({"avx512bw", "avx512f"})

DeviceLike = Union[str, torch.device]


def _read_cpu_flags() -> Optional[frozenset]:
    """The CPU feature flags of ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on ARM); None elsewhere."""
    path = Path("/proc/cpuinfo")
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_bf16_support(flags: Optional[Iterable[str]] = None) -> str:
    """``"native"``, ``"emulated"`` or ``"none"`` for a CPU with these feature ``flags``.

    ``flags=None`` reads this machine's (``/proc/cpuinfo``); where that file is missing (macOS,
    Windows) torch's own CPU probes answer instead (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``, ``torch.ops.mkldnn._is_mkldnn_bf16_supported``).
    """
    if flags is None:
        flags = _read_cpu_flags()
    if flags is not None:
        flags = frozenset(flags)
        if not torch.backends.mkldnn.is_available():  # no oneDNN: bf16 convolutions are reference loops
            return "emulated" if flags & (_NATIVE_FLAGS | _EMULATED_FLAGS) else "none"
        if flags & _NATIVE_FLAGS:
            return "native"
        return "emulated" if flags & _EMULATED_FLAGS else "none"
    return _torch_cpu_probe()


@functools.lru_cache(maxsize=None)
def _torch_cpu_probe() -> str:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if (probe is not None and probe()) or (amx is not None and amx()):
        return "native"
    if platform.machine().lower() in ("arm64", "aarch64") and platform.system() == "Darwin":
        return "native"  # Apple M2 and later have BF16; M1 runs it emulated, still correct
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "emulated"
    except (AttributeError, RuntimeError):
        pass
    return "none"


def _cuda_bf16_support(device: torch.device) -> str:
    if not torch.cuda.is_available():
        return "none"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    if major >= 8:  # Ampere and later: bf16 tensor cores
        return "native"
    return "emulated" if torch.cuda.is_bf16_supported(including_emulation=True) else "none"


def bf16_support(device: DeviceLike = "cpu", cpu_flags: Optional[Iterable[str]] = None) -> str:
    """How ``device`` runs bfloat16: ``"native"``, ``"emulated"`` or ``"none"`` (see the module doc).

    ``cpu_flags`` stands in for this machine's ``/proc/cpuinfo`` flags (for a CPU device), so that a
    caller or a test can ask about another CPU. Other device types (mps, xpu...) answer ``"none"``:
    their autocast support differs and fp32 is the safe choice.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_bf16_support(cpu_flags)
    if device.type == "cuda":
        return _cuda_bf16_support(device)
    return "none"


def resolve_precision(setting: str, device: DeviceLike = "cpu", support: Optional[str] = None,
                      what: str = "precision") -> str:
    """The precision (``fp32``, ``bf16`` or ``fp16``) that ``setting`` means on ``device``.

    ``support`` is the device's bf16 support (``native|emulated|none``); None asks
    :func:`bf16_support`. ``what`` names the setting in the log line of a fallback (e.g.
    ``train.precision`` or ``--precision``). Raises :class:`~sphereface_plus.errors.UsageError` (a
    ``ValueError``) for a setting not in :data:`SETTINGS`.
    """
    if setting not in SETTINGS:
        raise UsageError(f"{what}={setting!r} is not a precision; choose one of {', '.join(SETTINGS)}")
    device = torch.device(device)
    if setting in ("fp32", "off"):
        return "fp32"
    if setting == "fp16":
        if device.type == "cuda":
            return "fp16"
        logger.info("%s=fp16 runs on CUDA only: %s uses fp32", what, device)
        return "fp32"
    if support is None:
        support = bf16_support(device)
    if support not in ("native", "emulated", "none"):
        raise ValueError(f"support={support!r}: expected native, emulated or none")
    if setting == "auto":
        # bf16 only where the hardware has bf16 dot products: emulated bf16 is slower than fp32
        return "bf16" if support == "native" else "fp32"
    if support == "none":  # an explicit bf16 the device cannot run: quiet fallback, as documented
        logger.info("%s=bf16 is not supported on %s: using fp32", what, device)
        return "fp32"
    return "bf16"


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision; None for fp32 (autocast off)."""
    try:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not resolved: expected one of {', '.join(PRECISIONS)} "
                         f"(call resolve_precision first)") from None


def autocast(device: DeviceLike, precision: str):
    """Context manager for the backbone forward: ``torch.autocast`` in ``precision`` (fp32: a no-op).

    Put it around the backbone only; code inside that needs float32 (heads, losses, MHE) opens
    ``torch.autocast(device_type, enabled=False)`` and casts its inputs with ``.float()``.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
