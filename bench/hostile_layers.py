"""Hostile-input cases for every layer: layer variants, inputs of any rank, dtype, size and value, context ids,
and the contract check (bench/hostile.py's docstring).
"""
from __future__ import annotations

import copy
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cbnorm  # noqa: E402
from bench.hostile_common import HUGE, ContractViolation  # noqa: E402


# ============================================================================================ layers
K = 3  # components / contexts of the fuzzed layers
#: label -> (registry name, constructor keywords); channel_last variants take (N, L, D) tokens
LAYER_SPECS: dict[str, tuple[str, dict]] = {
    "bn": ("bn", {}), "ln": ("ln", {}), "gn": ("gn", {}), "mn": ("mn", {"num_components": K}),
    "mn-channel": ("mn", {"num_components": 2, "posterior": "channel"}), "mode": ("mode", {"num_components": K}),
    "cn": ("cn", {"num_contexts": K}), "cn-joint": ("cn", {"num_contexts": K, "posterior": "joint"}),
    "cnx": ("cnx", {"num_contexts": K}), "cn-embed": ("cn-embed", {"num_contexts": K}),
    "acn": ("acn", {"num_components": K}), "acn-ma": ("acn", {"num_components": K, "update": "moving_average"}),
    "acn-channel": ("acn", {"num_components": 2, "posterior": "channel"}),
    "bn-tokens": ("bn", {"channel_last": True}), "ln-tokens": ("ln", {"channel_last": True}),
    "cn-tokens": ("cn", {"num_contexts": K, "channel_last": True}),
    "mn-tokens": ("mn", {"num_components": K, "channel_last": True}),
}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
OTHER_DTYPES = ("int64", "int32", "uint8", "bool", "complex64")
SCALES = (0.0, 1e-30, 1e-8, 1.0, 1e4, 6e4, 1e15, 1e30)
CONTEXT_KINDS = ("auto", "none", "valid", "out_of_range", "negative", "wrong_length", "float", "bool", "2d",
                 "list", "ndarray", "str", "none_list")


def build_layer(label: str, c: int, seed: int = 0) -> cbnorm.NormBase:
    name, kw = LAYER_SPECS[label]
    kw = dict(kw)
    if name == "gn":
        kw["num_groups"] = 2 if c % 2 == 0 and c > 2 else 1  # >= 2 channels a group: never one value a group
    torch.manual_seed(seed)
    return cbnorm.build_norm(name, c, **kw)


def warm_up(layer: cbnorm.NormBase, c: int, seed: int = 0, steps: int = 2) -> cbnorm.NormBase:
    """A few finite training batches so running statistics / queues are not at their initial values."""
    g = torch.Generator().manual_seed(seed)
    layer.train()
    for _ in range(steps):
        shape = (12, 5, c) if layer.channel_last else (12, c, 2, 2)
        x = torch.randn(shape, generator=g) * 2 + 1
        layer(x, context=(torch.arange(12) % K) if layer.uses_context else None)
    return layer


def make_layer_input(layer: cbnorm.NormBase, *, rank: int, n: int, c_in: int, dims: tuple[int, ...],
                     dtype: str, scale: float, offset: float, inject: tuple[tuple[str, float], ...] = (),
                     constant: bool = False, x_kind: str = "tensor", context_kind: str = "auto",
                     seed: int = 0) -> tuple[Any, Any]:
    """(x, context) from plain choices (so hypothesis and the seeded bench draw the same space).

    ``rank`` counts all axes; the feature axis is 1 (or the last one for channel_last layers) and gets
    ``c_in`` entries; the others take ``n`` then ``dims``. ``inject``: (``"nan"``/``"inf"``/``"-inf"``,
    position in [0, 1)) pairs written into the flattened tensor.
    """
    g = torch.Generator().manual_seed(seed)
    if rank <= 0:
        shape: list[int] = []
    elif rank == 1:
        shape = [n]
    else:
        rest = list(dims[:rank - 2]) + [1] * max(0, rank - 2 - len(dims))
        shape = [n] + rest + [c_in] if layer.channel_last else [n, c_in] + rest
    base = torch.full(shape, 1.0, dtype=torch.float64) if constant else torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)
    x64 = (base + offset) * scale
    flat = x64.view(-1)
    for kind, pos in inject:
        if flat.numel():
            flat[min(int(pos * flat.numel()), flat.numel() - 1)] = {"nan": float("nan"), "inf": float("inf"),
                                                                     "-inf": float("-inf")}[kind]
    if dtype in FLOAT_DTYPES:
        fi = torch.finfo(getattr(torch, dtype))
        x = torch.where(torch.isfinite(x64), x64.clamp(-fi.max, fi.max), x64).to(getattr(torch, dtype))
    elif dtype == "bool":
        x = x64 > 0
    elif dtype == "complex64":
        x = torch.nan_to_num(x64).to(torch.complex64)
    else:
        x = torch.nan_to_num(x64).clamp(-100, 100).to(getattr(torch, dtype))
    if x_kind == "list":
        x = x.tolist()
    elif x_kind == "ndarray":
        x = x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    elif x_kind == "none":
        x = None
    nb = n if rank >= 1 else 1
    ctx: Any
    if context_kind == "auto":
        ctx = (torch.arange(nb) % K) if layer.uses_context else None
    elif context_kind == "none":
        ctx = None
    elif context_kind == "valid":
        ctx = torch.randint(0, K, (nb,), generator=g)
    elif context_kind == "out_of_range":
        ctx = torch.full((nb,), K, dtype=torch.long)
    elif context_kind == "negative":
        ctx = torch.full((nb,), -1, dtype=torch.long)
    elif context_kind == "wrong_length":
        ctx = torch.zeros(nb + 1, dtype=torch.long)
    elif context_kind == "float":
        ctx = torch.zeros(nb, dtype=torch.float32)
    elif context_kind == "bool":
        ctx = torch.zeros(nb, dtype=torch.bool)
    elif context_kind == "2d":
        ctx = torch.zeros(nb, 1, dtype=torch.long)
    elif context_kind == "list":
        ctx = [i % K for i in range(nb)]
    elif context_kind == "ndarray":
        ctx = np.arange(nb) % K
    elif context_kind == "str":
        ctx = "day"
    elif context_kind == "none_list":
        ctx = [None] * nb
    else:
        raise ValueError(f"unknown context kind {context_kind!r}")
    return x, ctx


def _state(layer: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _check_state_finite(layer: torch.nn.Module, when: str) -> None:
    for k, v in layer.state_dict().items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ContractViolation(f"{type(layer).__name__}.{k} holds NaN/inf {when}")


def check_layer_call(layer: cbnorm.NormBase, x: Any, context: Any, *, seed: int = 0) -> str:
    """Call ``layer(x, context=context)`` and check the contract (module docstring): ``"accepted"`` or
    ``"refused"``; ContractViolation, or the stray exception itself, otherwise."""
    name = type(layer).__name__
    before = _state(layer)
    _check_state_finite(layer, "before the call")
    half = isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16)
    ref = copy.deepcopy(layer) if half else None
    torch.manual_seed(seed)
    try:
        y = layer(x, context=context)
    except (ValueError, TypeError) as err:
        if not str(err).strip():
            raise ContractViolation(f"{name} raised {type(err).__name__} with an empty message") from None
        after = layer.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
        if changed:
            raise ContractViolation(f"{name} refused the call ({err}) but changed {changed}") from None
        return "refused"
    _check_state_finite(layer, "after a call that returned")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ContractViolation(f"{name} accepted x of type {type(x).__name__} / returned {type(y).__name__}")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ContractViolation(f"{name}: output {tuple(y.shape)} {y.dtype} for input {tuple(x.shape)} {x.dtype}")
    out = y
    if half:  # exactly the float32 computation, cast: inf only where the exact result leaves the dtype's range
        torch.manual_seed(seed)
        y32 = ref(x.float(), context=context)
        if not torch.equal(torch.nan_to_num(y.float(), nan=7.0), torch.nan_to_num(y32.to(x.dtype).float(), nan=7.0)) \
                or not torch.equal(torch.isnan(y), torch.isnan(y32)):
            raise ContractViolation(f"{name}: {x.dtype} output differs from the float32 computation cast to {x.dtype}")
        out = y32
    n = x.shape[0]
    xs = x.detach().double().reshape(n, -1)
    bad_in = ~torch.isfinite(xs).all(dim=1) | (torch.nan_to_num(xs, nan=0.0).abs() > HUGE).any(dim=1)
    bad_out = ~torch.isfinite(out.detach().double().reshape(n, -1)).all(dim=1)
    leaked = (bad_out & ~bad_in).nonzero().flatten().tolist()
    if leaked:
        raise ContractViolation(f"{name} ({'train' if layer.training else 'eval'}): non-finite output in samples "
                                f"{leaked[:5]} whose input is finite and within {HUGE:g}")
    return "accepted"


LAYER_CASE_KINDS = ("chaos", "values", "well_formed")


def random_layer_case(r: random.Random, kind: str = "chaos") -> dict:
    """One random layer case as plain choices (the keywords of run_layer_case). ``kind``: "chaos" (any
    argument may be hostile: shapes, dtypes, non-tensors, contexts, values), "values" (a well-formed call
    with hostile values: NaN, +-inf, 1e30, zeros, constants, any float dtype) or "well_formed" (finite values
    from 1e-30 to 1e15: must be accepted)."""
    label = r.choice(sorted(LAYER_SPECS))
    name, spec = LAYER_SPECS[label]
    c = r.choice([2, 3, 4])
    case = dict(label=label, c=c, warm=r.random() < 0.6, train=r.random() < 0.5,
                rank=3 if spec.get("channel_last") else r.randint(2, 5), n=7, c_in=c,
                dims=tuple(r.randint(1, 3) for _ in range(3)), dtype=r.choice(FLOAT_DTYPES),
                scale=r.choice([1e-30, 1e-8, 1.0, 1e4, 1e15]), offset=r.choice([0.0, 3.0]), seed=r.randrange(2**31))
    if kind == "well_formed":
        return case
    case.update(n=r.choice([7, 2, 1]), scale=r.choice(SCALES), constant=r.random() < 0.15,
                inject=tuple((r.choice(["nan", "inf", "-inf"]), r.random()) for _ in range(r.choice([0, 1, 1, 3]))),
                context_kind=r.choice(["auto", "valid"]) if name in ("cn", "cnx", "cn-embed") else "auto")
    if kind == "values":
        return case
    case.update(rank=r.randint(1, 5), n=r.choice([0, 1, 2, 7]), c_in=r.choice([c, c - 1, c + 1]),
                dtype=r.choice(FLOAT_DTYPES + OTHER_DTYPES),
                x_kind=r.choice(["tensor", "tensor", "list", "ndarray", "none"]), context_kind=r.choice(CONTEXT_KINDS))
    return case


def run_layer_case(*, label: str, c: int, warm: bool, train: bool, seed: int = 0, **input_kw) -> str:
    layer = build_layer(label, c, seed)
    if warm:
        warm_up(layer, c, seed)
    layer.train(train)
    x, ctx = make_layer_input(layer, seed=seed, **input_kw)
    return check_layer_call(layer, x, ctx, seed=seed)


def autocast_case(label: str, dtype: torch.dtype, magnitude: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A layer trained (under autocast) on activations of ``magnitude`` "huge" (65000 in float16, 1e15 in
    bfloat16) or "tiny" (1e-6 / 1e-30), then evaluated on more of them: (train output, eval output).
    Learned statistics (cnx, cn-embed, acn) are set to the data's scale, as training would make them."""
    c = 4
    layer = build_layer(label, c, seed)
    scale = {("huge", torch.float16): 2e4, ("huge", torch.bfloat16): 1e15,
             ("tiny", torch.float16): 1e-6, ("tiny", torch.bfloat16): 1e-30}[(magnitude, dtype)]
    with torch.no_grad():
        for pname in ("log_var",):
            if hasattr(layer, pname) and isinstance(getattr(layer, pname), torch.nn.Parameter):
                getattr(layer, pname).fill_(2 * np.log(scale))
        if hasattr(layer, "head_log_var"):
            layer.head_log_var.bias.fill_(2 * np.log(scale))
        if hasattr(layer, "running_mean") and getattr(layer, "update", "") == "moving_average":
            layer.running_mean.mul_(scale)
            layer.running_var.fill_(scale ** 2)
        if isinstance(getattr(layer, "mean", None), torch.nn.Parameter):
            layer.mean.mul_(scale)
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)

    def batch() -> Tensor:
        shape = (12, 5, c) if layer.channel_last else (12, c, 3, 3)
        return (torch.randn(shape, generator=g) * scale).clamp(-fi.max, fi.max).to(dtype)

    ctx = (torch.arange(12) % K) if layer.uses_context else None
    layer.train()
    with torch.autocast("cpu", dtype=dtype):
        for _ in range(3):
            y_train = layer(batch(), context=ctx)
        layer.eval()
        y_eval = layer(batch(), context=ctx)
    _check_state_finite(layer, f"after {dtype} autocast with {magnitude} activations")
    return y_train, y_eval
