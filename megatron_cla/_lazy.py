"""Packages whose public names are imported on first use (PEP 562 module ``__getattr__``).

The package root and :mod:`megatron_cla.inference` name classes whose modules import
Megatron-Core; importing them lazily keeps ``import megatron_cla`` (and the ``megatron-cla``
command's start) free of Megatron's import-time notices until a name is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

__all__ = ["lazy_names"]


def lazy_names(
    package: str, namespace: dict[str, Any], exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps each public name to
    the module that defines it; a name is imported on first use and then kept in ``namespace``
    (the package's ``globals()``)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
