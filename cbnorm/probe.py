"""Capture activations at named layers on a minibatch (forward hooks), without touching the model's state.

``capture(model, x, layers=[...], context=ids)`` runs ``model(x, context=...)`` once under ``torch.no_grad``
with forward hooks on the requested modules and returns, per layer, the module's input and output
(float32, CPU). The model's mode is not changed: pass a model in eval mode (as ``load_run`` returns it) so
that no running statistic or MN queue is updated; ``capture`` refuses a model in train mode unless
``allow_train=True``, because a training-mode forward pass would mutate a cached, shared model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Capture", "capture", "layer_names"]


@dataclass
class Capture:
    """Activations of one layer: ``input``/``output`` (N, C, *spatial) or (N, L, D), float32 on CPU."""

    name: str
    input: Tensor
    output: Tensor
    module: nn.Module


def layer_names(model: nn.Module) -> list[str]:
    """Names of the normalization layers of ``model`` (cbnorm layers), in forward order of registration."""
    from .norms import NormBase

    return [n for n, m in model.named_modules() if isinstance(m, NormBase)]


@torch.no_grad()
def capture(model: nn.Module, x: Tensor, layers: Optional[Sequence[str]] = None, context: Optional[Tensor] = None,
            *, allow_train: bool = False) -> dict[str, Capture]:
    """Run ``model(x, context=context)`` and return {layer name: Capture}.

    ``layers`` defaults to every normalization layer. Unknown names raise ``ValueError`` listing the valid ones.
    """
    if model.training and not allow_train:
        raise ValueError("capture() needs the model in eval mode (a train-mode pass would update its statistics)")
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else layer_names(model)
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; valid: {layer_names(model)}")
    found: dict[str, Capture] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module, args, output):
            inp = args[0] if args else None
            if isinstance(inp, Tensor) and isinstance(output, Tensor):
                found[name] = Capture(name, inp.detach().float().cpu(), output.detach().float().cpu(), module)
        return hook

    try:
        for n in names:
            hooks.append(modules[n].register_forward_hook(make_hook(n)))
        device = next(model.parameters()).device
        x = x.to(device)
        if context is not None:
            context = context.to(device)
        model(x, context=context)
    finally:
        for h in hooks:
            h.remove()
    return found
