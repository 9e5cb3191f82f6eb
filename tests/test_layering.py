"""The library never imports the runners' worlds: ``data_prep`` and ``eval`` (issue 9).

An AST scan of every import statement at any depth (module level, inside functions, classes, ``if``
and ``try`` blocks), including relative imports, ``importlib.import_module("...")`` and
``__import__("...")`` with a literal name. The library: the models, heads, MHE, engine, config, the
face Trainer module, utils, errors, registry, safe_pickle, losses and the package ``__init__``.
The command runners (``sphereface_plus/apps``, ``sphereface_plus/cli.py``) may import anything.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sphereface_plus"
FORBIDDEN = ("data_prep", "eval")
LIBRARY = sorted(
    [p for d in ("models", "heads", "engine", "mhe") for p in (PKG / d).rglob("*.py")]
    + [PKG / f for f in ("config.py", "trainer.py", "utils.py", "errors.py", "registry.py",
                         "safe_pickle.py", "losses.py", "__init__.py")]
)


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


def violations(source: str, module: str) -> List[str]:
    return [f"line {line}: {name}" for line, name in imported_modules(source, module)
            if name.split(".")[0] in FORBIDDEN]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", LIBRARY, ids=[str(p.relative_to(REPO)) for p in LIBRARY])
def test_library_imports_neither_data_prep_nor_eval(path):
    assert path.is_file(), f"{path} is listed as library code but does not exist"
    bad = violations(path.read_text(encoding="utf-8"), _module_name(path))
    assert not bad, f"{path.relative_to(REPO)} imports the runners' packages: {bad}"


@pytest.mark.parametrize("snippet", [
    "import data_prep",
    "import eval.lfw as L",
    "from data_prep.datasets import build_train_dataset",
    "def f():\n    from eval.features import extract_features\n",
    "class A:\n    def m(self):\n        if True:\n            import data_prep.geometry\n",
    "try:\n    pass\nexcept Exception:\n    from eval import metrics\n",
    "import importlib\ndef f():\n    return importlib.import_module('eval.lfw')\n",
    "def f():\n    return __import__('data_prep')\n",
])
def test_the_scan_finds_imports_at_any_depth(snippet):
    assert violations(snippet, "sphereface_plus.engine.x"), snippet


@pytest.mark.parametrize("snippet", ["import evaluate", "from sphereface_plus.engine import metrics",
                                     "import numpy as np\nx = np.eval"])
def test_the_scan_has_no_false_alarms(snippet):
    assert not violations(snippet, "sphereface_plus.engine.x"), snippet


def test_relative_imports_are_resolved():
    # `from .. import x` inside sphereface_plus/engine/foo.py is sphereface_plus.x: allowed
    assert [n for _, n in imported_modules("from .. import config", "sphereface_plus.engine.foo")][0] == "sphereface_plus"
