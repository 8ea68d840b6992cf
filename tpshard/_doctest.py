"""Doctest collection for packages whose code lives in submodules.

``doctest.testmod(package)`` only looks at what the package module itself defines; a package
that re-exports its submodules' names sets ``__test__ = doctest_targets(*submodules)`` so that
the examples in those submodules' docstrings run too.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

__all__ = ["doctest_targets"]


def doctest_targets(*modules: types.ModuleType) -> dict[str, Any]:
    """The classes, functions and methods ``modules`` define, keyed by qualified name.

    Example::

        >>> import tpshard.layout as m
        >>> "shard" in doctest_targets(m)
        True
    """
    found: dict[str, Any] = {}
    for module in modules:
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    func = getattr(member, "__func__", member)  # classmethod, staticmethod
                    if inspect.isfunction(func):
                        found[f"{name}.{attr}"] = func
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found[name] = obj
    return found
