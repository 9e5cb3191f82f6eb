"""``sphereface-plus info``: versions, compute device, registered backbones and heads.

Useful first in a bug report: it shows what is installed and what the registries contain (with the
parameter count of each model at its default size).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, Dict

HELP = "print versions, device, and the registered backbones and heads"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the information as one JSON object")
    parser.add_argument(
        "--no-params",
        action="store_true",
        help="do not build every model to count its parameters (faster)",
    )


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:  # an optional dependency may be missing or broken
        return f"not available ({type(exc).__name__})"
    return str(getattr(module, "__version__", "unknown"))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def collect(count_params: bool = True) -> Dict[str, Any]:
    """Everything ``info`` prints, as a plain dict."""
    import torch

    import sphereface_plus
    from sphereface_plus.heads import create_head, list_heads
    from sphereface_plus.models import create_backbone, list_backbones

    cuda = torch.cuda.is_available()
    device: Dict[str, Any] = {"cuda_available": cuda, "cuda_devices": []}
    if cuda:
        device["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device["cuda_version"] = torch.version.cuda
    device["cpu_threads"] = torch.get_num_threads()
    versions = {
        "sphereface_plus": sphereface_plus.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "opencv": _version("cv2"),
    }
    backbones = {}
    with torch.device("meta"):  # parameter counts without allocating or initialising memory
        for name in list_backbones():
            backbones[name] = _count(create_backbone(name)) if count_params else None
        heads = {}
        for name in list_heads():
            heads[name] = _count(create_head(name, in_features=512, num_classes=10572)) if count_params else None
    return {"versions": versions, "device": device, "backbones": backbones, "heads": heads}


def run(args: argparse.Namespace) -> int:
    info = collect(count_params=not args.no_params)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    out = sys.stdout
    out.write("versions\n")
    for k, v in info["versions"].items():
        out.write(f"  {k:<16} {v}\n")
    dev = info["device"]
    out.write("device\n")
    if dev["cuda_available"]:
        out.write(f"  cuda             yes ({', '.join(dev['cuda_devices'])}; CUDA {dev.get('cuda_version')})\n")
    else:
        out.write("  cuda             no (CPU only)\n")
    out.write(f"  cpu threads      {dev['cpu_threads']}\n")
    out.write("backbones (parameters at default size)\n")
    for name, n in info["backbones"].items():
        out.write(f"  {name:<20} {'' if n is None else f'{n:,}'}\n")
    out.write("heads (parameters at in_features=512, num_classes=10572)\n")
    for name, n in info["heads"].items():
        out.write(f"  {name:<20} {'' if n is None else f'{n:,}'}\n")
    return 0
