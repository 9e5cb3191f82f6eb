"""The contract every reader is held to, judged for one input (docs/fuzzing.md#fuzz-contract).

For every input a reader either returns a valid result or refuses it with the toolkit's error type
(:class:`~sphereface_plus.errors.ToolkitError`; through the command line: exit status 2 and one
``error:`` line) whose message names the file. Anything else is a failure of one of these kinds:

``traceback``
    any other exception (a command: a traceback on stderr, or an exit status that is neither a result nor 2);
``hang``
    more than :data:`HANG_SECONDS` for one input (the child is killed by ``SIGALRM``);
``memory``
    an allocation refused under ``RLIMIT_AS`` (:data:`MEMORY_LIMIT` above what the process had mapped
    before the input; ``MemoryError`` or a C++ ``bad_alloc``), or a child killed for memory;
``crash``
    a child killed by a signal (a segmentation fault in a C library), or one that left no verdict;
``error-line``
    a refusal whose message names no input file, or a command that printed no or several ``error:`` lines;
``stray-write``
    a file created, changed or removed anywhere in the sandbox except the outputs the run was asked for
    (the inputs themselves included);
``invalid-result``
    a result that the target's own check rejects (negative folds, a NaN landmark...).

:func:`judge_in_process` runs the reader in this process (fast; a Python-level hang is interrupted after
:data:`IN_PROCESS_SECONDS`); :func:`judge_in_child` forks a child that sets ``RLIMIT_AS`` to what it has
mapped plus :data:`MEMORY_LIMIT` and an alarm of :data:`HANG_SECONDS`, runs the reader (or the command
line, through ``sphereface_plus.cli.main``) with stdout and stderr in files, and reports back; its peak
resident memory above the baseline is measured by ``wait4``. The fork shares everything imported so far,
so a child costs milliseconds, not the seconds of starting Python and torch.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

HANG_SECONDS = 10  # the contract: no input takes longer
IN_PROCESS_SECONDS = 20  # the in-process lane's guard against a Python-level endless loop
MEMORY_LIMIT = 1 << 30  # the contract: no input maps more than this above the process's baseline
#: an "error:" that reports an error (a line's start, or after a space or colon: "libpng error:", "EP Error:",
#: "sphereface-plus verify: error:"), not an exception's name inside a message ("ValueError: ...")
ERROR_WORD = re.compile(r"(?:^|[\s:])error:", re.IGNORECASE)
KIND_ORDER = ("crash", "memory", "hang", "traceback", "stray-write", "error-line", "invalid-result")


@dataclass
class Verdict:
    """What one run of one input came to (``status`` ok / refused / fail)."""

    status: str
    kind: str = ""
    detail: str = ""
    seconds: float = 0.0
    peak_mib: Optional[float] = None
    mode: str = "api"  # api (the reader's Python function) or cli (python -m sphereface_plus ...)
    message: str = ""  # the refusal's one line

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def signature(self) -> str:
        """What identifies the bug behind a failure: its kind and the innermost frame of the toolkit (or the
        exception line), so that many inputs hitting one bug count once."""
        if self.kind not in ("traceback", "error-line", "invalid-result", "stray-write"):
            return f"{self.kind}|{self.mode}"
        lines = [ln.strip() for ln in self.detail.splitlines() if ln.strip()]
        frames = [ln for ln in lines if ln.startswith("File ") and "/tests/fuzz/" not in ln
                  and ("sphereface_plus" in ln or "/eval/" in ln or "/data_prep/" in ln)]
        last = lines[-1] if lines else ""
        exc = last.split(":", 1)[0] if self.kind == "traceback" else last[:80]
        where = frames[-1] if frames else ""
        return f"{self.kind}|{where}|{exc}"


class TimeLimit(BaseException):
    """Raised in this process when an in-process run passes :data:`IN_PROCESS_SECONDS`."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def ring(signum, frame):
        raise TimeLimit(f"over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ----------------------------------------------------------------------------------- the file tree
def snapshot(root: Path) -> Dict[str, str]:
    """``relative path -> sha1 of the content`` (folders: ``"dir"``, links: their target) under ``root``."""
    out: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                try:
                    out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
                except OSError as exc:
                    out[rel] = f"unreadable:{exc.errno}"
    return out


def stray_writes(before: Dict[str, str], after: Dict[str, str], allowed: Sequence[str]) -> List[str]:
    """What changed between two snapshots outside ``allowed`` (relative paths; a folder allows what is in it)."""
    def free(rel: str) -> bool:
        return any(rel == a or rel.startswith(a.rstrip("/") + "/") for a in allowed)

    out = []
    for rel in sorted(set(before) | set(after)):
        if before.get(rel) != after.get(rel) and not free(rel):
            what = "created" if rel not in before else "removed" if rel not in after else "changed"
            out.append(f"{rel} {what}")
    return out


# ------------------------------------------------------------------------------------- judging
def names_a_file(message: str, names: Sequence[str]) -> bool:
    return any(n and n in message for n in names)


def _error_verdict(exc: BaseException, names: Sequence[str]) -> Verdict:
    from sphereface_plus.errors import ToolkitError, one_line

    if isinstance(exc, ToolkitError):
        line = one_line(exc)
        if not names_a_file(line, names):
            return Verdict("fail", "error-line", f"the error names no input file: {line}", message=line)
        return Verdict("refused", message=line)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, TimeLimit):
        return Verdict("fail", "hang", f"over {IN_PROCESS_SECONDS} s in process\n{text}")
    kind = "memory" if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) \
        or "bad_alloc" in str(exc) else "traceback"
    return Verdict("fail", kind, text)


def judge_cli(rc: int, err: str, names: Sequence[str], ok_status: Sequence[int], out: str = "") -> Verdict:
    """The command line's verdict from its exit status, stderr and stdout (see the module docstring).

    Strict on purpose: every line of either stream that reports an ``error:`` (:data:`ERROR_WORD`, any case; a C
    library's "libpng error: ..." too) counts, and a refusal must have exactly one, the toolkit's."""
    lines = [ln for ln in (err + "\n" + out).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ERROR_WORD.search(ln)]
    if "Traceback (most recent call last)" in err + out:
        kind = "memory" if "MemoryError" in err or "can't allocate memory" in err or "bad_alloc" in err else "traceback"
        return Verdict("fail", kind, err[-6000:], mode="cli")
    if rc in ok_status and not errors:
        return Verdict("ok", mode="cli")
    if rc == 2 and len(errors) == 1 and (errors[0].startswith("sphereface-plus") or errors[0].startswith("error: ")):
        line = errors[0]
        if not names_a_file(line, names):
            return Verdict("fail", "error-line", f"the error names no input file: {line}", mode="cli", message=line)
        return Verdict("refused", mode="cli", message=line)
    return Verdict("fail", "error-line", f"exit status {rc} with {len(errors)} error line(s):\n{err[-3000:]}\n{out[-1000:]}",
                   mode="cli")


def judge_in_process(target: Any, case: Path, sandbox: Path, names: Sequence[str]) -> Verdict:
    """Run ``target.run(case)`` here, with ``case`` as the working folder (see the module docstring)."""
    before = snapshot(sandbox)
    t0 = time.perf_counter()
    result = None
    try:
        with working_dir(case), _alarm(IN_PROCESS_SECONDS):
            result = target.run(case)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B902 - every escape is judged
        verdict = _error_verdict(exc, names)
    else:
        problem = target.check(result, case)
        verdict = Verdict("fail", "invalid-result", problem) if problem else Verdict("ok")
    verdict.seconds = time.perf_counter() - t0
    strays = stray_writes(before, snapshot(sandbox), target.allowed_outputs(case, sandbox))
    if strays and not verdict.failed:
        verdict = Verdict("fail", "stray-write", "; ".join(strays[:10]), seconds=verdict.seconds)
    return verdict


def judge_cli_in_process(target: Any, case: Path, sandbox: Path, names: Sequence[str]) -> Verdict:
    """The command line (``sphereface_plus.cli.main``) in this process, its output captured at the Python level
    (for the seeds: it also warms up what the forked children then inherit, e.g. the first bf16 kernels)."""
    import logging

    from sphereface_plus.cli import main

    before = snapshot(sandbox)
    handlers = list(logging.getLogger().handlers)
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    try:
        with working_dir(case), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                _alarm(IN_PROCESS_SECONDS):
            try:
                rc = main(list(target.argv(case)))
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B902 - what main lets through is a traceback
        verdict = _error_verdict(exc, names)
        verdict.mode = "cli"
    else:
        verdict = judge_cli(rc, err.getvalue(), names, target.ok_status, out.getvalue())
    finally:
        for h in logging.getLogger().handlers[:]:  # a handler main added holds the captured stream
            if h not in handlers:
                logging.getLogger().removeHandler(h)
    verdict.seconds = time.perf_counter() - t0
    strays = stray_writes(before, snapshot(sandbox), target.allowed_outputs(case, sandbox))
    if strays and not verdict.failed:
        verdict = Verdict("fail", "stray-write", "; ".join(strays[:10]), seconds=verdict.seconds, mode="cli")
    return verdict


def _vm_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _limit_arenas() -> None:
    """One malloc arena per process: glibc reserves 64 MiB of address space for each thread's arena, which
    ``RLIMIT_AS`` would count although none of it is used (a harness setting, not a toolkit one)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _child(target: Any, case: Path, mode: str, out_dir: Path, names: Sequence[str]) -> None:
    """The body of the forked child: limits, redirected output, one run, a verdict written as JSON."""
    os.setpgid(0, 0)  # its own process group: a timeout kills the reader's workers too
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    # Python's streams onto those descriptors (under pytest they point at its capture files, not at 1 and 2)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True, errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True, errors="backslashreplace")
    import logging

    for handler in logging.getLogger().handlers:  # a handler made before the fork writes to the old stream
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setStream(sys.stderr)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.alarm(HANG_SECONDS)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    _limit_arenas()
    base_rss = _vm_kib("VmRSS")
    limit = _vm_kib("VmSize") * 1024 + MEMORY_LIMIT
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    os.chdir(case)
    t0 = time.perf_counter()
    verdict: Dict[str, Any]
    if mode == "cli":
        from sphereface_plus.cli import main

        try:
            rc = main(list(target.argv(case)))
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: B902 - what main lets through is a traceback on stderr
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        verdict = {"rc": rc}
    else:
        try:
            result = target.run(case)
        except BaseException as exc:  # noqa: B902
            v = _error_verdict(exc, names)
        else:
            problem = target.check(result, case)
            v = Verdict("fail", "invalid-result", problem) if problem else Verdict("ok")
        verdict = asdict(v)
    verdict["seconds"] = time.perf_counter() - t0
    verdict["base_rss_kib"] = base_rss
    (out_dir / "verdict.json").write_text(json.dumps(verdict))


#: what the readers and commands import: loaded once before the first fork, so a child starts at once
PRELOAD = ("torch", "cv2", "yaml", "onnx", "onnxruntime", "google.protobuf.text_format", "sphereface_plus.cli",
           "sphereface_plus.commands.train", "sphereface_plus.commands.import_weights", "sphereface_plus.commands.check",
           "sphereface_plus.commands.verify", "sphereface_plus.commands.megaface", "sphereface_plus.commands.compare",
           "sphereface_plus.importers.caffe", "sphereface_plus.importers.tf_bundle", "sphereface_plus.importers.mhe_gan",
           "sphereface_plus.importers.foreign_onnx", "sphereface_plus.engine.checkpoint", "sphereface_plus.face.config",
           "eval.features", "eval.pairs", "eval.packs", "eval.ijb", "eval.megaface", "eval.embedder", "eval.export",
           "eval.onnx_model", "eval.lfw", "eval.report", "eval.pack_bin", "data_prep.prepare", "data_prep.datasets",
           "data_prep.packed", "data_prep.jpeg", "data_prep.landmarks", "sklearn.metrics")
_PRELOADED: List[str] = []


def preload() -> None:
    """Import :data:`PRELOAD` once (what is not installed is skipped)."""
    import importlib

    if _PRELOADED:
        return
    for name in PRELOAD:
        try:
            importlib.import_module(name)
            _PRELOADED.append(name)
        except ImportError:
            pass


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """OpenCV and torch on one thread while a campaign forks children: a child inherits no thread pool it
    could not join (OpenCV's ``setNumThreads`` in a child of a parent whose pool has threads waits for them
    forever); the settings are restored afterwards."""
    import cv2
    import torch

    old = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(old[0])
        torch.set_num_threads(old[1])


def judge_in_child(target: Any, case: Path, sandbox: Path, names: Sequence[str], mode: str = "api") -> Verdict:
    """Run the input in a forked child under the memory and time limits (see the module docstring)."""
    preload()
    before = snapshot(sandbox)
    out_dir = Path(tempfile.mkdtemp(prefix="fuzz-child-"))
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            _child(target, case, mode, out_dir, names)
        except BaseException:  # noqa: B902
            code = 70
        finally:
            os._exit(code)
    deadline = time.monotonic() + HANG_SECONDS + 20  # the child's own alarm should fire first
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.002)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # workers the reader left behind
    seconds = time.perf_counter() - t0
    peak_kib = usage.ru_maxrss
    err = (out_dir / "stderr").read_text(errors="replace") if (out_dir / "stderr").is_file() else ""
    out = (out_dir / "stdout").read_text(errors="replace") if (out_dir / "stdout").is_file() else ""
    found = out_dir / "verdict.json"
    data = json.loads(found.read_text()) if found.is_file() else None
    for p in out_dir.iterdir():
        p.unlink()
    out_dir.rmdir()
    if os.WIFSIGNALED(status) or data is None:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if sig == signal.SIGALRM or sig == signal.SIGKILL and seconds > HANG_SECONDS:
            verdict = Verdict("fail", "hang", f"killed after {seconds:.1f} s (limit {HANG_SECONDS} s)\n{err[-3000:]}")
        elif sig == signal.SIGKILL:
            verdict = Verdict("fail", "memory", f"killed by SIGKILL (out of memory?)\n{err[-3000:]}")
        else:
            name = signal.Signals(sig).name if sig else f"exit status {os.WEXITSTATUS(status)}, no verdict"
            verdict = Verdict("fail", "crash", f"the child died ({name})\n{err[-3000:]}")
        verdict.seconds = seconds
    elif mode == "cli":
        verdict = judge_cli(int(data["rc"]), err, names, target.ok_status, out)
        verdict.seconds = data["seconds"]
    else:
        verdict = Verdict(**{k: v for k, v in data.items() if k in Verdict.__dataclass_fields__})
    verdict.mode = mode
    base = (data or {}).get("base_rss_kib")
    if base:
        verdict.peak_mib = max(0.0, (peak_kib - base) / 1024.0)
    strays = stray_writes(before, snapshot(sandbox), target.allowed_outputs(case, sandbox))
    if strays and not verdict.failed:
        verdict = Verdict("fail", "stray-write", "; ".join(strays[:10]), seconds=verdict.seconds,
                          peak_mib=verdict.peak_mib, mode=mode)
    return verdict


__all__ = ["Verdict", "HANG_SECONDS", "MEMORY_LIMIT", "KIND_ORDER", "snapshot", "stray_writes", "judge_cli",
           "judge_cli_in_process", "judge_in_process", "judge_in_child", "names_a_file"]
