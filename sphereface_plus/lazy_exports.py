"""Lazy public names for a package (PEP 562): importing ``sphereface_plus``, ``eval``, ``data_prep`` or
``sphereface_plus.gan`` loads nothing heavy; each public name is imported on first use."""
from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Dict[str, str], namespace: Dict[str, Any]):
    """Module-level ``__getattr__`` and ``__dir__`` for a package whose public names are resolved on
    first use (PEP 562), so importing the package has no side effects and stays cheap.

    ``exports`` maps each public name to the module that defines it; a resolved name is cached in
    ``namespace`` (the package's ``globals()``).
    """
    import importlib

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace.get("__all__", ())) | set(exports))

    return __getattr__, __dir__
