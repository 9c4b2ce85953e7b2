"""Put cbnorm layers into the models researchers already have, and route context ids through them.

``convert(model, norm, include=..., exclude=..., **norm_kwargs)`` follows the field's convention
(``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, timm's ``convert_splitbn_model``): it walks any module
tree and replaces every normalization layer it finds — ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and
any cbnorm layer — by the chosen cbnorm layer, carrying over what the two have in common:

* ``num_features``, ``eps``, ``momentum`` (where the target keeps running statistics), ``affine``,
  ``channel_last`` (cbnorm sources), the device and dtype of the old layer, its training flag;
* the affine weights (copied; a per-context affine (K, C) gets the (C,) weights in every row), with their
  ``requires_grad``;
* the running statistics wherever the target keeps BatchNorm-like ones: cbnorm ``BatchNorm`` takes them as
  they are (so ``convert(model, "bn")`` gives the original model's eval output exactly), ``ModeNorm`` and
  ``ContextNorm`` start every mode / context from them. Mixture layers (MN's queue, ACN's components) start
  from their own initialisation: copying one Gaussian into every component would make them identical.

``norm`` is a registry name (``"mn"``, ``"ucb"``, ...), a cbnorm layer class, a ``functools.partial`` of
one, or any callable ``norm(num_features, **norm_kwargs) -> nn.Module`` (timm's norm-layer convention:
channel count first). Layers are chosen by module path with ``fnmatch`` patterns (``*`` matches dots too):
``include=["layer3.*"]``, ``exclude="transition*"``; a comma in a string separates patterns. A pattern that
matches no normalization layer is an error that lists the layers there are.

Context ids reach context layers (CN, CN-X, CN-embed) of a model whose ``forward`` knows nothing of contexts
through ``ContextModel(model)(x, context=ids)`` or ``with route_contexts(model, ids): model(x)``: the ids are
handed to every context layer inside ``model`` for that call only (a ``contextvars.ContextVar``, restored on
exit and on exceptions; other threads and other models never see them). cbnorm's own models route their
``context`` argument the same way.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .norms import NORMS, BatchNorm, ContextNorm, ModeNorm, NormBase, accepted_kwargs, resolve_name
from .norms.base import ROUTED_CONTEXTS

__all__ = ["convert", "norm_layer_paths", "select_layers", "ContextModel", "route_contexts", "context_layers",
           "CONVERTIBLE"]

#: the layer types ``convert`` replaces (``nn.SyncBatchNorm`` is a ``_BatchNorm`` too), besides cbnorm layers
CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, NormBase)

Patterns = Union[None, str, Sequence[str]]
NormSpec = Union[str, type, Callable[..., nn.Module]]


# ============================================================================ finding layers
def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, CONVERTIBLE) and not isinstance(m, nn.modules.lazy.LazyModuleMixin)


def norm_layer_paths(module: nn.Module) -> list[str]:
    """Module paths of every normalization layer ``convert`` can replace, in registration order ("" is the
    root itself). A layer registered under two paths is listed under both."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return [name for name, m in module.named_modules(remove_duplicate=False) if _is_norm(m)]


def _patterns(value: Patterns, what: str) -> Optional[list[str]]:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in items):
        raise TypeError(f"{what} must be a string or a sequence of strings (fnmatch patterns), got {value!r}")
    out = [p.strip() for p in items if p.strip()]
    if not out:
        raise ValueError(f"{what} holds no pattern: {value!r}")
    return out


def select_layers(module: nn.Module, include: Patterns = None, exclude: Patterns = None) -> list[str]:
    """Paths of the normalization layers of ``module`` matched by ``include`` (all when None) and by no
    ``exclude`` pattern. ``ValueError`` when a pattern matches no normalization layer (naming the layers)."""
    paths = norm_layer_paths(module)
    if not paths:
        raise ValueError(f"{type(module).__name__} has no normalization layer to convert (looked for "
                         f"nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm and cbnorm layers)")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    for what, pats in (("include", inc), ("exclude", exc)):
        for p in pats or ():
            if not any(fnmatchcase(path, p) for path in paths):
                shown = ", ".join(repr(s or "<root>") for s in paths[:40]) + (" ..." if len(paths) > 40 else "")
                raise ValueError(f"{what} pattern {p!r} matches no normalization layer of "
                                 f"{type(module).__name__}; its normalization layers are: {shown}")
    chosen = [p for p in paths if inc is None or any(fnmatchcase(p, q) for q in inc)]
    return [p for p in chosen if not any(fnmatchcase(p, q) for q in exc or ())]


# ============================================================================ building the new layer
def _factory(norm: NormSpec) -> tuple[Callable[..., nn.Module], Optional[set[str]], str]:
    """(callable(num_features, **kw), keywords it accepts or None when unknown, a name for messages)."""
    if isinstance(norm, str):
        cls = NORMS[resolve_name(norm)]
        return cls, accepted_kwargs(cls), cls.names[0]
    if isinstance(norm, type) and issubclass(norm, NormBase):
        return norm, accepted_kwargs(norm), norm.names[0] if norm.names else norm.__name__
    if isinstance(norm, functools.partial) and isinstance(norm.func, type) and issubclass(norm.func, NormBase):
        return norm, accepted_kwargs(norm.func), norm.func.__name__
    if callable(norm):
        try:
            params = inspect.signature(norm).parameters.values()
            if any(p.kind == p.VAR_KEYWORD for p in params):
                names = None
            else:
                names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        except (TypeError, ValueError):
            names = None
        return norm, names, getattr(norm, "__name__", type(norm).__name__)
    raise TypeError(f"norm must be a registry name, a cbnorm layer class, a functools.partial of one or a "
                    f"callable(num_features, **kwargs), got {type(norm).__name__}")


def _carried(old: nn.Module) -> dict[str, Any]:
    """What the old layer says about itself that a new one can take."""
    out: dict[str, Any] = {"eps": float(old.eps), "affine": bool(getattr(old, "affine", True))}
    if isinstance(old, nn.modules.batchnorm._BatchNorm) or hasattr(old, "momentum"):
        out["momentum"] = old.momentum
    if getattr(old, "channel_last", False):
        out["channel_last"] = True
    return out


def _where(old: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    for t in list(old.parameters(recurse=False)) + list(old.buffers(recurse=False)):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in old.buffers(recurse=False):
        return t.device, None
    return None, None


@torch.no_grad()
def _copy_into(dst: Optional[Tensor], src: Optional[Tensor]) -> bool:
    """Copy ``src`` (C,) into ``dst`` of shape (C,) or (R, C) (every row); False when the shapes do not fit."""
    if dst is None or src is None:
        return False
    if dst.shape == src.shape:
        dst.copy_(src)
    elif dst.dim() == 2 and dst.shape[1:] == src.shape:
        dst.copy_(src.unsqueeze(0).expand_as(dst))
    else:
        return False
    return True


def _running_stats(old: nn.Module) -> Optional[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """(running_mean (C,), running_var (C,), num_batches_tracked) of a BatchNorm-like source, else None."""
    mean, var = getattr(old, "running_mean", None), getattr(old, "running_var", None)
    if not isinstance(mean, Tensor) or not isinstance(var, Tensor) or mean.dim() != 1:
        return None
    if isinstance(old, NormBase) and not isinstance(old, BatchNorm):
        return None
    nbt = getattr(old, "num_batches_tracked", None)
    return mean, var, nbt if isinstance(nbt, Tensor) else None


def _replacement(path: str, old: nn.Module, make: Callable[..., nn.Module], accepted: Optional[set[str]],
                 name: str, norm_kwargs: dict) -> nn.Module:
    if isinstance(old, nn.modules.batchnorm._BatchNorm) and not old.track_running_stats:
        raise ValueError(f"layer {path or '<root>'!r} ({type(old).__name__}) has track_running_stats=False: it "
                         f"normalizes with batch statistics in eval too, which no cbnorm layer reproduces; "
                         f"exclude it (exclude=[{path!r}])")
    preset = set(make.keywords) if isinstance(make, functools.partial) else set()
    carried = {k: v for k, v in _carried(old).items() if accepted is not None and k in accepted and k not in preset}
    kwargs = {**carried, **norm_kwargs}
    try:
        new = make(int(old.num_features), **kwargs)
    except TypeError as err:
        raise TypeError(f"cannot build {name} for layer {path or '<root>'!r}: {err}") from None
    if not isinstance(new, nn.Module):
        raise TypeError(f"norm {name} returned {type(new).__name__}, not an nn.Module")
    device, dtype = _where(old)
    if device is not None:
        new = new.to(device=device)
    if dtype is not None:
        new = new.to(dtype=dtype)
    w_old, b_old = getattr(old, "weight", None), getattr(old, "bias", None)
    w_new, b_new = getattr(new, "weight", None), getattr(new, "bias", None)
    for dst, src in ((w_new, w_old), (b_new, b_old)):
        if isinstance(dst, nn.Parameter) and isinstance(src, Tensor) and _copy_into(dst, src):
            dst.requires_grad_(src.requires_grad)
    stats = _running_stats(old)
    if stats is not None and (isinstance(new, (BatchNorm, ModeNorm, ContextNorm))
                              or isinstance(new, nn.modules.batchnorm._BatchNorm)):
        mean, var, nbt = stats
        ok = _copy_into(getattr(new, "running_mean", None), mean)
        ok = _copy_into(getattr(new, "running_var", None), var) and ok
        if ok and nbt is not None:
            with torch.no_grad():  # the count the statistics were averaged over (per context for CN)
                for key in ("num_batches_tracked", "running_batches_tracked"):
                    dst = getattr(new, key, None)
                    if isinstance(dst, Tensor) and dst.dtype == nbt.dtype:
                        dst.copy_(nbt.expand_as(dst))
    new.train(old.training)
    return new


# ============================================================================ convert
def convert(module: nn.Module, norm: NormSpec, *, include: Patterns = None, exclude: Patterns = None,
            return_paths: bool = False, **norm_kwargs):
    """Replace the normalization layers of ``module`` (BatchNorm1d/2d/3d, SyncBatchNorm, cbnorm layers) chosen
    by ``include`` / ``exclude`` (fnmatch patterns on module paths) with ``norm`` built as
    ``norm(num_features, eps=, momentum=, affine=, **norm_kwargs)`` (keywords the target does not take are not
    carried; ``norm_kwargs`` override carried ones and must be accepted by the target).

    Modifies ``module`` in place and returns it (a new layer when ``module`` itself is a normalization layer),
    as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does; with ``return_paths=True`` returns
    ``(module, [replaced paths])``. A layer registered at two paths is replaced by one new layer at both.
    Untouched modules keep their training mode, ``requires_grad`` and hooks; hooks registered on a replaced
    layer belong to the old object and are not carried.
    """
    make, accepted, name = _factory(norm)
    if accepted is not None:
        unknown = sorted(set(norm_kwargs) - accepted)
        if unknown:
            raise TypeError(f"{name} takes no keyword(s) {unknown}; it takes {sorted(accepted)}")
    paths = select_layers(module, include, exclude)
    made: dict[int, nn.Module] = {}
    root = module
    for path in paths:
        old = module.get_submodule(path) if path else module
        if id(old) not in made:
            made[id(old)] = _replacement(path, old, make, accepted, name, norm_kwargs)
        new = made[id(old)]
        if not path:
            root = new
            continue
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, child, new)
    warn_if_too_deep(made.values())
    return (root, paths) if return_paths else root


def warn_if_too_deep(layers) -> None:
    """Warn when more layers of one kind than its ``max_stacked`` (the most measured to train stacked) are
    placed in one network: ACN with update="weight" and CN-X, whose statistics are learned as weights
    (README, "Depth")."""
    layers = list(layers)
    for m in layers:
        limit = getattr(m, "max_stacked", None)
        same = [o for o in layers if type(o) is type(m) and getattr(o, "max_stacked", None) == limit]
        if limit is not None and len(same) > limit:
            warnings.warn(
                f"{len(same)} {type(m).__name__} layers in one network: their statistics are learned as weights "
                f"and do not follow the scale of their input as the layers before them train. In every norm of "
                f"kuangliu's ResNet-18 (width 64) both ACN (update='weight') and CN-X diverge within 3-5 SGD "
                f"steps even with the data init (ACN: also with its components frozen); in every norm of ResNet-20 "
                f"they train (README 'Depth'). Measured to train in any network: up to {limit} (e.g. "
                f"include='layer3.*'). For every layer of a wide network use minibatch statistics: mn, mode, cn, "
                f"or acn with update='moving_average'.", UserWarning, stacklevel=3)
            return


# ============================================================================ context routing
def context_layers(module: nn.Module) -> list[NormBase]:
    """The layers of ``module`` that take context ids (``uses_context``), each once."""
    return [m for m in module.modules() if isinstance(m, NormBase) and m.uses_context]


@contextlib.contextmanager
def route_contexts(module: nn.Module, context: Any) -> Iterator[None]:
    """Within the block, every context layer of ``module`` gets ``context`` (ids (N,)) when called with
    ``context=None``. ``context=None`` routes nothing (layers in eval then use CN+ mixing). The ids are
    forgotten when the block ends, normally or by an exception; nested blocks add to the outer ones.

    Eager calls route through ``ROUTED_CONTEXTS`` (a ``ContextVar``: threads never see each other's ids).
    ``torch.compile`` cannot trace a ``ContextVar``, so while compiling the ids are set as a plain attribute
    ``_compiled_route`` of each context layer for the call and cleared after it: a ``ContextModel`` compiles
    whole (``fullgraph=True``). A compiled model is not meant to be called from several threads at once."""
    if context is None:
        yield
        return
    layers = context_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no context layer (cn, cnx, cn-embed); pass context=None")
    if torch.compiler.is_compiling():
        for m in layers:
            m._compiled_route = context
        try:
            yield
        finally:
            for m in layers:
                m._compiled_route = None
        return
    token = ROUTED_CONTEXTS.set({**ROUTED_CONTEXTS.get(), **{id(m): context for m in layers}})
    try:
        yield
    finally:
        ROUTED_CONTEXTS.reset(token)


class ContextModel(nn.Module):
    """Wraps any model so that ``forward(x, context=None, *args, **kwargs)`` hands ``context`` (N,) long to
    every context layer inside ``model`` for that call only; the wrapped model's ``forward`` needs no context
    argument. State dict keys get the prefix ``model.`` (as DDP's ``module.``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    @property
    def uses_context(self) -> bool:
        return bool(context_layers(self.model))

    def forward(self, x: Any, context: Any = None, *args, **kwargs):
        with route_contexts(self.model, context):
            return self.model(x, *args, **kwargs)
