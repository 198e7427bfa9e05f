"""Model families. Each module registers one `Backend`; a new family is a new file here."""

from __future__ import annotations

import importlib
import pkgutil

from app.inference.backends.base import BACKENDS, Backend, ModelSpec, register_backend

__all__ = ["BACKENDS", "Backend", "ModelSpec", "backend_class", "register_backend"]


def _discover() -> None:
    """Import every module here; heavy libraries are imported inside `load`, so this is cheap."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def backend_class(family: str) -> type[Backend]:
    if family not in BACKENDS:
        _discover()
    try:
        return BACKENDS[family]
    except KeyError:
        raise ValueError(f"unknown backend {family!r}; known: {', '.join(sorted(BACKENDS))}") from None
