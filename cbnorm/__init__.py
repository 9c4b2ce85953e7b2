"""cbnorm: multi-mode normalization layers (Mixture, Context, Cluster-based, Mode) for PyTorch.

``import cbnorm``; ``cbnorm.build_norm("acn", 64, num_components=3)``; ``cbnorm.NORMS`` maps names to classes;
``cbnorm.convert(model, "mn", include="layer3.*", num_components=3)`` swaps the norm layers of any model;
``cbnorm.ContextModel(model)(x, context=ids)`` routes context ids through a model that knows nothing of them;
``rec = cbnorm.watch(model, "runs/mine", probe=(x, y), every=100)`` records its normalization layers from any
training loop (``rec.step(step, loss=...)``, ``rec.close()``) into a run directory the app opens.
"""
from __future__ import annotations

from .norms import (ALIASES, LAYERS, NORMS, AdaptiveContextNorm, BatchNorm, ContextNorm, ContextNormEmbed,
                    ContextNormX, GroupNorm, LayerNorm, MixtureNorm, ModeNorm, NonFiniteError, NormBase, build_norm,
                    resolve_name)

from .convert import ContextModel, convert, norm_layer_paths, route_contexts, select_layers
from .guard import StepGuard
from .optim import param_groups

from ._version import __version__

__all__ = ["NORMS", "ALIASES", "LAYERS", "build_norm", "resolve_name", "NormBase", "BatchNorm", "LayerNorm",
           "GroupNorm", "MixtureNorm", "ModeNorm", "ContextNorm", "ContextNormX", "ContextNormEmbed",
           "AdaptiveContextNorm", "convert", "ContextModel", "route_contexts", "norm_layer_paths", "select_layers",
           "NonFiniteError", "StepGuard", "param_groups", "load_run", "watch", "Recorder"]


def __getattr__(name: str):  # lazy: heavy modules load on first use
    if name == "load_run":
        from .runs import load_run

        return load_run
    if name in ("watch", "Recorder"):
        from . import record

        return getattr(record, name)
    raise AttributeError(f"module 'cbnorm' has no attribute {name!r}")
