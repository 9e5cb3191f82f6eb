"""The floors of the code: each package imports only what stands below it, and only the commands parse a
command line (docs/interfaces.md#layering).

    sphereface_plus (the library)  <  data_prep  <  eval  <  sphereface_plus.commands (+ cli.py, __main__.py)

An AST scan of every import statement at any depth (module level, inside functions, classes, ``if``
and ``try`` blocks), including relative imports, ``importlib.import_module("...")`` and
``__import__("...")`` with a literal name, over every file of the three packages, discovered (not listed), so
a new module or package is scanned from the day it is added. The entry points (``sphereface_plus/commands``,
``sphereface_plus/cli.py``, ``sphereface_plus/__main__.py`` and the old alias ``sphereface_plus/apps``) may
import anything.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sphereface_plus"
#: the top floor: the one place that parses command lines and wires the packages together
ENTRY_POINTS = (PKG / "commands", PKG / "cli.py", PKG / "__main__.py", PKG / "apps")
COMMAND_MODULES = ("sphereface_plus.commands", "sphereface_plus.cli", "sphereface_plus.apps")
#: package -> the module prefixes it may not import (everything on a higher floor)
FORBIDDEN: Dict[str, Tuple[str, ...]] = {
    "sphereface_plus": ("data_prep", "eval") + COMMAND_MODULES,
    "data_prep": ("eval",) + COMMAND_MODULES,
    "eval": COMMAND_MODULES,
}


def _is_entry_point(p: Path) -> bool:
    return any(p == r or r in p.parents for r in ENTRY_POINTS)


def library_files() -> List[Path]:
    """Every Python file of ``sphereface_plus/``, ``data_prep/`` and ``eval/`` except the entry points."""
    found = []
    for package in FORBIDDEN:
        found += [p for p in (REPO / package).rglob("*.py") if not _is_entry_point(p) and "__pycache__" not in p.parts]
    return sorted(found)


LIBRARY = library_files()


def imported_modules(source: str, module: str) -> Iterator[Tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source`` (of module ``module``)."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from sphereface_plus import x` where x could be a module
                yield node.lineno, f"{name}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def _forbidden(name: str, package: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])


def violations(source: str, module: str) -> List[str]:
    package = module.split(".")[0]
    return [f"line {line}: {name}" for line, name in imported_modules(source, module) if _forbidden(name, package)]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", LIBRARY, ids=[str(p.relative_to(REPO)) for p in LIBRARY])
def test_no_import_from_a_higher_floor(path):
    bad = violations(path.read_text(encoding="utf-8"), _module_name(path))
    assert not bad, f"{path.relative_to(REPO)} imports from a higher floor: {bad}"


@pytest.mark.parametrize("path", LIBRARY, ids=[str(p.relative_to(REPO)) for p in LIBRARY])
def test_only_the_commands_parse_a_command_line(path):
    names = [n for _, n in imported_modules(path.read_text(encoding="utf-8"), _module_name(path))]
    assert "argparse" not in names, f"{path.relative_to(REPO)} imports argparse: its options belong in sphereface_plus/commands/"


@pytest.mark.parametrize("snippet", [
    "import data_prep",
    "import eval.lfw as L",
    "from data_prep.training_set import build_train_dataset",
    "def f():\n    from eval.features import extract_features\n",
    "class A:\n    def m(self):\n        if True:\n            import data_prep.geometry\n",
    "try:\n    pass\nexcept Exception:\n    from eval import verification_metrics\n",
    "import importlib\ndef f():\n    return importlib.import_module('eval.lfw')\n",
    "def f():\n    return __import__('data_prep')\n",
    "from sphereface_plus.commands.train import train",
    "from sphereface_plus import cli",
])
def test_the_scan_finds_imports_at_any_depth(snippet):
    assert violations(snippet, "sphereface_plus.engine.x"), snippet


@pytest.mark.parametrize("module,snippet", [
    ("data_prep.x", "from eval.features import load_embedding_model"),
    ("data_prep.x", "from sphereface_plus.commands import align"),
    ("eval.x", "from sphereface_plus.commands.options import add_precision_argument"),
])
def test_each_floor_is_held(module, snippet):
    assert violations(snippet, module), snippet


@pytest.mark.parametrize("module,snippet", [
    ("sphereface_plus.engine.x", "import evaluate"),
    ("sphereface_plus.engine.x", "from sphereface_plus.engine import run_log"),
    ("sphereface_plus.engine.x", "import numpy as np\nx = np.eval"),
    ("sphereface_plus.engine.x", "from sphereface_plus.commandsx import y"),
    ("data_prep.x", "from sphereface_plus.models import create_backbone"),
    ("eval.x", "from data_prep.geometry import align_face"),
])
def test_the_scan_has_no_false_alarms(module, snippet):
    assert not violations(snippet, module), snippet


def test_relative_imports_are_resolved():
    # `from .. import x` inside sphereface_plus/engine/foo.py is sphereface_plus.x: allowed
    assert [n for _, n in imported_modules("from .. import config", "sphereface_plus.engine.foo")][0] == "sphereface_plus"


def test_discovery_covers_every_package_and_leaves_out_only_the_entry_points():
    found = {p.relative_to(REPO).parts[:2] for p in LIBRARY}
    for package in FORBIDDEN:
        subpackages = {(package, d.name) for d in (REPO / package).iterdir()
                       if d.is_dir() and (d / "__init__.py").is_file() and not _is_entry_point(d)}
        assert subpackages <= found, f"packages not scanned: {sorted(subpackages - found)}"
    assert not any(_is_entry_point(p) for p in LIBRARY)
    assert PKG / "cli.py" not in LIBRARY and PKG / "config.py" in LIBRARY and REPO / "eval" / "lfw.py" in LIBRARY
