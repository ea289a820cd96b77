"""Name -> detector class. ``@register`` refuses duplicates; ``build`` names the known ones."""

from __future__ import annotations

from typing import Any, TypeVar

from poisonguard.detectors.base import Detector

_REGISTRY: dict[str, type[Detector]] = {}
D = TypeVar("D", bound=type[Detector])


def register(cls: D) -> D:
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a string class attribute 'name'")
    if not getattr(cls, "description", ""):
        raise TypeError(f"{cls.__name__} needs a 'description' (what it catches, paper, limits)")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"detector name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Detector]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known detectors: {', '.join(sorted(_REGISTRY))}") from None


def build(name: str, **params: Any) -> Detector:
    return get(name)(**params)


def registered() -> dict[str, type[Detector]]:
    _load_builtins()
    return dict(_REGISTRY)


def _load_builtins() -> None:
    # importing the package imports every built-in detector module, which registers itself
    import poisonguard.detectors  # noqa: F401
