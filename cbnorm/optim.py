"""Parameter groups for a user's optimizer, as timm's ``param_groups_weight_decay``: weight decay on the weights
of convolutions and linear layers only.

A normalization layer's parameters are not weights to shrink: decay pulls BatchNorm's gamma towards 0, and it
pulls ACN's learned means towards 0 and its log-variances towards 0 (variance 1), whatever the scale of the
activations, so every step moves the components off the data. ``param_groups(model, weight_decay=5e-4)``
returns two groups for ``torch.optim.SGD(param_groups(model, 5e-4), lr=..., momentum=...)``: every parameter
of a normalization layer (cbnorm's and torch's BatchNorm / GroupNorm / LayerNorm: affine, mixture components,
learned statistics, embedders) and every 1-D parameter (biases) with ``weight_decay=0``, the rest with
``weight_decay``.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from .norms import NormBase

__all__ = ["param_groups", "NO_DECAY_MODULES"]

#: modules whose every parameter gets no weight decay
NO_DECAY_MODULES = (NormBase, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, *, no_decay: Iterable[str] = ()) -> list[dict]:
    """[{"params": decayed, "weight_decay": weight_decay}, {"params": not decayed, "weight_decay": 0.0}] over the
    trainable parameters of ``model`` (each once). ``no_decay``: more parameter names (as ``named_parameters``
    gives them) to leave undecayed. Empty groups are left out."""
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    extra = set(no_decay)
    unknown = extra - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_decay names parameters that model does not have: {sorted(unknown)}")
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES):
            skip.update(id(p) for p in module.parameters())
    decay, keep, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (keep if id(p) in skip or p.ndim <= 1 or name in extra else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
