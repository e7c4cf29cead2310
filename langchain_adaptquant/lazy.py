"""Lazy public names (PEP 562): the one ``__getattr__`` body the package and its subpackages share.

A package lists ``name -> submodule`` and its ``__getattr__`` calls :func:`load_export`, so importing
the package stays cheap and a name's submodule (torch, langchain-core, Ray) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping


def load_export(package: str, exports: Mapping[str, str], name: str, namespace: dict[str, Any]) -> Any:
    """Import ``name`` from ``package.<exports[name]>`` and cache it in the package's ``namespace``.

    An unknown name raises AttributeError (not ImportError), so ``from package import submodule``
    still falls back to importing the submodule.
    """
    submodule = exports.get(name)
    if submodule is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
    namespace[name] = value
    return value
