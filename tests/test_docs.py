"""The theory page is the reference the code cites: every cited anchor must exist on it.

Code, configs, tests and pages cite formulas as ``docs/theory.md`` plus ``#`` and an anchor (pages link
``theory.md`` plus an anchor). An anchor exists only where docs/theory.md declares it explicitly as
``{#name}`` after a heading, so that renaming a heading never breaks a citation. The second check: no
reference to an internal spec that does not ship remains (cite a theory anchor or the paper instead).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"
SKIP_DIRS = {".git", ".venv", "site", "__pycache__", "runs", "out", ".cache", ".pytest_cache", "node_modules", "build",
             "dist"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh"}
TEXT_NAMES = {"Makefile", "run"}

HEADING_ANCHOR = re.compile(r"^#{1,6} .*\{#([^}\s]+)\}\s*$", re.M)
# a citation from anywhere in the repository, and a relative link from a page of the site
CITATION = re.compile(r"docs/theory\.md#([A-Za-z0-9_-]+)")
PAGE_LINK = re.compile(r"\]\((?:\./)?theory\.md#([A-Za-z0-9_-]+)\)")
# the internal document cited by name, in any form ("section 4", "sections 3-6", "§5", "(...)", "... order"):
# the upper-case word on its own (an identifier containing it is not a citation); written in pieces so
# that this file does not match itself
UNSHIPPED_DOC = re.compile(r"(?<![A-Za-z0-9_])" + "SP" + "EC" + r"(?![A-Za-z0-9_])")


def repo_text_files():
    """The repository's text files, without walking into the virtual environment, caches or build output."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                yield path


def theory_anchors():
    return HEADING_ANCHOR.findall(THEORY.read_text(encoding="utf-8"))


def test_theory_anchors_are_unique_and_well_formed():
    anchors = theory_anchors()
    assert anchors, "docs/theory.md declares no explicit {#anchor}"
    duplicates = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not duplicates, f"docs/theory.md declares these anchors more than once: {duplicates}"
    bad = [a for a in anchors if not re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", a)]
    assert not bad, f"anchors must be lowercase-with-dashes: {bad}"


def test_every_cited_theory_anchor_exists():
    anchors = set(theory_anchors())
    missing = []
    for path in repo_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        cited = CITATION.findall(text)
        if path.parent == ROOT / "docs" or ROOT / "docs" in path.parents:
            cited += PAGE_LINK.findall(text)
        for anchor in cited:
            if anchor not in anchors:
                line = text[: text.find("#" + anchor)].count("\n") + 1
                missing.append(f"{path.relative_to(ROOT)}:{line}: #{anchor}")
    assert not missing, "theory anchors cited but not declared in docs/theory.md:\n" + "\n".join(missing)


def test_the_anchor_scan_sees_a_citation():
    # the scan is not vacuous: this very line cites an anchor the page declares
    assert "lfw-protocol" in CITATION.findall("see docs/theory.md#lfw-protocol") and "lfw-protocol" in theory_anchors()


def test_no_reference_to_the_internal_spec_remains():
    found = []
    for path in repo_text_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if UNSHIPPED_DOC.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not found, "references to a document that does not ship (cite docs/theory.md anchors instead):\n" + "\n".join(found)


ISSUE_CITATION = re.compile(r"(?<![A-Za-z0-9_/])[Ii]ssues? #?[0-9]+")


def test_no_project_issue_number_is_cited():
    """Code, tests, configs and pages cite docs pages or paper equations, never the project's issue numbers
    (a reader has nowhere to look them up)."""
    found = []
    for path in repo_text_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if ISSUE_CITATION.search(line) and path != Path(__file__).resolve():
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not found, "issue numbers cited (cite a docs page anchor or the paper instead):\n" + "\n".join(found)
    assert ISSUE_CITATION.search("(" + "issue 20" + ")") and not ISSUE_CITATION.search("tissue 3")
