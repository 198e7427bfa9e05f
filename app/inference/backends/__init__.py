"""Model families. Each family is one `Backend` subclass, found through the Python entry-point
group `flask_ai_gateway.backends` (name: the family, value: `module:Class`), so a team adds its
own family from its own package with no edit here; our five are declared the same way in
pyproject.toml. `register_backend` registers a class in-process (tests, notebooks)."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from app.inference.backends.base import BACKENDS, Backend, ModelSpec, register_backend

__all__ = [
    "BACKENDS",
    "ENTRY_POINT_GROUP",
    "Backend",
    "ModelSpec",
    "backend_class",
    "families",
    "register_backend",
]

ENTRY_POINT_GROUP = "flask_ai_gateway.backends"


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(name: str, ep: EntryPoint) -> None:
    """Import one family's module (heavy libraries are imported inside `load`, so this is cheap)."""
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"entry point {name!r} ({ep.value}) is not a Backend subclass")
    if cls.family != name:
        raise TypeError(f"entry point {name!r} ({ep.value}) names family {cls.family!r}")
    register_backend(cls)


def _discover() -> None:
    for name, ep in _entry_points().items():
        if name not in BACKENDS:
            _load(name, ep)


def families() -> list[str]:
    """Every family this process can serve: installed entry points and in-process registrations."""
    return sorted(set(BACKENDS) | set(_entry_points()))


def backend_class(family: str) -> type[Backend]:
    if family not in BACKENDS:
        ep = _entry_points().get(family)
        if ep is not None:
            _load(family, ep)
    try:
        return BACKENDS[family]
    except KeyError:
        raise ValueError(f"unknown backend {family!r}; known: {', '.join(families())}") from None
