"""A small name -> builder registry, one instance per kind of unit (backbones, heads).

Borrowed habit from timm: each model size is a tiny builder registered by name, and asking for an
unknown name is an error that lists what exists (and the nearest match, for typos).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List

from sphereface_plus.errors import UsageError


class UnknownNameError(UsageError, KeyError):
    """Raised for a name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None):
        """Decorator: register ``fn`` under ``name`` (default: the function's name)."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._builders[key] = fn
            return fn

        return deco

    def names(self) -> List[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: {', '.join(self.names())}"

    def __contains__(self, name: str) -> bool:
        return name in self._builders

