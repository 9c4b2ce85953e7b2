"""Normalization layers, one module per family, all with one constructor style and ``forward(x, context=None)``."""
from __future__ import annotations

from .adaptive import AdaptiveContextNorm
from .base import (VALIDATE_MODES, NonFiniteError, NormBase, RunningStatsNorm, check_deferred, clear_nonfinite,
                   nonfinite_count)
from .batch import BatchNorm, GroupNorm, LayerNorm
from .context import ContextNorm, ContextNormEmbed, ContextNormX
from .mixture import MixtureNorm
from .mode import ModeNorm

LAYERS: tuple[type[NormBase], ...] = (BatchNorm, LayerNorm, GroupNorm, MixtureNorm, ModeNorm, ContextNorm,
                                      ContextNormX, ContextNormEmbed, AdaptiveContextNorm)

#: canonical name -> class
NORMS: dict[str, type[NormBase]] = {cls.names[0]: cls for cls in LAYERS}
#: every accepted name (the papers' names and the authors' code names included) -> canonical name
ALIASES: dict[str, str] = {alias: cls.names[0] for cls in LAYERS for alias in cls.names}


def resolve_name(name: str) -> str:
    """Canonical registry name for ``name`` (case-insensitive, '_' same as '-')."""
    if not isinstance(name, str):
        raise TypeError(f"norm name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in ALIASES:
        raise ValueError(f"unknown norm {name!r}; choose one of {sorted(ALIASES)}")
    return ALIASES[key]


def accepted_kwargs(cls: type[NormBase]) -> set[str]:
    """Keyword arguments a layer class accepts (following ``**kw`` up its base classes)."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def build_norm(name: str, num_features: int, **kwargs) -> NormBase:
    """Build a layer by name: ``build_norm("ucb", 64, num_components=3)``.

    Keywords a layer does not take (e.g. ``num_contexts`` for BatchNorm) raise ``TypeError`` naming them.
    """
    cls = NORMS[resolve_name(name)]
    try:
        return cls(num_features, **kwargs)
    except TypeError as err:
        raise TypeError(f"{cls.__name__} ({cls.names[0]!r}): {err}") from None


__all__ = ["NORMS", "ALIASES", "LAYERS", "build_norm", "resolve_name", "accepted_kwargs", "check_deferred",
           "VALIDATE_MODES", "NormBase", "RunningStatsNorm", "BatchNorm", "LayerNorm",
           "GroupNorm", "MixtureNorm", "ModeNorm", "ContextNorm", "ContextNormX", "ContextNormEmbed",
           "AdaptiveContextNorm", "NonFiniteError", "nonfinite_count", "clear_nonfinite"]
