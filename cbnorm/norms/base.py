"""Shared pieces of every normalization layer: shape handling, argument checks, running statistics.

Layouts
-------
* channels-first ``x`` of shape (N, C, *spatial) — images (N, C, H, W), sequences (N, C, L), vectors (N, C);
* tokens ``x`` of shape (N, L, D) with ``channel_last=True`` — ViT patches, normalized over D features.

Every layer works on the canonical view ``(N, C, P)`` where ``P`` is the number of positions per sample
(H*W, L, or 1); statistics are computed in float32 (or float64 when the input is float64) with autocast
disabled, and the output is cast back to the input dtype and memory format.

Two bases, as ``torch.nn.modules.batchnorm._NormBase`` is for torch's layers:

* ``NormBase``: shapes, dtype, argument checks, context ids, ``reset_parameters()`` (affine weight to ones,
  bias to zeros, and each layer's own learned parameters) and versioned state-dict loading;
* ``RunningStatsNorm(NormBase)``: layers with running statistics (BatchNorm, MN's queue, ModeNorm, CN, ACN's
  moving average). It owns ``num_batches_tracked``, ``momentum`` and the one running-average step,
  following ``torch.nn.BatchNorm2d``: ``momentum`` is the weight of the new batch (0.1 by default;
  PyTorch's convention, not Keras' 0.99), ``momentum=None`` means a cumulative average (1 / count, from a
  tensor count: no host sync), running variances are unbiased; and ``reset_running_stats()``.
  Layers without running statistics (LayerNorm, GroupNorm, CN-X, the CN embedder) take no ``momentum``.

Checks on values, without a host synchronisation by default
----------------------------------------------------------
Two checks look at tensor *values*: a training minibatch whose statistics are not finite (NaN/inf input, or
|x| > ~1e19 whose squares overflow float32) must never reach the running buffers, and context ids must lie in
[0, K). Reading a value back to the host stalls an accelerator and breaks ``torch.compile(fullgraph=True)``,
so each layer with such checks takes ``validate``:

* ``"now"``: read on the host in the call and raise ``ValueError`` there, before any buffer changes;
* ``"deferred"``: nothing is read. Statistics that are not finite leave every running buffer (and
  ``num_batches_tracked``, MN's queue) unchanged through ``torch.where``; out-of-range ids are mapped to a
  sentinel that gives NaN output for those samples (never another context's transform) and a call with one
  changes no state. Both are counted on the device in the non-persistent buffer ``deferred_errors``
  (non-finite batches, bad-id calls, and the last bad min / max id); ``check_deferred(model)`` reads every
  layer's counts in one transfer and raises the same ``ValueError`` the immediate check gives. The trainer
  calls it at each evaluation, snapshot and epoch end, before anything is saved;
* ``"auto"`` (default): ``"now"`` for tensors in host memory outside ``torch.compile`` (reading them stalls
  nothing), ``"deferred"`` on an accelerator and while compiling.

Cumulative averages (``momentum=None``) take their factor 1 / count from a tensor count. No other value is
read back in any layer's forward or backward (tests: fullgraph compilation of every layer in train and eval, a
dispatch-level detector of host reads on CPU, ``torch.cuda.set_sync_debug_mode("error")`` on CUDA).
"""
from __future__ import annotations

import math
import threading
from contextvars import ContextVar
from typing import ClassVar, Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["NormBase", "RunningStatsNorm", "ema_update", "stat_dtype", "check_positive_int", "ROUTED_CONTEXTS",
           "NonFiniteError", "nonfinite_count", "clear_nonfinite", "DataInitialized",
           "VALIDATE_MODES", "check_deferred"]

#: ``validate=`` values (module docstring)
VALIDATE_MODES = ("auto", "now", "deferred")
#: slots of ``deferred_errors``: non-finite training batches, calls with out-of-range ids, last bad min / max id
_NONFINITE, _BAD_IDS, _BAD_MIN, _BAD_MAX = range(4)

class _RoutedContexts:
    """Context ids routed to context layers for the duration of one call (``cbnorm.convert.route_contexts``):
    id(layer) -> ids (N,). ``get`` / ``set`` / ``reset`` as a ``ContextVar`` (which holds the mapping, so threads
    and asyncio tasks never see each other's ids, and it is restored when the call ends or raises), plus
    ``active``, the number of routings in progress in the process: a layer called with ``context=None`` looks
    the ids up only while one is, so torch.compile (which cannot trace ``ContextVar.get``) guards on a plain
    int and traces the layer whole whenever nothing is routed."""

    def __init__(self) -> None:
        self._var: ContextVar[Mapping[int, object]] = ContextVar("cbnorm_routed_contexts", default={})
        self._lock = threading.Lock()
        self.active = 0

    def get(self) -> Mapping[int, object]:
        return self._var.get()

    def set(self, value: Mapping[int, object]):
        with self._lock:
            self.active += 1
        return self._var.set(value)

    def reset(self, token) -> None:
        self._var.reset(token)
        with self._lock:
            self.active -= 1


#: the routed ids (``_RoutedContexts``)
ROUTED_CONTEXTS = _RoutedContexts()


@torch.compiler.disable  # ContextVar.get cannot be traced: eager, and only while a routing is active
def _routed_context(layer: nn.Module):
    return ROUTED_CONTEXTS.get().get(id(layer))

def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics dtype: float64 for float64 input, float32 otherwise (float16/bfloat16 are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@torch.no_grad()
def ema_update(running: Tensor, new: Tensor, factor: Tensor | float, mask: Optional[Tensor] = None) -> None:
    """In place: ``running <- (1 - factor) * running + factor * new`` (BatchNorm eq. 3, PyTorch convention).

    ``mask`` (broadcastable to ``running``) selects the entries that are updated; the others keep their
    value. Uses ``copy_`` on the whole buffer, never an assignment into an indexed view.
    """
    _ema(running, new, factor, mask)


def _ema(running: Tensor, new: Tensor, factor: Tensor | float, mask: Optional[Tensor]) -> None:
    """``ema_update`` without its no_grad (callers hold one); in-place ``lerp_`` when nothing is masked."""
    if new.dtype != running.dtype:
        new = new.to(running.dtype)
    if not isinstance(factor, float) and factor.dtype != running.dtype:
        factor = factor.to(running.dtype)
    if mask is None:
        running.lerp_(new, factor)
    else:
        running.copy_(torch.where(mask, torch.lerp(running, new, factor), running))


class NormBase(nn.Module):
    """Base class of every cbnorm layer: one constructor style, one ``forward(x, context=None)``.

    Subclasses implement ``_normalize(x3, context)`` on the canonical view ``x3`` of shape (N, C, P) in the
    statistics dtype and return a tensor of the same shape (affine included); layers with learned parameters
    besides the affine reset them in ``_reset_extra_parameters``; layers whose state dict changed between
    versions fill / drop keys in ``upgrade_state_dict``.
    """

    #: whether ``forward`` takes (and, in train mode, requires) per-sample context ids
    uses_context: ClassVar[bool] = False
    #: whether the layer has a mixture / per-context Gaussians to show (``mixture_parameters()``)
    has_mixture: ClassVar[bool] = False
    #: the most layers of this kind measured to train stacked in any network, None = no limit found. ACN with
    #: update="weight" and CN-X normalize with statistics learned as weights, which do not follow the scale of
    #: their input as the layers before them train: in every norm of a width-64 ResNet-18 they diverge
    #: (README, "Depth"); ``convert`` warns past the limit
    max_stacked: Optional[int] = None
    #: whether the constructor takes ``momentum`` (running averages with BatchNorm's convention)
    takes_momentum: ClassVar[bool] = False
    #: registry names, first one canonical
    names: ClassVar[tuple[str, ...]] = ()
    #: state-dict format (saved in its metadata, as torch's layers do). 1 (no version): every layer had
    #: num_batches_tracked, MN's queue had no fit buffers, CN no per-context counts, ACN no data_initialized.
    _version: ClassVar[int] = 2

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True,
                 channel_last: bool = False, validate: str = "auto") -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")
        self.eps = float(eps)
        self.affine = bool(affine)
        self.channel_last = bool(channel_last)
        if validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
        self.validate = validate
        # counts of the checks deferred on the device (module docstring); not saved with the weights
        self.register_buffer("deferred_errors", torch.zeros(4, dtype=torch.long), persistent=False)

    def _defers(self, t: Tensor) -> bool:
        """Whether the value checks on ``t`` are deferred (device-side) rather than read on the host now."""
        if self.validate == "auto":
            return t.device.type != "cpu" or torch.compiler.is_compiling()
        return self.validate == "deferred"

    def check_deferred(self) -> None:
        """Raise the ``ValueError`` of any check deferred since the last call (``check_deferred(self)``)."""
        check_deferred(self)

    # ------------------------------------------------------------------ shapes
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if self.channel_last:
            if x.dim() != 3:
                raise ValueError(
                    f"x must be (N, L, D) with channel_last=True, got shape {tuple(x.shape)}")
            c = x.shape[-1]
        else:
            if x.dim() < 2:
                raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
            c = x.shape[1]
        if c != self.num_features:
            axis = "last (D)" if self.channel_last else "channel (dim 1)"
            raise ValueError(
                f"x has {c} features on its {axis} axis but the layer has num_features={self.num_features}")
        if x.shape[0] == 0:
            raise ValueError("x has an empty batch (N=0)")
        if x.numel() == 0:
            raise ValueError(f"x has no elements, shape {tuple(x.shape)}")

    def _to_ncp(self, x: Tensor) -> Tensor:
        """(N, C, *S) or (N, L, D) -> (N, C, P) view (no copy for contiguous channels-first input)."""
        if self.channel_last:
            return x.transpose(1, 2)
        return x.reshape(x.shape[0], x.shape[1], -1) if x.dim() != 3 else x

    def _from_ncp(self, y: Tensor, like: Tensor) -> Tensor:
        if self.channel_last:
            return y.transpose(1, 2)
        y = y.reshape(like.shape)
        if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        elif like.dim() == 5 and not like.is_contiguous() and like.is_contiguous(
                memory_format=torch.channels_last_3d):
            y = y.contiguous(memory_format=torch.channels_last_3d)
        return y

    # ----------------------------------------------------------------- context
    def _check_context(self, x: Tensor, context: Optional[Tensor]) -> Optional[Tensor]:
        if not self.uses_context:
            if context is not None:
                raise ValueError(
                    f"{type(self).__name__} does not take a context; pass context=None "
                    f"(route contexts only to layers with uses_context=True)")
            return None
        if context is None:
            return None
        if not isinstance(context, Tensor):
            try:
                context = torch.as_tensor(context)
            except (RuntimeError, TypeError, ValueError, OverflowError) as err:  # [None, ...], "day", 2**70, ...
                raise TypeError(f"context must be an integer (long) tensor of ids (N,), got "
                                f"{type(context).__name__} that torch cannot read as one ({err})") from None
        if context.is_floating_point() or context.dtype == torch.bool or context.is_complex():
            raise TypeError(f"context must be an integer (long) tensor of ids, got dtype {context.dtype}")
        if context.dim() != 1 or context.shape[0] != x.shape[0]:
            raise ValueError(
                f"context must have shape (N,) = ({x.shape[0]},) matching the batch, got {tuple(context.shape)}")
        k = self.num_contexts  # type: ignore[attr-defined]
        if not self._defers(context):  # ids in host memory: checking them stalls nothing
            if context.numel() and (int(context.min()) < 0 or int(context.max()) >= k):
                raise ValueError(
                    f"context ids must be in [0, {k - 1}] (num_contexts={k}), got min {int(context.min())} "
                    f"and max {int(context.max())}")
            return context.to(device=x.device, dtype=torch.long)
        ids = context.to(device=x.device, dtype=torch.long)
        valid = (ids >= 0) & (ids < k)
        with torch.no_grad():
            bad = ~valid.all()
            e = self.deferred_errors
            self.deferred_errors.copy_(torch.stack([
                e[_NONFINITE], e[_BAD_IDS] + bad.long(), torch.where(bad, ids.min(), e[_BAD_MIN]),
                torch.where(bad, ids.max(), e[_BAD_MAX])]))
        return torch.where(valid, ids, k)  # the sentinel K: NaN output, in no context's statistics

    # ----------------------------------------------------------------- running
    def _refuse_nonfinite(self, *stats: Tensor) -> Optional[Tensor]:
        """Train mode, before any buffer is touched: whether the minibatch statistics are all finite.

        They are not for NaN/inf input and for finite activations so large (|x| > ~1e19 in float32) that their
        squares overflow; updating the running statistics / queue with them would lose all training so far.
        Statistics are checked in the dtype of the layer's buffers (float64 input whose variance does not fit
        the float32 running variance is refused too), on the small statistics after any DDP all-reduce, so
        every rank agrees. With the check done now (``validate``): ``ValueError`` here, and None is returned;
        deferred: a 0-dim bool tensor ``ok`` that the caller passes on as ``valid=`` to every buffer update
        (``_update_running``, MN's queue), and a non-finite batch is counted in ``deferred_errors``."""
        store = self._store_dtype()
        flat = torch.cat([s.detach().reshape(-1) for s in stats]) if len(stats) > 1 else stats[0].detach().reshape(-1)
        ok = torch.isfinite(flat if flat.dtype == store else flat.to(store)).all()
        if not self._defers(ok):
            if not bool(ok):
                raise NonFiniteError(_nonfinite_message(type(self).__name__, store))
            return None
        with torch.no_grad():
            self.deferred_errors[_NONFINITE:_NONFINITE + 1].add_((~ok).long())
        return ok

    def _store_dtype(self) -> torch.dtype:
        """The dtype of the running buffers (the first floating-point one registered)."""
        for name in getattr(self, "_running_fills", ()):
            b = self._buffers[name]
            if b is not None and b.is_floating_point():
                return b.dtype
        return next((b.dtype for b in self.buffers() if b.is_floating_point()), torch.float32)

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:  # noqa: D401
        """Normalize ``x`` (N, C, *spatial) or (N, L, D) with ``channel_last=True``; ``context`` (N,) long."""
        self._check_input(x)
        if context is None and self.uses_context:
            if torch.compiler.is_compiling():  # ids routed for this call (route_contexts), traced as an attribute
                context = getattr(self, "_compiled_route", None)
            elif ROUTED_CONTEXTS.active:  # ids routed for this call, in eager
                context = _routed_context(self)
        context = self._check_context(x, context)
        if self.training and x.shape[0] * (x.numel() // (x.shape[0] * self.num_features)) < 2 \
                and self._needs_batch_statistics():
            raise ValueError(
                f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}")
        dtype = stat_dtype(x)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                y3 = self._normalize(self._to_ncp(x).to(dtype), context)
        else:
            y3 = self._normalize(self._to_ncp(x).to(dtype), context)
        return self._from_ncp(y3.to(x.dtype), x)

    def _needs_batch_statistics(self) -> bool:
        return False

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mixture_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """(weights (K,), means (K, C), variances (K, C)) in activation units; weights sum to 1.

        Only for layers with ``has_mixture``; the others raise ``NotImplementedError`` (test the class
        attribute rather than catching it)."""
        raise NotImplementedError(f"{type(self).__name__} has no mixture (has_mixture=False)")

    def channel_mixture_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """The mixture marginalised to each channel: (weights (K, C), means (K, C), variances (K, C)); every
        column of weights sums to 1. The marginal of a diagonal Gaussian on channel c is N(mu_kc, var_kc), so
        this is ``mixture_parameters()`` with the weights repeated per channel, except for layers whose
        weights differ per channel (MN with ``posterior="channel"``)."""
        w, mean, var = self.mixture_parameters()
        return w[:, None].expand(-1, mean.shape[1]).clone(), mean, var

    # ------------------------------------------------------------------ state
    def reset_parameters(self) -> None:
        """Affine weight to ones and bias to zeros, and the layer's other learned parameters to their
        initial values (``_reset_extra_parameters``)."""
        with torch.no_grad():
            if getattr(self, "weight", None) is not None:
                self.weight.fill_(1.0)
                self.bias.zero_()
            self._reset_extra_parameters()

    def _reset_extra_parameters(self) -> None:
        """Hook: reset the learned parameters besides the affine (gates, learned statistics, embedders)."""

    def refresh_host_state(self) -> None:
        """Hook: recompute host-side flags derived from buffers after the buffers were written in place
        (``cbnorm.runs`` copies a file's tensors into ``state_dict()`` without ``load_state_dict``)."""

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """In place: turn this layer's entries of an older state dict (keys ``prefix + name``) into this
        version's, filling keys added since with the values the old file implies and dropping keys no longer
        used (``load_state_dict`` calls it for files of an older ``_version``; ``cbnorm.runs`` for every
        safetensors file, which carries no version). Keys already present are never changed."""
        key = prefix + "num_batches_tracked"
        if key in state_dict and "num_batches_tracked" not in self._buffers:  # version 1: on every layer
            del state_dict[key]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < self._version:
            self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        momentum = f", momentum={self.momentum}" if self.takes_momentum else ""
        return (f"{self.num_features}, eps={self.eps}{momentum}, affine={self.affine}"
                + (", channel_last=True" if self.channel_last else ""))


class RunningStatsNorm(NormBase):
    """Base of the layers with running statistics, as ``torch.nn.modules.batchnorm._NormBase``.

    Owns ``num_batches_tracked``, ``momentum`` (validated here; a subclass with ``takes_momentum = False``,
    MN, passes ``momentum=None`` and has none), the running-average step (``_update_running``),
    ``reset_running_stats()`` and ``reset_parameters()`` (running statistics first, then the affine and the
    layer's extras). Subclasses register their running buffers with
    ``_register_running(name, shape, fill)`` so that a reset restores them; a buffer that is not a constant
    at initialisation (ACN's random means) is reset in ``_reset_extra_running``.
    """

    takes_momentum = True

    def __init__(self, num_features: int, *, momentum: Optional[float] = 0.1, **kw) -> None:
        super().__init__(num_features, **kw)
        if self.takes_momentum:
            if momentum is not None and not (isinstance(momentum, (int, float))
                                             and not isinstance(momentum, bool) and 0.0 <= momentum <= 1.0):
                raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
            self.momentum = None if momentum is None else float(momentum)
        elif momentum is not None:  # MN: its running state is a queue, not an average
            raise TypeError(f"{type(self).__name__} takes no momentum")
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._running_fills: dict[str, float] = {}

    def _register_running(self, name: str, shape: tuple[int, ...], fill: float,
                          dtype: Optional[torch.dtype] = None) -> None:
        """A running-statistics buffer of ``shape`` filled with ``fill``; ``reset_running_stats`` refills it."""
        self.register_buffer(name, torch.full(shape, fill, dtype=dtype))
        self._running_fills[name] = fill

    @torch.no_grad()
    def _update_running(self, *pairs: tuple[Tensor, Tensor], count: Optional[Tensor] = None,
                        mask: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> None:
        """One training step of the running statistics: ``num_batches_tracked += 1``, then for every
        ``(running, new)`` pair ``running <- (1 - f) running + f new`` (BatchNorm eq. 3), f = momentum, or
        with ``momentum=None`` the cumulative average f = 1 / count, ``count`` a tensor broadcastable to the
        buffers (per-context counts; default ``num_batches_tracked``). ``mask`` selects the entries updated;
        ``valid`` (0-dim bool, from a deferred check) False leaves everything, the count included, unchanged."""
        if valid is None:
            self.num_batches_tracked.add_(1)
        else:
            self.num_batches_tracked.add_(valid.long())
            mask = valid if mask is None else mask & valid
        if not pairs:
            return
        if self.momentum is not None:
            factor: Tensor | float = self.momentum
        else:
            n = self.num_batches_tracked if count is None else count
            factor = torch.reciprocal(n.clamp_min(1).to(pairs[0][0].dtype))
        for running, new in pairs:
            _ema(running, new, factor, mask)

    def reset_running_stats(self) -> None:
        """Running statistics (and ``num_batches_tracked``) back to their values at construction."""
        with torch.no_grad():
            self.num_batches_tracked.zero_()
            for name, fill in self._running_fills.items():
                self.get_buffer(name).fill_(fill)
            self._reset_extra_running()

    def _reset_extra_running(self) -> None:
        """Hook: reset running state that is not a constant fill."""

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        super().reset_parameters()


class NonFiniteError(ValueError):
    """A training minibatch gave a layer non-finite statistics (raised at once, or by ``check_deferred``)."""


#: what a non-finite message adds: what may already be affected, and what to do
NONFINITE_ADVICE = ("; layers that ran before it in the same forward pass (torch's BatchNorm too) may already have "
                    "taken this batch into their running statistics, and with deferred checks the parameters may "
                    "have been stepped since: skip the step and put the buffers back (cbnorm.StepGuard does both, "
                    "as GradScaler skips a step with inf gradients), or restore from the last good checkpoint")


class DataInitialized:
    """Mixin (before the norm base in the bases) of a layer whose learned statistics are set from its first
    training minibatch when ``self.init == "data"`` (ACN's components, CN-X's per-context statistics).

    The saved buffer ``data_initialized`` records that the fit happened, so a loaded or resumed model is never
    re-initialised; the host flag ``_init_checked`` mirrors it (set here from loaded state dicts, so forward
    never reads the buffer back)."""

    def _register_data_init(self) -> None:
        self.register_buffer("data_initialized", torch.tensor(int(self.init != "data"), dtype=torch.long))
        self._init_checked = self.init != "data"

    def _forget_initialisation(self) -> None:
        """With init="data", the next training step fits again."""
        if self.init == "data":
            self.data_initialized.zero_()
            self._init_checked = False

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Files written before ``data_initialized`` existed hold a trained or initialised layer: 1."""
        super().upgrade_state_dict(state_dict, prefix)
        key = prefix + "data_initialized"
        if key not in state_dict and any(k.startswith(prefix) for k in state_dict):
            state_dict[key] = torch.tensor(1, dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "data_initialized")
        if not (isinstance(loaded, Tensor) and loaded.numel() == 1):
            loaded = self.data_initialized
        self._init_checked = self.init != "data" or bool(int(loaded))

    def refresh_host_state(self) -> None:
        self._init_checked = self.init != "data" or bool(int(self.data_initialized))


def _nonfinite_message(name: str, store: torch.dtype, count: int = 0) -> str:
    what = "this minibatch gives" if not count else \
        f"{count} training minibatch{'es' if count > 1 else ''} since the last check gave"
    return (f"{name}: {what} non-finite statistics (NaN or inf in the input, or activations too large for "
            f"{store} statistics, |x| > ~1e19); refusing to update the running statistics with "
            f"{'it' if count <= 1 else 'them'}" + (" (they were left unchanged; validate='deferred' reports this at "
                                                  "check_deferred)" if count else "") + NONFINITE_ADVICE)


def check_deferred(module: nn.Module, *, clear: bool = True) -> None:
    """Raise the ``ValueError`` that the immediate checks would have raised, for every cbnorm layer in
    ``module`` whose checks were deferred (``validate``, module docstring) and found something since the last
    call: non-finite training statistics (the layer's running buffers were left unchanged) or context ids
    out of range. Reads all counters in one transfer per device: call it where the loop synchronises anyway
    (logging, evaluation, before saving). ``clear``: reset the counters that were read."""
    layers = [(name or type(m).__name__, m) for name, m in module.named_modules() if isinstance(m, NormBase)]
    by_device: dict[torch.device, list[tuple[str, NormBase]]] = {}
    for name, m in layers:
        by_device.setdefault(m.deferred_errors.device, []).append((name, m))
    found = []
    for group in by_device.values():
        counts = torch.stack([m.deferred_errors for _, m in group]).cpu().tolist()  # the one read
        for (name, m), (nonfinite, bad_ids, lo, hi) in zip(group, counts):
            if nonfinite or bad_ids:
                found.append((name, m, nonfinite, bad_ids, lo, hi))
                if clear:
                    m.deferred_errors.zero_()
    if not found:
        return
    name, m, nonfinite, bad_ids, lo, hi = found[0]
    if bad_ids:
        k = m.num_contexts  # type: ignore[attr-defined]
        msg = (f"context ids must be in [0, {k - 1}] (num_contexts={k}), got min {lo} and max {hi} "
               f"({bad_ids} call{'s' if bad_ids > 1 else ''} of {type(m).__name__} {name!r} since the last check; "
               f"their samples got NaN output and no state changed)")
    else:
        msg = _nonfinite_message(type(m).__name__, m._store_dtype(), nonfinite) + f" (layer {name!r})"
    if len(found) > 1:
        msg += f"; {len(found) - 1} more layer(s) reported too: " + ", ".join(repr(f[0]) for f in found[1:6])
    raise ValueError(msg) if bad_ids else NonFiniteError(msg)


def nonfinite_count(module: nn.Module) -> Optional[Tensor]:
    """The non-finite training batches counted by the deferred checks of every cbnorm layer in ``module``,
    summed on the device (no host read), or None when it has no cbnorm layer."""
    counts = [m.deferred_errors[_NONFINITE] for m in module.modules() if isinstance(m, NormBase)]
    return torch.stack([c.to(counts[0].device) for c in counts]).sum() if counts else None


def clear_nonfinite(module: nn.Module) -> None:
    """Reset the deferred non-finite counts of every cbnorm layer in ``module`` (a caller that skipped the
    step has dealt with them); counts of out-of-range context ids are kept for ``check_deferred``."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, NormBase):
                m.deferred_errors[_NONFINITE].zero_()


def affine_params(module: nn.Module, shape: tuple[int, ...], enabled: bool) -> None:
    """Register ``weight`` (ones) and ``bias`` (zeros) of ``shape``, or None when not ``enabled``."""
    if enabled:
        module.weight = nn.Parameter(torch.ones(shape))
        module.bias = nn.Parameter(torch.zeros(shape))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def ddp_active() -> bool:
    """Whether a torch.distributed process group with more than one rank is up."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def allreduce_sum(t: Tensor, enabled: bool) -> Tensor:
    """Differentiable sum over DDP ranks (as SyncBatchNorm does) when ``enabled`` and a process group is up.

    Statistics are built from such sums (counts, first moments, centred second moments), so two ranks give
    the statistics one process computes on the joint batch.
    """
    if not enabled or not ddp_active():
        return t
    import warnings

    from torch.distributed.nn.functional import all_reduce  # the differentiable one (SyncBatchNorm's role)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a non-differentiable API
        return all_reduce(t)
