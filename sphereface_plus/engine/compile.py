"""``train.compile``: whether the trainer ``torch.compile``\\ s the backbone (``auto``, ``true``, ``false``).

Compiling costs a fixed time up front (Dynamo traces the forward, AOTAutograd the backward, Inductor
generates and builds C++ or Triton kernels) and saves a little on every later step. It pays once a run
is longer than the *break-even* iteration count

    N_break_even = (first compiled step - first eager step) / (eager step - compiled step),

measured per device type by ``bench/compile_speed.py`` (``bench/results/compile_speed.json``). The rule
of ``auto`` (:func:`resolve_compile`): compile when the run has at least :data:`SAFETY` times
:data:`BREAK_EVEN` ``[device type]`` iterations and the compiler's toolchain is present (a C++ compiler
on a CPU, Triton on CUDA); never on a device type whose break-even is unknown or infinite. The factor
:data:`SAFETY` covers what the measurement cannot: a slower or busier machine compiles for longer, a
resumed run or a DDP rank recompiles, and a schedule with a frozen layer or a new batch size recompiles.

Measured (``bench/results/compile_speed.md``, ``docs/performance.md``) on this project's 2-core AVX2 CPU,
the sphere20 trainer step (fp32, batch 16): on the quiet machine, with the eager
:class:`~sphereface_plus.models.layers.PReLU` backward, the compiled step took 1.03-1.05x the eager one
(three runs; the convolutions are oneDNN's either way and the elementwise work Inductor fuses is now small),
so compiling never pays there: :data:`BREAK_EVEN` ``["cpu"]`` is infinite and ``auto`` runs eager on a CPU.
(Under load 4, before that PReLU, it had measured 0.69-0.79x with 35 s of cold compilation.) On CUDA the
break-even is not measured yet (``bench/device_check.sh`` measures it on an H200): :data:`BREAK_EVEN` holds
a conservative estimate (a minute of compilation against a 10 % gain on 25 ms steps) until that run
replaces it. ``train.compile=true`` compiles on any device.

``SPHEREFACE_PLUS_COMPILE_AUTO=eager`` in the environment makes ``auto`` mean eager (the test suite sets it:
hundreds of short trainers would each compile); ``true``/``false`` are not affected.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
from typing import Any, Dict, Union

import torch

from sphereface_plus.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["COMPILE_SETTINGS", "BREAK_EVEN", "SAFETY", "normalize_compile", "compile_toolchain",
           "resolve_compile"]

#: the values ``train.compile`` takes (YAML ``true``/``false`` booleans are accepted and mean the same)
COMPILE_SETTINGS = ("auto", "true", "false")

#: training iterations after which a compiled backbone has paid for its compilation, per device type
#: (``bench/results/compile_speed.json``; ``inf``: compiling never pays there)
BREAK_EVEN: Dict[str, float] = {
    "cpu": math.inf,  # measured: compiled step 1.03-1.05x eager (sphere20 fp32 batch 16, 2 cores, quiet)
    "cuda": 2400.0,  # estimate until bench/device_check.sh measures it: 60 s compile / (10 % of 25 ms)
}

#: environment variable that turns ``auto`` into eager (``SPHEREFACE_PLUS_COMPILE_AUTO=eager``)
AUTO_ENV = "SPHEREFACE_PLUS_COMPILE_AUTO"

#: ``auto`` compiles only when the run is this many times longer than the break-even
SAFETY = 2.0


def normalize_compile(value: Any, what: str = "train.compile") -> str:
    """``True``/``False``/``"auto"``/``"true"``/``"false"`` (any case) -> one of :data:`COMPILE_SETTINGS`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in COMPILE_SETTINGS:
        return value.strip().lower()
    raise UsageError(f"{what}={value!r} is not valid; choose one of {', '.join(COMPILE_SETTINGS)}")


def compile_toolchain(device: Union[str, torch.device]) -> str:
    """Empty when ``torch.compile`` can build kernels for ``device``, else the reason it cannot."""
    device = torch.device(device)
    if device.type == "cuda":
        return "" if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    if device.type == "cpu":
        try:
            from torch._inductor import config as inductor_config

            cxx = inductor_config.cpp.cxx
            names = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
        except Exception:  # noqa: BLE001 - an Inductor without that setting: look for the usual names
            names = []
        names = names or ["g++", "c++", "clang++"]
        return "" if any(shutil.which(str(n)) for n in names) else "no C++ compiler on PATH"
    return f"no compile rule for device type {device.type!r}"


def resolve_compile(setting: Any, device: Union[str, torch.device], iterations: int) -> bool:
    """Whether to compile the backbone for a run of ``iterations`` more steps on ``device``.

    ``true``/``false`` are obeyed as given; ``auto`` applies the rule of the module docstring and logs
    its decision with the numbers behind it.
    """
    setting = normalize_compile(setting)
    if setting != "auto":
        return setting == "true"
    device = torch.device(device)
    if os.environ.get(AUTO_ENV, "").strip().lower() == "eager":
        logger.info("train.compile=auto: eager (%s=eager)", AUTO_ENV)
        return False
    break_even = BREAK_EVEN.get(device.type, math.inf)
    if not math.isfinite(break_even):
        logger.info("train.compile=auto: eager on %s (compiling was not measured to pay there, "
                    "docs/performance.md; train.compile=true compiles anyway)", device.type)
        return False
    missing = compile_toolchain(device)
    if missing:
        logger.info("train.compile=auto: eager (%s)", missing)
        return False
    needed = SAFETY * break_even
    if iterations < needed:
        logger.info("train.compile=auto: eager (%d iterations < %.0f = %.0f x the break-even of %.0f on %s)",
                    iterations, needed, SAFETY, break_even, device.type)
        return False
    logger.info("train.compile=auto: compiling the backbone (%d iterations >= %.0f)", iterations, needed)
    return True
