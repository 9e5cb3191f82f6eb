"""Command-line options that several commands share, defined once.

- :func:`add_inference_arguments`: ``--precision auto|fp32|bf16`` (:func:`add_precision_argument`) and
  ``--runtime auto|torch|onnxruntime`` of every command that embeds images (``verify``, ``compare``,
  ``megaface export``).
- :func:`add_run_arguments`: ``--out``, ``--resume``, ``--device``, ``--threads`` of the CIFAR and GAN runs.
- :func:`add_field_flags` / :func:`load_config_from_args`: a recipe's top-level fields as flags (the
  CIFAR and GAN commands keep the seed scripts' flags that way), merged as defaults < ``--config`` YAML <
  ``key=value`` < flags.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

from sphereface_plus.config import load_config

T = TypeVar("T")


def add_precision_argument(parser) -> None:
    """``--precision auto|fp32|bf16`` for the commands that embed images."""
    from sphereface_plus.engine.precision import EMBED_SETTINGS

    parser.add_argument("--precision", choices=EMBED_SETTINGS, default="auto",
                        help="backbone precision: bf16 (autocast, NHWC on CPU; features stay float32) or fp32; "
                             "default auto = bf16 where the CPU/GPU has native bf16 (AVX512-BF16, AMX, "
                             "Ampere+), else fp32")


def add_inference_arguments(parser) -> None:
    """``--precision`` and ``--runtime`` for the commands that embed images (``eval.runtime``)."""
    from eval.runtime import RUNTIME_ENV, RUNTIMES

    add_precision_argument(parser)
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="what runs the network: torch, or onnxruntime on the checkpoint's ONNX export (made "
                             "once, checked against PyTorch to 1e-5, cached under ~/.cache/sphereface_plus/onnx); "
                             "default auto = onnxruntime for float32 on a CPU when it is installed (faster there), "
                             f"else torch; ${RUNTIME_ENV} sets the default")


def add_run_arguments(group, default_out: str, threads_note: str = "") -> None:
    """``--out``, ``--resume``, ``--device`` and ``--threads`` of a CIFAR or GAN run (``default_out``: where
    the run goes without ``--out``)."""
    group.add_argument("--out", default=None, help=f"run folder (default: {default_out})")
    group.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ... (default: auto)")
    group.add_argument("--threads", type=int, default=0,
                       help="CPU threads for torch (torch.set_num_threads); 0 keeps torch's default" + threads_note)


def add_field_flags(group, fields: Dict[str, Any], aliases: Optional[Dict[str, List[str]]] = None) -> None:
    """One command-line flag per top-level recipe field (``{name: (type, help)}``), spelled with dashes and,
    for names with an underscore, also with underscores (the original scripts' spelling), plus ``aliases``.
    Every flag defaults to None, so :func:`load_config_from_args` passes on only the flags that were given."""
    for name, (tp, text) in fields.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else []) + (aliases or {}).get(name, [])
        group.add_argument(*flags, dest=name, type=tp, default=None, help=text)


def load_config_from_args(args: Any, flag_names: Sequence[str], schema: Type[T]) -> T:
    """Defaults < ``args.config`` YAML < ``args.overrides`` (``key=value``) < the flags in ``flag_names``
    that were given (not None)."""
    flags = [f"{n}={getattr(args, n)}" for n in flag_names if getattr(args, n, None) is not None]
    return load_config(args.config, list(getattr(args, "overrides", [])) + flags, schema=schema)
