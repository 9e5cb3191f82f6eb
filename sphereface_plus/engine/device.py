"""Which device a run computes on: one rule for every trainer (face, CIFAR, GAN).

``auto`` is the local rank's GPU when CUDA exists, else the CPU; ``cuda`` means ``cuda:<local_rank>``
(under ``torchrun`` each process takes its own GPU); anything else is passed to ``torch.device``.
Asking for CUDA where there is none is a :class:`~sphereface_plus.errors.UsageError`, never a silent
fall-back to the CPU (a week-long run must not start on the wrong device).
"""
from __future__ import annotations

import torch

from sphereface_plus.errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(name: str = "auto", local_rank: int = 0, setting: str = "device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` / ``mps`` -> ``torch.device``.

    ``setting`` names the option in the error message (``train.device``, ``--device``).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{setting}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{setting}={name!r} but CUDA is not available here; use {setting}=cpu (or auto)")
    return device
