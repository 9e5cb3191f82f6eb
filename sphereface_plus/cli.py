"""The ``sphereface-plus`` command: parses the command line and dispatches, nothing else.

Each subcommand is a module of :mod:`sphereface_plus.commands` that provides ``add_arguments(parser)``,
``run(args) -> int`` and a one-line ``HELP`` string. Only the module of the
command being run is imported, so a command starts fast and an optional dependency of one command
(onnxruntime, say) never breaks another. ``python -m sphereface_plus ...`` and the
``sphereface-plus`` console script are the same entry point.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback
from typing import Callable, List, Optional

# subcommand -> (module that implements it, one-line summary for the top-level help)
COMMANDS = {
    "info": ("sphereface_plus.commands.info", "print versions, device, registered backbones and heads"),
    "fetch-weights": ("sphereface_plus.commands.fetch_weights", "download and verify the MTCNN / RetinaFace weights"),
    "align": ("sphereface_plus.commands.align",
              "detect / read 5 landmarks and warp a dataset tree to 112x96 or 112x112 crops"),
    "train": ("sphereface_plus.commands.train",
              "train SphereFace / SphereFace+ from a YAML recipe (torchrun for many GPUs)"),
    "verify": ("sphereface_plus.commands.verify",
               "LFW 10-fold verification, any pairs list, insightface .bin packs, identity folders"),
    "export": ("sphereface_plus.commands.export",
               "ONNX / TorchScript export of a checkpoint's embedding network, checked against PyTorch"),
    "compare": ("sphereface_plus.commands.compare", "cosine similarity and same/different decision for two photos"),
    "megaface": ("sphereface_plus.commands.megaface",
                 "export MegaFace devkit feature files and score them without the devkit"),
    "cifar": ("sphereface_plus.commands.cifar", "CIFAR MHE experiments (9-conv CNN, MHE on every layer)"),
    "gan": ("sphereface_plus.commands.gan",
            "MHE-GAN on CIFAR-10 (SN / MHE variants of the published table, FID/KID offline)"),
    "demo": ("sphereface_plus.commands.demo", "the whole pipeline (align, train, verify, report) on built-in or LFW data"),
    "import": ("sphereface_plus.commands.import_weights",
               "released weights (SphereFace Caffe, insightface, OpenSphere, ONNX, MHE-GAN TF1) to a toolkit model"),
    "pack-bin": ("sphereface_plus.commands.pack_bin",
                 "write an insightface-style .bin verification pack from a pairs file and aligned crops"),
    "check": ("sphereface_plus.commands.check", "verify checkpoints and packed datasets (checksums) before a long run"),
    "gallery": ("sphereface_plus.commands.gallery",
                "1:N identification: build a gallery, enrol and remove people, search probes (exact, HNSW, IVF-PQ)"),
}

EPILOG = """\
examples:
  sphereface-plus info
  sphereface-plus fetch-weights
  sphereface-plus align --input lfw/images --output lfw-112x96 --landmarks lfw_landmark.txt
  sphereface-plus train --config configs/face/sphereface20_casia.yaml data.root=casia-112x96
  sphereface-plus verify lfw --checkpoint runs/x/checkpoints/last.pt --root lfw-112x96 --pairs pairs.txt
  sphereface-plus cifar --model_name mhe --power_s 0 --data cifar-100-python
  sphereface-plus demo
  sphereface-plus pack-bin --pairs pairs.txt --root lfw-112x96 --out lfw.bin
  sphereface-plus import --from caffe sphereface_deploy.prototxt sphereface_model.caffemodel --out sphere20.pt
  sphereface-plus check runs/x casia-112x96
  sphereface-plus gallery build --gallery people --checkpoint last.pt --images enrol/
  sphereface-plus gallery search --gallery people --images probes/ --top-k 5

Run 'sphereface-plus COMMAND --help' for the options of a command.

exit status: 0 success (also: stopped by SIGUSR1 after a checkpoint); 1 environment failure (disk
full, permission denied, read-only folder, a peer that stopped answering, a run that diverged: one
'error:' line); 2 usage or input error (one 'error:' line says what, where and how to fix it; --debug
or SPHEREFACE_PLUS_DEBUG=1 adds the traceback); 3 align finished but skipped or failed some images
(see its manifest); 130 interrupted (SIGINT), 143 terminated (SIGTERM), training runs after writing
a checkpoint (docs/robustness.md). Any other failure with a traceback is a bug: please report it.
"""

DEBUG_ENV = "SPHEREFACE_PLUS_DEBUG"


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sphereface-plus",
        description="SphereFace / SphereFace+ face recognition and Minimum Hyperspherical Energy (MHE) toolkit.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from sphereface_plus import __version__

    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    parser.add_argument("--version", action="version", version=f"sphereface-plus {__version__}")
    return parser


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported (all of them when ``command`` is None)."""
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=getattr(module, "HELP", summary),
            description=getattr(module, "DESCRIPTION", None) or module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _find_command(argv: List[str]) -> Optional[str]:
    for token in argv:
        if token in COMMANDS:
            return token
        if not token.startswith("-"):
            return None
    return None


def _debug_wanted(argv: List[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def run_guarded(func: Callable[[], int], prog: str, debug: Optional[bool] = None) -> int:
    """``func()``, with a :class:`~sphereface_plus.errors.ToolkitError` turned into one line and exit 2.

    ``prog: error: <message>`` on stderr; the traceback only with ``debug`` (default: the
    ``SPHEREFACE_PLUS_DEBUG`` variable). Other exceptions are bugs and keep their traceback. It is
    :func:`main`'s guard (also under torchrun, ``torchrun ... -m sphereface_plus train``).
    """
    from sphereface_plus.errors import RunStopped, ToolkitError, one_line

    if debug is None:
        debug = _debug_wanted([])
    try:
        return int(func() or 0)
    except RunStopped as exc:  # a checkpoint was written on SIGTERM / SIGINT / SIGUSR1: not an error
        from sphereface_plus.utils import is_rank0

        if is_rank0():
            print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return exc.exit_status
    except ToolkitError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_status
    except (OSError, UnicodeDecodeError) as exc:
        line, status = environment_error_line(exc)
        if line is None:
            raise  # not one of the everyday causes: a bug, with its traceback
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {line}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def exit_process(code: int) -> None:
    """End the process with status ``code`` (the ``__main__`` of ``python -m sphereface_plus``, also the
    entry point of ``torchrun ... -m sphereface_plus train``).

    A ``torchrun`` worker (``WORLD_SIZE`` > 1) ends with ``os._exit`` once its logs and streams are flushed:
    its work is done and written (checkpoints are atomic, the process group is destroyed), and the
    interpreter's normal exit destroys the distributed library's C++ objects in no fixed order, which now
    and then aborted a worker after a successful run (SIGABRT, "terminate called without an active
    exception"; once in about 50 launches in the tests), and torchrun then reported the job failed. Anywhere
    else: ``sys.exit(code)``.
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world_size = 1
    if world_size <= 1:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(int(code))


#: errno -> the advice of the one line an everyday environment failure becomes (exit status 1)
_ENV_ERRNO = {
    errno.ENOSPC: "free some space or choose another output folder; the previous checkpoint is intact",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another output folder",
    errno.EACCES: "check the permissions, or choose another folder",
    errno.EPERM: "check the permissions, or choose another folder",
    errno.EROFS: "the file system is read-only: choose a writable output folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: rename it or choose another path",
    errno.EISDIR: "the path is a folder, a file is needed there: choose another path",
    errno.EEXIST: "something is already in the way at that path: move it or choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or lower data.num_workers",
}


def environment_error_line(exc: BaseException):
    """``(one line, exit status)`` for an everyday environment failure escaping a command, else ``(None, 0)``.

    Disk full, permission denied, a read-only folder, a path that is a file: exit status 1 (the
    environment); text that is not UTF-8: exit status 2 (the input). Anything else stays a bug with
    its traceback.
    """
    if isinstance(exc, UnicodeDecodeError):
        bad = exc.object[exc.start:exc.start + 1]
        return (f"an input text file is not valid UTF-8 (byte 0x{bad.hex() if bad else '??'} at offset {exc.start}); "
                "save it as UTF-8 (for example with iconv -t utf-8)"), 2
    if isinstance(exc, OSError) and exc.errno in _ENV_ERRNO:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        what = os.strerror(exc.errno)
        return f"{what}{': ' + where if where else ''}; {_ENV_ERRNO[exc.errno]}", 1
    return None, 0


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, dispatch, and turn a :class:`~sphereface_plus.errors.ToolkitError` into one line, exit 2.

    ``sphereface-plus COMMAND: error: <message>`` on stderr; the traceback only with ``--debug``
    (anywhere on the command line) or ``SPHEREFACE_PLUS_DEBUG=1``. Other exceptions are bugs and
    keep their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_wanted(argv)
    if "--debug" in argv:  # accepted before or after the command
        argv = [a for a in argv if a != "--debug"]
    command = _find_command(argv)
    prog = f"sphereface-plus {command}" if command else "sphereface-plus"

    def dispatch() -> int:
        parser = build_parser(command) if command else build_parser("")
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        from sphereface_plus.utils import setup_logging

        setup_logging(logging.DEBUG if args.verbose else logging.INFO)
        return int(args._run(args) or 0)

    return run_guarded(dispatch, prog, debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
