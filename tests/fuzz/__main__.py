"""``python -m tests.fuzz``: the long lane (``make fuzz FUZZ_SECONDS=120``), or a replay of a reproducer.

    python -m tests.fuzz --seconds 120                      every target, 2 minutes each
    python -m tests.fuzz --seconds 30 --targets yaml,ijb    some of them
    python -m tests.fuzz --replay fuzz-failures/yaml/0123abcd...

Every input runs in a forked child under ``RLIMIT_AS`` and a 10 s alarm (the API, and the command line
where the target has one); failures go to ``--out`` (default ``fuzz-failures/``) as reproducers, the
figures of every campaign to ``<out>/report.json`` and, as the reliability table's rows, to stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the seed writers shared with the test modules (test_import...)
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("SPHEREFACE_PLUS_PROGRESS", "0")

from .runner import Lane, campaign, replay, report_json  # noqa: E402
from .targets import all_targets  # noqa: E402


def table_rows(reports) -> str:
    """Markdown rows: target, reader, inputs tried, failures, peak MiB, slowest input (s)."""
    lines = ["| target | reader | inputs | read / refused | failures | peak memory | slowest input |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in reports:
        lines.append(f"| `{r.target}` | {r.reader} | {r.inputs} | {r.ok} / {r.refused} | {r.failures} | "
                     f"{r.peak_mib:.0f} MiB | {r.slowest_seconds:.2f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="time per target (default 120)")
    p.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    p.add_argument("--seed", type=int, default=1, help="campaign seed (default 1)")
    p.add_argument("--out", default="fuzz-failures", help="where reproducers and report.json go")
    p.add_argument("--replay", metavar="FOLDER", help="judge one reproducer folder again and exit")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    args = p.parse_args(argv)
    targets = all_targets()
    if args.list:
        for name, t in targets.items():
            print(f"{name:12s} {t.reader}")
        return 0
    if args.replay:
        folder = Path(args.replay)
        name = folder.parent.name
        if name not in targets:
            p.error(f"{folder}: its parent folder must be a target name ({', '.join(targets)})")
        verdicts = replay(targets[name], folder)
        for v in verdicts:
            print(f"[{v.mode}] {v.status} {v.kind} {v.seconds:.2f}s {v.message or ''}\n{v.detail}".rstrip())
        return 1 if any(v.failed for v in verdicts) else 0
    chosen = [n.strip() for n in args.targets.split(",") if n.strip()] or list(targets)
    unknown = [n for n in chosen if n not in targets]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(targets)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    lane = Lane(in_process=False, child_every=1, cli=True, api_in_child=True)
    for name in chosen:
        print(f"== {name}: {args.seconds:g} s", flush=True)
        r = campaign(targets[name], seconds=args.seconds, seed=args.seed, lane=lane, failures_dir=out,
                     log=lambda m: print("  " + m, flush=True))
        reports.append(r)
        print(r.summary(), flush=True)
        (out / "report.json").write_text(report_json(reports))
    print()
    print(table_rows(reports))
    failed = sum(r.failures for r in reports)
    print(f"\n{sum(r.inputs for r in reports)} inputs, {failed} failures; reproducers in {out}/" if failed else
          f"\n{sum(r.inputs for r in reports)} inputs, no failure")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
