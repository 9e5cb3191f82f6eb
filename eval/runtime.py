"""Which engine runs the backbone: PyTorch, or ONNX Runtime on the checkpoint's cached export.

``--runtime auto|torch|onnxruntime`` (:data:`RUNTIMES`) of every command that embeds images, and
``FaceEmbedder(runtime=...)``:

- ``torch``: the checkpoint's backbone in PyTorch, float32 or bf16 (``--precision``).
- ``onnxruntime``: the checkpoint's backbone exported once to ONNX (:func:`eval.export.export_checked`,
  checked against PyTorch to :data:`CHECK_TOLERANCE` on synthetic crops before it is kept), cached,
  and run by onnxruntime through :class:`eval.onnx_model.OnnxModel`, in float32 only (onnxruntime's
  CPU provider has no bf16 convolutions).
- ``auto`` (the default): ``onnxruntime`` where it can run what was asked: onnxruntime, onnx and
  onnxscript are installed, the device is a CPU and ``--precision`` resolves to fp32 (``fp32``, or
  ``auto`` on a CPU without native bf16); ``torch`` otherwise. On a CPU onnxruntime ran every
  registered face backbone faster than PyTorch in float32 (docs/performance.md#cpu-inference). If the
  export or its check fails, ``auto`` warns and runs PyTorch (and the cache remembers the failure for
  these versions); an explicit ``onnxruntime`` raises instead.

``$SPHEREFACE_PLUS_RUNTIME`` sets the default for every command and ``FaceEmbedder`` (the command
line's ``--runtime`` wins). The model loaders log one line saying which runtime runs and why.

The cache: ``<cache>/<sha256 of the checkpoint file>.onnx`` and, beside it, ``<sha256>.json``: the
.onnx file's own sha256, the toolkit and torch versions that exported it, the check's differences
and the model's ``info`` (so a cached run does not load the checkpoint at all). ``<cache>`` is
``$SPHEREFACE_PLUS_ONNX_CACHE`` or ``~/.cache/sphereface_plus/onnx``; nothing is written beside the
user's checkpoint. A cached graph is used only when its record parses, names this checkpoint and
the running toolkit and torch versions, and the .onnx file hashes to the recorded sha256; anything
else is exported again, with a warning saying why. Both files are written atomically (the .onnx
first, so a crash in between leaves a graph without a record, which is not trusted).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from sphereface_plus.errors import ToolkitError, UsageError
from sphereface_plus.utils import CACHE_DIR, atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

#: the ``--runtime`` choices; ``auto`` is the default
RUNTIMES = ("auto", "torch", "onnxruntime")
#: environment variable holding the default ``--runtime``
RUNTIME_ENV = "SPHEREFACE_PLUS_RUNTIME"
#: environment variable holding the folder of cached exports
CACHE_ENV = "SPHEREFACE_PLUS_ONNX_CACHE"
DEFAULT_CACHE = CACHE_DIR / "onnx"
#: largest difference from PyTorch a cached graph may have (embedding: absolute; feature: relative to its norm)
CHECK_TOLERANCE = 1e-5
#: synthetic crops of the export check (plus the first one alone: a batch of one)
CHECK_COUNT = 8
#: the packages the onnxruntime runtime needs: to run, to export (torch.onnx's exporter) and to read the graph
_PACKAGES = ("onnxruntime", "onnx", "onnxscript")
_INFO_KEYS = ("backbone", "input_size", "template", "threshold", "iteration", "preprocessing", "flip_policy")


def default_runtime() -> str:
    """``$SPHEREFACE_PLUS_RUNTIME`` when set (checked), else ``auto``."""
    value = os.environ.get(RUNTIME_ENV, "").strip() or "auto"
    if value not in RUNTIMES:
        raise UsageError(f"${RUNTIME_ENV}={value!r}: choose one of {', '.join(RUNTIMES)} (or unset it)")
    return value


def cache_dir(path=None) -> Path:
    """The folder of cached exports: ``path``, else ``$SPHEREFACE_PLUS_ONNX_CACHE``, else the default."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def missing_packages() -> Tuple[str, ...]:
    """The packages of :data:`_PACKAGES` that do not import here."""
    import importlib.util

    return tuple(p for p in _PACKAGES if importlib.util.find_spec(p) is None)


def choose_runtime(runtime: str, precision: str, device) -> Tuple[str, str, str]:
    """``(runtime, precision, why)``: what runs a checkpoint for the settings ``runtime`` and ``precision``
    (``auto|fp32|bf16``) on ``device``; the precision is a resolved one (``fp32`` or ``bf16``)."""
    from sphereface_plus.engine.precision import EMBED_SETTINGS, resolve_precision

    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if precision not in EMBED_SETTINGS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(EMBED_SETTINGS)}")
    device = torch.device(device)
    if runtime == "onnxruntime":
        if precision == "bf16":
            raise UsageError("--runtime onnxruntime runs the float32 graph: drop --precision bf16, or use "
                             "--runtime torch for bf16")
        missing = missing_packages()
        if missing:
            raise UsageError(f"--runtime onnxruntime needs {', '.join(missing)}: pip install {' '.join(missing)} "
                             f"(or use --runtime torch)")
        return "onnxruntime", "fp32", "--runtime onnxruntime"
    resolved = resolve_precision(precision, device, what="--precision")
    if runtime == "torch":
        return "torch", resolved, "--runtime torch"
    if device.type != "cpu":
        return "torch", resolved, f"the device is {device.type}"
    if resolved != "fp32":
        return "torch", resolved, f"{resolved}: onnxruntime runs float32 only"
    missing = missing_packages()
    if missing:
        return "torch", resolved, f"{', '.join(missing)} not installed"
    return "onnxruntime", "fp32", "float32 on a CPU"


# --------------------------------------------------------------------------- the cache


def _versions() -> Dict[str, str]:
    import sphereface_plus

    return {"toolkit": str(getattr(sphereface_plus, "__version__", "unknown")), "torch": torch.__version__}


def _record_problem(record_path: Path, onnx_path: Path, sha: str) -> Optional[str]:
    """Why the cached export of checkpoint ``sha`` cannot be trusted (None: it can)."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no record" if onnx_path.exists() else "none cached"
    except (OSError, ValueError) as e:
        return f"its record {record_path.name} is unreadable ({type(e).__name__})"
    if not isinstance(record, dict) or record.get("checkpoint_sha256") != sha:
        return f"its record {record_path.name} names another checkpoint"
    if record.get("versions") != _versions():
        return f"it was exported by {record.get('versions')}, this is {_versions()}"
    if record.get("status") == "failed":
        return None  # a remembered failure: the caller reads it
    if not onnx_path.is_file():
        return f"{onnx_path.name} is missing"
    if sha256_file(onnx_path) != record.get("onnx_sha256"):
        return f"{onnx_path.name} does not match its recorded sha256 (damaged or changed)"
    info = record.get("info")
    if not isinstance(info, dict) or any(k not in info for k in _INFO_KEYS):
        return f"its record {record_path.name} lacks the model's info"
    return None


def _info_from_record(record: Dict[str, object]) -> Dict[str, object]:
    info = dict(record["info"])
    info["input_size"] = tuple(int(v) for v in info["input_size"])
    return info


class ExportFailed(ToolkitError, RuntimeError):
    """torch.onnx could not export the backbone (an operator it does not support), or did so before."""


def cached_export(checkpoint, cache=None, retry_failed: bool = False) -> Tuple[Path, Dict[str, object], str]:
    """``(path of the checked .onnx, the model's info, what happened)`` for ``checkpoint``, exporting it
    when the cache has no trustworthy copy (see the module docstring).

    Raises :class:`eval.export.ExportCheckError` when the export differs from PyTorch by more than
    :data:`CHECK_TOLERANCE`, :class:`ExportFailed` when the exporter fails or the cache folder cannot be
    written, and the toolkit's errors of a checkpoint that does not load. A failure is recorded, and raised
    again without exporting on the next call unless ``retry_failed``.
    """
    from eval.export import ExportCheckError, export_checked
    from eval.features import load_embedding_model
    from sphereface_plus.errors import MissingFileError
    from sphereface_plus.utils import atomic_write_bytes

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise MissingFileError(f"checkpoint {checkpoint} does not exist")
    folder = cache_dir(cache)
    sha = sha256_file(checkpoint)
    onnx_path, record_path = folder / f"{sha}.onnx", folder / f"{sha}.json"
    problem = _record_problem(record_path, onnx_path, sha)
    if problem is None:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("status") != "failed":
            return onnx_path, _info_from_record(record), f"cached export {onnx_path}"
        if not retry_failed:
            raise ExportFailed(f"its export failed before with these versions ({record.get('reason')}); "
                               f"--runtime onnxruntime tries again")
        problem = "its export failed before; trying again"
    if problem != "none cached":
        logger.warning("exporting %s to ONNX again: %s", checkpoint, problem)
    backbone, info = load_embedding_model(checkpoint)
    t0 = time.perf_counter()
    base = {"checkpoint_sha256": sha, "checkpoint": str(checkpoint.resolve()), "versions": _versions()}
    try:
        try:
            data, summary = export_checked(backbone, info, checkpoint, "onnx", check_count=CHECK_COUNT,
                                           tolerance=CHECK_TOLERANCE)
        except ExportCheckError as e:
            atomic_write_json(record_path, {**base, "status": "failed", "reason": str(e)})
            raise
        except ToolkitError:
            raise
        except Exception as e:  # noqa: BLE001 (torch.onnx's exporter raises many types for an unsupported operator)
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            atomic_write_json(record_path, {**base, "status": "failed", "reason": reason})
            raise ExportFailed(f"torch.onnx could not export it ({reason})") from e
        atomic_write_bytes(onnx_path, data)  # the graph first: a graph without its record is not trusted
        atomic_write_json(record_path, {
            **base, "status": "ok", "onnx_sha256": sha256_file(onnx_path),
            "check": {"tolerance": CHECK_TOLERANCE, "images": summary["check_images"],
                      "max_abs_diff_embedding": summary["max_abs_diff_embedding"],
                      "max_rel_diff_feature": summary["max_rel_diff_feature"]},
            "info": {k: (list(info[k]) if k == "input_size" else info.get(k)) for k in _INFO_KEYS},
        })
    except OSError as e:  # a read-only or full cache folder
        raise ExportFailed(f"cannot write the cache folder {folder} ({e.strerror or e}); set ${CACHE_ENV} to a "
                           f"writable folder") from None
    what = (f"exported once in {time.perf_counter() - t0:.0f} s (max difference from PyTorch "
            f"{max(summary['max_abs_diff_embedding'], summary['max_rel_diff_feature']):.1e}), cached at {onnx_path}")
    return onnx_path, info, what


# --------------------------------------------------------------------------- loading


def load_inference_model(path, device="cpu", precision: str = "auto", runtime: Optional[str] = None,
                         cache=None) -> Tuple[torch.nn.Module, Dict[str, object]]:
    """``(model, info)`` like :func:`eval.features.load_embedding_model`, the model run by the chosen runtime.

    ``runtime`` (default :func:`default_runtime`) and ``precision`` are the commands' ``--runtime`` and
    ``--precision``; ``info`` gains ``runtime`` (``torch`` or ``onnxruntime``) and ``runtime_reason``.
    An ``.onnx`` file runs in onnxruntime (``runtime="torch"`` is an error; the environment's default does
    not apply to it). Logs one line saying which runtime runs and why.
    """
    from eval.export import ExportCheckError
    from eval.features import load_embedding_model
    from eval.onnx_model import OnnxLoadError, OnnxModel

    if Path(path).suffix.lower() == ".onnx":  # whatever $SPHEREFACE_PLUS_RUNTIME says
        if runtime == "torch":
            raise UsageError(f"--runtime torch cannot run {path} (an ONNX file): give the training checkpoint (.pt), "
                             f"or drop --runtime")
        model, info = load_embedding_model(path, device=device)
        return model, _announce(model, info, "onnxruntime", "an .onnx file", str(path), precision, device)
    runtime = default_runtime() if runtime is None else runtime
    chosen, _, why = choose_runtime(runtime, precision, device)
    if chosen == "onnxruntime":
        try:  # a checkpoint that does not load raises its CheckpointError here, as PyTorch would
            onnx_path, info, what = cached_export(path, cache, retry_failed=runtime == "onnxruntime")
            model = OnnxModel(onnx_path, device=device)
        except (ExportCheckError, ExportFailed, OnnxLoadError) as e:
            if runtime != "auto":
                raise
            logger.warning("onnxruntime cannot run %s: %s; running PyTorch instead", path, e)
            why = "its ONNX export failed (see the warning above)"
        else:
            return model, _announce(model, info, "onnxruntime", why, what, precision, device)
    model, info = load_embedding_model(path, device=device)
    return model, _announce(model, info, "torch", why, "", precision, device)


def _announce(model, info: Dict[str, object], runtime: str, why: str, what: str, precision: str,
              device) -> Dict[str, object]:
    """The one notice line of :func:`load_inference_model`; ``info`` with ``runtime`` and ``runtime_reason``."""
    from eval.features import inference_setup

    info = dict(info, runtime=runtime, runtime_reason=why)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        lanes = getattr(model, "lanes", 1)
        how = f"{lanes} single-threaded lanes" if lanes > 1 else f"{getattr(model, 'num_threads', 1)} threads"
        logger.info("runtime: onnxruntime %s, float32, %s (%s); %s", ort.__version__, how, why, what)
    else:
        resolved, channels_last = inference_setup(model, precision, device)
        logger.info("runtime: torch %s on %s, %s%s, %d threads (%s)", torch.__version__, torch.device(device),
                    resolved, ", channels_last" if channels_last else "", torch.get_num_threads(), why)
    return info
