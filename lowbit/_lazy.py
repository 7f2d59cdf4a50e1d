"""Public names of a package resolved on first use (PEP 562 ``__getattr__``).

A package ``__init__`` that names its API here imports nothing heavy itself: ``import
lowbit`` and ``import lowbit.runtime`` never pull in torch, and ``lowbit.export`` is imported
cheaply by ``lowbit/__init__.py`` (see there why).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any],
                                                             Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps each public name to the
    module that defines it (absolute, or relative to ``package``; ``"module:attr"`` where the
    module calls it otherwise). A resolved name is kept in the package's namespace."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = names[name].partition(":")
        value = getattr(importlib.import_module(module, package), attr or name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
