"""One fuzz target per reader of a file a user can hand the toolkit.

A :class:`Target` knows how to write valid seed files of its format (:meth:`Target.seeds`, written by the
tests themselves, never downloaded), how to damage one (:meth:`Target.mutate`, by default the byte or text
mutator of :mod:`..mutate` on one of the case's files), how to read a case with the toolkit's own reader
(:meth:`Target.run`, in Python) and, where a command reads the format, the command line that does
(:meth:`Target.argv`). A case is a folder of files; ``context`` files (a model, a features file) that the
reader needs but that are not under test live in a folder shared by all cases of a campaign.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..mutate import mutate_bytes, mutate_text

Case = Dict[str, bytes]


class Target:
    """The base of every target (see the module docstring)."""

    name = ""
    reader = ""  # what is under test, for the reliability table
    text = False  # the mutable files are text: line / token mutations
    outputs: Sequence[str] = ()  # relative paths a run may create in the case folder
    ok_status: Sequence[int] = (0,)  # exit statuses of a command that mean "a valid result"
    weight = 1.0  # relative cost: the quick lane runs fewer inputs of an expensive target

    def __init__(self) -> None:
        self.context: Optional[Path] = None

    # -------------------------------------------------------------------- what the campaign calls
    def prepare(self, context: Path) -> List[Case]:
        """Write the context files into ``context`` (once per campaign) and return the seeds."""
        self.context = context
        context.mkdir(parents=True, exist_ok=True)
        return self.seeds(context)

    def seeds(self, context: Path) -> List[Case]:
        raise NotImplementedError  # every target defines its seeds

    def choose_seed(self, rng: random.Random, seeds: Sequence[Case]) -> int:
        """The index of the seed the next input is made from (default: any, equally often)."""
        return rng.randrange(len(seeds))

    def mutable(self, case: Case) -> List[str]:
        """The files of a case the mutator may change (default: all of them)."""
        return sorted(case)

    def mutate(self, rng: random.Random, case: Case, seeds: Sequence[Case]) -> Case:
        out = dict(case)
        name = rng.choice(self.mutable(case))
        others = [s[name] for s in seeds if name in s and s[name] != case[name]]
        out[name] = (mutate_text if self.text else mutate_bytes)(rng, case[name], others)
        return out

    def run(self, case: Path) -> Any:
        """Read the case with the toolkit's reader; return what it returns (ToolkitError to refuse)."""
        raise NotImplementedError  # every target defines its reader

    def check(self, result: Any, case: Path) -> Optional[str]:
        """Why a returned result is not a valid one (None: it is)."""
        return None

    def argv(self, case: Path) -> Optional[List[str]]:
        """The command line reading the case (run in ``case``), or None when no cheap command reads it."""
        return None

    def names(self, case: Path) -> List[str]:
        """Names an error message may use to name the file: the case's files and folder, the context files."""
        out = [case.name] + [p.name for p in case.rglob("*")]
        if self.context is not None:
            out += [p.name for p in self.context.iterdir()]
        return [n for n in out if n]

    def allowed_outputs(self, case: Path, sandbox: Path) -> List[str]:
        rel = case.relative_to(sandbox)
        return [str(rel / o) for o in self.outputs]


def all_targets() -> Dict[str, Target]:
    """Every target by name (the modules are imported here, so listing them costs the imports once)."""
    from . import images, lists, models, packs

    found: Dict[str, Target] = {}
    for module in (lists, packs, images, models):
        for cls in module.TARGETS:
            t = cls()
            found[t.name] = t
    return found


__all__ = ["Case", "Target", "all_targets"]
