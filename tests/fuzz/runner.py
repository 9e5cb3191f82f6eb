"""A fuzz campaign: seeded mutations of a target's seeds, each input judged by the contract.

Both lanes use :func:`campaign`: the quick lane (``tests/test_fuzz.py``, ``make test``) with a fixed
number of inputs and a fixed seed, every input in this process and a sample in a forked child; the long
lane (``make fuzz``, ``python -m tests.fuzz``) for a time per target, every input in a child (the API
and, where the target has one, the command line). Every failing input is written as a reproducer to
``<failures>/<target>/<hash>/``: the case's files and ``failure.txt`` (the verdict, the command line,
how to replay it with ``python -m tests.fuzz --replay FOLDER``).
"""
from __future__ import annotations

import hashlib
import json
import random
import resource
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .contract import Verdict, judge_cli_in_process, judge_in_child, judge_in_process, one_thread, preload
from .targets import Case, Target

#: reproducers written per failure signature (a systematic bug would otherwise write thousands)
MAX_REPRODUCERS_PER_SIGNATURE = 20


@dataclass
class Report:
    """What a campaign found, for the reliability table (``docs/fuzzing.md#reliability``)."""

    target: str
    reader: str
    inputs: int = 0
    in_process: int = 0
    in_child: int = 0
    ok: int = 0
    refused: int = 0
    failures: int = 0
    signatures: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, str] = field(default_factory=dict)  # signature -> the first failure's detail
    reproducers: List[str] = field(default_factory=list)
    peak_mib: float = 0.0
    slowest_seconds: float = 0.0
    slowest_input: str = ""
    seconds: float = 0.0
    seed: int = 0

    def add(self, verdicts: Sequence[Verdict], label: str) -> None:
        """One input's verdicts (in process, in a child): it failed when any of them did; otherwise it was read
        or refused as its first verdict says."""
        self.inputs += 1
        failed = [v for v in verdicts if v.failed]
        if failed:
            self.failures += 1
        elif verdicts and verdicts[0].status == "ok":
            self.ok += 1
        elif verdicts:
            self.refused += 1
        for verdict in failed:
            sig = verdict.signature()
            self.signatures[sig] = self.signatures.get(sig, 0) + 1
            self.examples.setdefault(sig, f"[{verdict.mode}] {verdict.detail[-4000:]}")
        for verdict in verdicts:
            if verdict.peak_mib is not None:
                self.peak_mib = max(self.peak_mib, verdict.peak_mib)
            if verdict.seconds > self.slowest_seconds:
                self.slowest_seconds, self.slowest_input = verdict.seconds, f"{label} [{verdict.mode}]"

    def summary(self) -> str:
        lines = [f"{self.target}: {self.inputs} inputs ({self.in_process} in process, {self.in_child} in a child), "
                 f"{self.ok} read, {self.refused} refused, {self.failures} failed; peak {self.peak_mib:.0f} MiB, "
                 f"slowest {self.slowest_seconds:.2f} s ({self.slowest_input})"]
        for sig, n in sorted(self.signatures.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n} x {sig}")
            lines.append("    " + self.examples[sig].strip().splitlines()[-1][:300])
        return "\n".join(lines)


def case_hash(case: Case) -> str:
    h = hashlib.sha1()
    for name in sorted(case):
        h.update(name.encode() + b"\0" + hashlib.sha1(case[name]).digest())
    return h.hexdigest()[:16]


def write_case(case: Case, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, data in case.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def write_reproducer(target: Target, case: Case, verdict: Verdict, folder: Path, sandbox_case: Path) -> Path:
    out = folder / target.name / case_hash(case)
    write_case(case, out)
    argv = target.argv(sandbox_case)
    (out / "failure.txt").write_text(
        f"target: {target.name} ({target.reader})\nkind: {verdict.kind} ({verdict.mode})\n"
        f"signature: {verdict.signature()}\n"
        + (f"command (in the case folder): sphereface-plus {' '.join(argv)}\n" if argv else "")
        + f"replay: python -m tests.fuzz --replay {out}\n\n{verdict.detail}\n")
    return out


@dataclass
class Lane:
    """How a campaign runs its inputs."""

    in_process: bool = True  # every input in this process
    child_every: int = 0  # every n-th input also in a forked child (1: all; 0: none)
    cli: bool = True  # the child runs the command line when the target has one (else its API)
    api_in_child: bool = False  # the child also runs the API (the long lane: both, every input)


def _limit_memory() -> tuple:
    """Lower this process's soft ``RLIMIT_AS`` to what it maps plus 3 GiB while a campaign runs in it, so a
    reader that allocates without bound fails with MemoryError here instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        size = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmSize:")) * 1024
    want = size + (3 << 30)
    if soft == resource.RLIM_INFINITY or soft > want:
        resource.setrlimit(resource.RLIMIT_AS, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    return soft, hard


def campaign(target: Target, *, count: Optional[int] = None, seconds: Optional[float] = None, seed: int = 0,
             lane: Lane = Lane(), failures_dir: Optional[Path] = None, workdir: Optional[Path] = None,
             log=None) -> Report:
    """Run ``count`` inputs (or for ``seconds``) of ``target``; the seeds themselves first, unmutated."""
    if count is None and seconds is None:
        raise ValueError("give count or seconds")
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-")) if own_tmp else Path(workdir)
    rng = random.Random(f"{target.name}:{seed}")
    report = Report(target.name, target.reader, seed=seed)
    preload()
    limits = _limit_memory()
    t_start = time.monotonic()
    threads = one_thread()
    threads.__enter__()
    try:
        seeds = target.prepare(root / "context")
        sandbox = root / "sandbox"
        case_dir = sandbox / "case"
        kept: Counter = Counter()
        i = 0
        while True:
            if count is not None and i >= count + len(seeds):
                break
            if seconds is not None and time.monotonic() - t_start > seconds:
                break
            if i < len(seeds):
                case, label = seeds[i], f"seed {i}"
            else:
                base = target.choose_seed(rng, seeds)
                case = _mutated(target, rng, seeds[base], seeds)
                label = f"input {i} (seed {base}, {case_hash(case)})"
            write_case(case, case_dir)
            names = target.names(case_dir)
            verdicts: List[Verdict] = []
            if lane.in_process or i < len(seeds):  # the seeds always: children fork from a warmed-up reader
                verdicts.append(judge_in_process(target, case_dir, sandbox, names))
                report.in_process += 1
                write_case(case, case_dir)  # as it was (a failed reader may have changed it)
            if i < len(seeds) and target.argv(case_dir):  # and the seeds' command line, warming up its path too
                verdicts.append(judge_cli_in_process(target, case_dir, sandbox, names))
                write_case(case, case_dir)
            if lane.child_every and i % lane.child_every == 0:
                modes = []
                if lane.api_in_child or not (lane.cli and target.argv(case_dir)):
                    modes.append("api")
                if lane.cli and target.argv(case_dir):
                    modes.append("cli")
                for mode in modes:
                    verdicts.append(judge_in_child(target, case_dir, sandbox, names, mode))
                    write_case(case, case_dir)
                report.in_child += 1
            report.add(verdicts, label)
            bad = next((v for v in verdicts if v.failed), None)
            if i < len(seeds) and bad is not None:
                report.examples.setdefault("seed", f"seed {i} itself fails: {bad.kind}: {bad.detail[-2000:]}")
            if bad is not None and failures_dir is not None and kept[bad.signature()] < MAX_REPRODUCERS_PER_SIGNATURE:
                kept[bad.signature()] += 1
                report.reproducers.append(str(write_reproducer(target, case, bad, Path(failures_dir), case_dir)))
            if log is not None and bad is not None:
                log(f"{target.name}: {label}: {bad.kind} ({bad.mode}): {bad.signature()}")
            i += 1
    finally:
        threads.__exit__(None, None, None)
        resource.setrlimit(resource.RLIMIT_AS, limits)
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.monotonic() - t_start
    return report


def _mutated(target: Target, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
    """A mutation of ``case`` that differs from it (the mutator may fail on a strange tree: try again)."""
    for _ in range(20):
        try:
            out = target.mutate(rng, case, seeds)
        except (RecursionError, ValueError, TypeError, OverflowError, MemoryError):
            continue  # the harness could not write this mutation (e.g. a too deep tree): another one
        if out != case:
            return out
    return target.mutate(rng, case, seeds)


def warm_up(target: Target, seeds: Sequence[Case], root: Path) -> None:
    """Read the first seed here, through the API and the command line, so that children forked afterwards start
    with what a reader pays once per process (lazy imports, the first bf16 kernels) already paid."""
    sandbox = root / "warm-up"
    case_dir = sandbox / "case"
    write_case(seeds[0], case_dir)
    names = target.names(case_dir)
    judge_in_process(target, case_dir, sandbox, names)
    if target.argv(case_dir):
        write_case(seeds[0], case_dir)
        judge_cli_in_process(target, case_dir, sandbox, names)
    shutil.rmtree(sandbox, ignore_errors=True)


def prepare_warm(target: Target, context: Path) -> None:
    """:meth:`Target.prepare` in ``context``, then :func:`warm_up` on its first seed (for replays)."""
    preload()
    warm_up(target, target.prepare(context), context.parent / f"{context.name}-warm")


def replay(target: Target, folder: Path, cli: bool = True, context: Optional[Path] = None) -> List[Verdict]:
    """Judge a reproducer folder again (in process, then in a child: the API and the command line).

    ``context``: a folder :func:`prepare_warm` already prepared the target in (replays of one target share it)."""
    case: Case = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
                  if p.is_file() and p.name != "failure.txt"}
    root = Path(tempfile.mkdtemp(prefix=f"fuzz-replay-{target.name}-"))
    try:
        if context is None:
            prepare_warm(target, root / "context")
        else:
            target.context = context
        sandbox = root / "sandbox"
        case_dir = sandbox / "case"
        write_case(case, case_dir)
        names = target.names(case_dir)
        with one_thread():
            out = [judge_in_process(target, case_dir, sandbox, names)]
            write_case(case, case_dir)
            out.append(judge_in_child(target, case_dir, sandbox, names, "api"))
            if cli and target.argv(case_dir):
                write_case(case, case_dir)
                out.append(judge_in_child(target, case_dir, sandbox, names, "cli"))
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report_json(reports: Sequence[Report]) -> str:
    return json.dumps([asdict(r) for r in reports], indent=1)
