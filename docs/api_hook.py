"""MkDocs hook: the API reference pages, generated from the source tree at build time.

Why generated: the reference must list every public module of ``sphereface_plus``, ``data_prep`` and
``eval`` and follow renames without anyone editing a page. The hook walks the three packages on disk
(no import: griffe reads the sources statically), writes one page per module (``api/<module>.md`` holding
``::: <module>``) and one index per package that lists the names the package exports at its top level
(read with ``ast`` from its ``_EXPORTS`` table or its ``__all__``), each linked to the object's entry.
The pages go into the ``API reference`` section of ``nav`` (the ``api/index.md`` entry is the anchor).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Tuple

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sphereface_plus", "data_prep", "eval")
NAV_TITLE = "API reference"


def _modules(package: str) -> List[str]:
    """Dotted names of the package and its public modules, sorted (private ``_x`` and ``__main__`` skipped)."""
    names = []
    base = ROOT / package
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or "__pycache__" in parts:
            continue
        names.append(".".join(parts))
    return sorted(set(names), key=lambda n: (n.count(".") > 0, n))


def _summary(module: str) -> str:
    """First line of a module's docstring (empty when it has none)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _exports(package: str) -> List[Tuple[str, str]]:
    """``(name, defining module)`` for the names a package exports at its top level."""
    init = ROOT / package / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    assigned = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned[target.id] = node.value
    if "_EXPORTS" in assigned:  # the lazy-export table: name -> defining module
        table: Dict[str, str] = ast.literal_eval(assigned["_EXPORTS"])
        return sorted(table.items())
    if "__all__" in assigned:  # a literal __all__: the names are defined in (or imported into) the package
        try:
            return sorted((name, package) for name in ast.literal_eval(assigned["__all__"]))
        except ValueError:
            pass
    # fail the build rather than publish an index without the package's public names
    raise RuntimeError(f"{init}: no _EXPORTS table and no literal __all__; teach docs/api_hook.py where the "
                       f"package's public names are listed")


def _module_page(module: str) -> str:
    return (
        f"# `{module}`\n\n"
        f"::: {module}\n"
        "    options:\n"
        "      show_root_heading: false\n"
        "      show_root_toc_entry: false\n"
    )


def _package_index(package: str) -> str:
    lines = [f"# `{package}`", ""]
    summary = _summary(package)
    if summary:
        lines += [summary, ""]
    exports = _exports(package)
    if exports:
        lines += [
            f"Names importable from the top of the package (`from {package} import ...`), resolved on first "
            "use; each links to its documentation in the module that defines it.",
            "",
            "| name | defined in |",
            "| --- | --- |",
        ]
        for name, module in exports:
            lines.append(f"| [`{name}`][{module}.{name}] | [`{module}`]({module}.md) |")
        lines.append("")
    lines += ["## Modules", "", "| module | what it holds |", "| --- | --- |"]
    for module in _modules(package):
        lines.append(f"| [`{module}`]({module}.md) | {_summary(module).replace('|', '/')} |")
    lines.append("")
    return "\n".join(lines)


def _pages() -> Dict[str, str]:
    pages = {}
    for package in PACKAGES:
        pages[f"api/{package}-index.md"] = _package_index(package)
        for module in _modules(package):
            pages[f"api/{module}.md"] = _module_page(module)
    return pages


def on_config(config, **kwargs):
    """Replace the ``api/index.md`` nav entry's section with the index plus one sub-section per package."""
    section = ["api/index.md"]
    for package in PACKAGES:
        section.append({package: [f"api/{package}-index.md"] + [f"api/{m}.md" for m in _modules(package)]})
    nav = config.get("nav") or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and NAV_TITLE in entry:
            nav[i] = {NAV_TITLE: section}
    return config


def on_files(files, config, **kwargs):
    for uri, content in _pages().items():
        files.append(File.generated(config, uri, content=content))
    return files
