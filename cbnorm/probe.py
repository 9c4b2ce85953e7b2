"""Capture activations at named layers on a minibatch (forward hooks): a layer's input, its normalized values
x_hat (before the affine) and its output.

``capture(model, x, layers=[...], context=ids)`` runs ``model(x, context=...)`` once under ``torch.no_grad``
with forward hooks on the requested modules and returns, per layer, the module's input, ``x_hat`` and output
(float32, CPU). The model's mode is not changed: pass a model in eval mode (as ``load_run`` returns it) so
that no running statistic or MN queue is updated; ``capture`` refuses a model in train mode unless
``allow_train=True``, because a training-mode forward pass would mutate a cached, shared model.

x_hat, one mechanism for every normalization layer
--------------------------------------------------
A normalizer aims x_hat, not its output, at N(0, 1): the output is ``gamma * x_hat + beta`` (per channel, or
per context for CN's per-context affine), and gamma, beta move it away on purpose. Every cbnorm layer and
torch's ``BatchNorm*d``, ``SyncBatchNorm``, ``GroupNorm`` and ``LayerNorm`` keep their affine in parameters
named ``weight`` and ``bias`` and skip it when those are None. So x_hat is the same layer called again on
the same input (and the same routed context ids) with ``weight`` and ``bias`` set to None for that call
(:func:`normalized`): for BN, LN, GN, ModeNorm and CN it is (x - mu) / sqrt(var + eps) with the statistics
the call uses; for MN and ACN the posterior-weighted sum of MN eq. 34 (ACN: CB-Norm eq. 6) before gamma, beta,
x_hat = sum_k tau_k(x) / sqrt(pi_k) * (x - mu_k) / sqrt(sigma_k^2 + eps). In train mode (``allow_train``)
the second call starts from the buffers and random state the first one started from, and both are put back
as the first call left them: x_hat uses the minibatch statistics of the call it describes, and the model's
state changes once, as without the probe.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .norms import NormBase

__all__ = ["Capture", "capture", "layer_names", "is_norm_layer", "normalized", "without_affine", "num_features",
           "preserved_state"]

#: torch's own normalization layers whose x_hat the probe computes beside cbnorm's
TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Capture:
    """Activations of one layer: ``input``, ``output`` and, for a normalization layer, ``x_hat`` (the
    normalized values before the affine; None for other modules), each (N, C, *spatial) or (N, L, D),
    float32 on CPU."""

    name: str
    input: Tensor
    output: Tensor
    module: nn.Module
    x_hat: Optional[Tensor] = None


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer whose x_hat the probe computes (cbnorm's or torch's)."""
    return isinstance(module, (NormBase, *TORCH_NORMS))


def num_features(module: nn.Module) -> int:
    """The channels (C, or D for tokens) a normalization layer normalizes."""
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    return int(module.num_features)


def layer_names(model: nn.Module, *, torch_layers: bool = False) -> list[str]:
    """Names of the normalization layers of ``model``, in order of registration: cbnorm layers, and with
    ``torch_layers`` torch's BatchNorm / GroupNorm / LayerNorm too."""
    kinds = (NormBase, *TORCH_NORMS) if torch_layers else (NormBase,)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


@contextlib.contextmanager
def without_affine(module: nn.Module) -> Iterator[None]:
    """Within the block ``module``'s ``weight`` and ``bias`` parameters are None: a normalization layer then
    returns x_hat (module docstring). The parameters are put back when the block ends, normally or not."""
    saved = {k: module._parameters[k] for k in ("weight", "bias") if k in module._parameters}
    try:
        for k in saved:
            module._parameters[k] = None
        yield
    finally:
        module._parameters.update(saved)


def normalized(module: nn.Module, *args, **kwargs) -> Tensor:
    """x_hat of a normalization layer: ``module.forward(*args, **kwargs)`` without its affine (no hooks run).
    In eval mode this changes no state; in train mode it updates the running statistics like a forward call
    (``capture`` puts them back)."""
    if not is_norm_layer(module):
        raise TypeError(f"{type(module).__name__} is not a normalization layer (cbnorm's, or torch's BatchNorm, "
                        f"GroupNorm or LayerNorm): it has no x_hat")
    with without_affine(module):
        return module.forward(*args, **kwargs)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return dict([*module.named_parameters(), *module.named_buffers()])


def _state(module: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter and buffer (non-persistent ones included) of ``module``."""
    return {k: v.detach().clone() for k, v in _tensors(module).items()}


def _put_back(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` back into ``module``'s tensors, and let cbnorm layers recompute their host-side flags
    from the buffers (e.g. whether the first-step data init is still to come)."""
    current = _tensors(module)
    with torch.no_grad():
        for k, v in state.items():
            current[k].copy_(v)
    if isinstance(module, NormBase):
        module.refresh_host_state()


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` may run in train mode: every parameter and buffer of its normalization
    layers and the CPU (and CUDA) random state are put back as they were when the block ends (a recorder's
    train-mode probe must not change training)."""
    norms = [m for m in model.modules() if is_norm_layer(m)]
    saved = [_state(m) for m in norms]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for m, st in zip(norms, saved):
                _put_back(m, st)


@torch.no_grad()
def capture(model: nn.Module, x: Tensor, layers: Optional[Sequence[str]] = None, context: Optional[Tensor] = None,
            *, allow_train: bool = False, x_hat: bool = True, reduce: Optional[Callable] = None,
            result: Optional[dict] = None) -> dict[str, Any]:
    """Run ``model(x, context=context)`` and return {layer name: Capture}.

    ``layers`` defaults to every cbnorm normalization layer; any module may be named (x_hat is computed for
    normalization layers only). ``x_hat=False`` skips it. Unknown names raise ``ValueError`` listing the
    valid ones. ``reduce(name, module, input, x_hat, output)``, when given, receives each layer's tensors on
    the model's device (x_hat None for other modules) and its return value replaces the Capture (a recorder
    keeps a summary instead of float32 copies on the CPU). ``result``, when given, receives the model's
    output under "output".
    """
    if model.training and not allow_train:
        raise ValueError("capture() needs the model in eval mode (a train-mode pass would update its statistics)")
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else layer_names(model)
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; valid: {layer_names(model, torch_layers=True)}")
    found: dict[str, Capture] = {}
    before: dict[str, tuple[dict, Tensor, Optional[Tensor]]] = {}
    hooks = []

    def pre_hook(name: str):
        def hook(module, args, kwargs):
            if module.training:  # the state and random draws the call starts from, for the x_hat call
                cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
                before[name] = (_state(module), torch.get_rng_state(), cuda)
        return hook

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            inp = args[0] if args else None
            if not (isinstance(inp, Tensor) and isinstance(output, Tensor)):
                return
            xh = None
            if x_hat and is_norm_layer(module):
                if name in before:
                    state0, rng0, cuda0 = before.pop(name)
                    after = _state(module)
                    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda0 is not None else []):
                        _put_back(module, state0)
                        torch.set_rng_state(rng0)
                        if cuda0 is not None:
                            torch.cuda.set_rng_state(cuda0)
                        xh = normalized(module, *args, **kwargs)
                    _put_back(module, after)
                else:
                    xh = normalized(module, *args, **kwargs)
            if reduce is not None:
                found[name] = reduce(name, module, inp.detach(), None if xh is None else xh.detach(), output.detach())
                return
            if xh is not None:
                xh = xh.detach().float().cpu()
            found[name] = Capture(name, inp.detach().float().cpu(), output.detach().float().cpu(), module, xh)
        return hook

    try:
        for n in names:
            if x_hat and is_norm_layer(modules[n]):
                hooks.append(modules[n].register_forward_pre_hook(pre_hook(n), with_kwargs=True))
            hooks.append(modules[n].register_forward_hook(make_hook(n), with_kwargs=True))
        device = next(model.parameters()).device
        x = x.to(device)
        if context is not None:
            context = context.to(device)
        out = model(x) if context is None else model(x, context=context)
        if result is not None:
            result["output"] = out
    finally:
        for h in hooks:
            h.remove()
    return found
