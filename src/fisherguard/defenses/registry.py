"""Defenses by name: every ``Defense`` subclass with a ``name`` in this package is registered."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from fisherguard.defenses.base import Defense, DefenseConfigError, constructor_params

_REGISTRY: dict[str, type[Defense]] = {}


def _discover() -> dict[str, type[Defense]]:
    if not _REGISTRY:
        import fisherguard.defenses as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name not in ("base", "registry"):
                importlib.import_module(f"fisherguard.defenses.{mod.name}")
        stack = list(Defense.__subclasses__())
        while stack:
            cls = stack.pop()
            stack.extend(cls.__subclasses__())
            if cls.name:
                if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
                    raise RuntimeError(f"two defenses are named {cls.name!r}")
                _REGISTRY[cls.name] = cls
    return _REGISTRY


def available() -> dict[str, type[Defense]]:
    """Name → class, sorted by name."""
    return dict(sorted(_discover().items()))


def get(name: str) -> type[Defense]:
    reg = _discover()
    if name not in reg:
        raise DefenseConfigError(f"unknown defense {name!r}; available: {', '.join(sorted(reg))}")
    return reg[name]


def build(name: str, options: dict[str, Any] | None = None) -> Defense:
    """Instantiate a defense by name; an unknown option is an error naming the allowed ones."""
    cls = get(name)
    options = dict(options or {})
    allowed = constructor_params(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DefenseConfigError(f"defense {name!r} has no option {', '.join(map(repr, unknown))}; "
                                 f"allowed: {', '.join(allowed) or '(none)'}")
    return cls(**options)
