"""The ``sphereface-plus`` command: parses the command line and dispatches, nothing else.

Each subcommand lives beside the code it drives, in a module that provides
``add_arguments(parser)``, ``run(args) -> int`` and a one-line ``HELP`` string. ``python -m
sphereface_plus ...`` and the ``sphereface-plus`` console script are the same entry point.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

# subcommand -> module that implements it (imported only when the parser is built)
COMMANDS = {
    "info": "sphereface_plus.info",
    "fetch-weights": "data_prep.detectors.weights",
    "align": "data_prep.prepare",
    "train": "sphereface_plus.train",
    "verify": "eval.cli",
    "compare": "eval.embedder",
    "megaface": "eval.megaface",
    "cifar": "sphereface_plus.cifar",
    "demo": "sphereface_plus.demo",
}

EPILOG = """\
examples:
  sphereface-plus info
  sphereface-plus fetch-weights
  sphereface-plus align --input lfw/images --output lfw-112x96 --landmarks lfw_landmark.txt
  sphereface-plus train --config configs/sphereface20_casia.yaml data.root=casia-112x96
  sphereface-plus verify lfw --checkpoint runs/x/checkpoints/last.pt --root lfw-112x96 --pairs pairs.txt
  sphereface-plus cifar --model_name mhe --power_s 0 --data cifar-100-python
  sphereface-plus demo

Run 'sphereface-plus COMMAND --help' for the options of a command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sphereface-plus",
        description="SphereFace / SphereFace+ face recognition and Minimum Hyperspherical Energy (MHE) toolkit.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        help_text = getattr(module, "HELP", None) or (module.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(
            name,
            help=help_text,
            description=getattr(module, "DESCRIPTION", None) or module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from sphereface_plus.utils import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
