"""Hostile input, outside pytest: the image door, every layer and the run loader against bad input.

    python bench/hostile.py [--cases 500] [--seed 0] [--out bench/results/hostile.json]

Three doors, each with fixed hand-made cases and ``--cases`` seeded random ones:

* ``cbnorm.images.load_image``: random bytes, and valid PNG / JPEG / GIF / BMP / TIFF / WebP files (16-bit,
  palette, animated, EXIF-rotated, ...) that are truncated, have bytes flipped, inserted or repeated, or
  declare huge dimensions in their header;
* every layer of ``cbnorm.NORMS`` (and the variants moving_average / channel posteriors / tokens), train and
  eval mode, fresh or warmed up: tensors of rank 1..5, N in {0, 1, 2, 7}, matching or wrong C, NaN, +-inf,
  huge, tiny, zeros, float16 / bfloat16 / float32 / float64 and integer / bool / complex dtypes, non-tensors,
  and context ids in and out of range, of the wrong length, float, bool, 2-D, lists, strings (random cases
  come in three kinds: "chaos", any argument hostile; "values", a well-formed call with hostile values;
  "well_formed", finite values from 1e-30 to 1e15, which must be accepted);
* ``cbnorm.load_run``: pickled files renamed ``.safetensors``, truncated files, headers claiming huge sizes,
  mismatched architectures, tampered configs (unknown norms, absurd widths), paths escaping the run directory
  (``..``, absolute, symbolic links), malformed metrics, empty directories; plus random mutations of
  config.json and of the safetensors header. Unpickling is trapped: any call to ``pickle.load(s)``,
  ``pickle.Unpickler`` or ``torch.load`` counts as a crash.

The contract checked on each case (``check_image``, ``check_layer_call``, ``check_load_run``) is the one the
tests assert (tests/test_fuzz.py, tests/test_hostile_runs.py import it from here):

* the only outcomes are a result or ``ValueError`` / ``TypeError`` with a non-empty message (``ValueError``
  only, for load_run); anything else, or a broken promise below, is a crash;
* a layer call that raised leaves every parameter and buffer bit-for-bit as it was; after any call that
  returned, parameters and buffers are finite;
* a layer's output has the input's shape and dtype; sample n of the output may be non-finite only when
  sample n of the input holds NaN/inf or a value beyond ``HUGE`` = 1e15 in magnitude (per-sample
  propagation; batch statistics of a non-finite batch are refused in train mode instead). float16 /
  bfloat16 output is exactly the float32 computation on the same values cast to that dtype, so it is inf
  only where the exact result exceeds the dtype's range (e.g. eval-mode output above 65504 in float16);
* ``load_image`` returns a fully decoded image within ``MAX_PIXELS`` that ``to_rgb_array`` turns into
  uint8 (H, W, 3) (or refuses with ``ValueError``).

Writes JSON: per door and category, cases tried / refused with a message / accepted / crashes (with the
first few crash descriptions), and the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cbnorm  # noqa: E402
from cbnorm import runs  # noqa: E402
from cbnorm.images import MAX_PIXELS, load_image, to_rgb_array  # noqa: E402

#: beyond this magnitude an input value may make its own sample's output non-finite (squares overflow float32)
HUGE = 1e15


class ContractViolation(AssertionError):
    """A door broke its promise (wrong exception type, empty message, state changed, NaN leaked, ...)."""


# ============================================================================================ images
def _encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def seed_images() -> dict[str, bytes]:
    """Small valid files of every kind the door sees (built in memory, deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    frames = [rgb.rotate(90 * i) for i in range(1, 3)]
    out = {
        "png": _encode(rgb, "PNG"),
        "png16": _encode(Image.fromarray((rng.random((10, 12)) * 65535).astype(np.uint16)), "PNG"),
        "png_palette": _encode(rgb.convert("P"), "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "jpeg": _encode(rgb, "JPEG"),
        "jpeg_exif": _encode(rgb, "JPEG", exif=exif),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "gif": _encode(rgb, "GIF"),
        "gif_animated": _encode(rgb, "GIF", save_all=True, append_images=frames, duration=40, loop=0),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_float": _encode(Image.fromarray(rng.random((8, 10)).astype(np.float32)), "TIFF"),
        "webp": _encode(rgb, "WEBP"),
    }
    with contextlib.suppress(Exception):  # animated WebP needs libwebp's mux support
        out["webp_animated"] = _encode(rgb, "WEBP", save_all=True, append_images=frames)
    with contextlib.suppress(Exception):
        out["dds"] = _encode(rgb, "DDS")
    return out


def dds_unknown_flags() -> Optional[bytes]:
    """A DDS file whose pixel-format flags are 0 (PIL's plugin raised NotImplementedError on it)."""
    d = seed_images().get("dds")
    if d is None:
        return None
    return d[:80] + b"\0\0\0\0" + d[84:]


def png_claiming(w: int, h: int) -> bytes:
    """A ~70-byte PNG whose header claims w x h pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def claim_size(data: bytes, kind: str, w: int, h: int) -> Optional[bytes]:
    """``data`` (a file of ``kind``, as in seed_images) with its header patched to claim w x h pixels, or None
    where this kind has no simple size field. The pixel data stays small: a decompression bomb's calling card."""
    d = bytearray(data)
    if kind.startswith("png"):
        return png_claiming(w, h)
    if kind.startswith("jpeg"):
        i = 2
        while i + 9 < len(d):
            if d[i] != 0xFF:
                return None
            marker, length = d[i + 1], struct.unpack(">H", d[i + 2:i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width
                d[i + 5:i + 9] = struct.pack(">HH", min(h, 65535), min(w, 65535))
                return bytes(d)
            i += 2 + length
        return None
    if kind.startswith("gif"):
        d[6:10] = struct.pack("<HH", min(w, 65535), min(h, 65535))
        j = d.find(b"\x2c", 13)  # first image descriptor
        if j > 0:
            d[j + 5:j + 9] = struct.pack("<HH", min(w, 65535), min(h, 65535))
        return bytes(d)
    if kind == "bmp":
        d[18:26] = struct.pack("<ii", min(w, 2**31 - 1), min(h, 2**31 - 1))
        return bytes(d)
    if kind.startswith("webp") and d[12:16] == b"VP8X":
        d[24:30] = (min(w, 2**24) - 1).to_bytes(3, "little") + (min(h, 2**24) - 1).to_bytes(3, "little")
        return bytes(d)
    if kind.startswith("webp") and d[12:16] == b"VP8 ":
        d[26:30] = struct.pack("<HH", min(w, 16383), min(h, 16383))
        return bytes(d)
    return None


IMAGE_MUTATIONS = ("truncate", "flip", "flip_many", "insert", "repeat", "huge_dims")


def mutate_image(data: bytes, kind: str, op: str, r: random.Random) -> bytes:
    """One mutation of a valid file (see IMAGE_MUTATIONS), driven by ``r``."""
    d = bytearray(data)
    if op == "truncate":
        return bytes(d[:r.randrange(len(d))])
    if op in ("flip", "flip_many"):
        for _ in range(r.randint(1, 4) if op == "flip" else r.randint(5, 60)):
            d[r.randrange(len(d))] = r.randrange(256)
        return bytes(d)
    if op == "insert":
        p = r.randrange(len(d) + 1)
        d[p:p] = bytes(r.randrange(256) for _ in range(r.randint(1, 32)))
        return bytes(d)
    if op == "repeat":
        p = r.randrange(len(d))
        q = r.randrange(p, len(d) + 1)
        d[q:q] = d[p:q] * r.randint(1, 3)
        return bytes(d)
    if op == "huge_dims":
        side = r.choice([8000, 20000, 65535, 100_000, 2**31 - 1])
        return claim_size(data, kind, side, r.choice([side, 1, 7])) or bytes(d[:r.randrange(len(d))])
    raise ValueError(f"unknown mutation {op!r}")


def check_image(data: Any, *, max_seconds: float = 10.0) -> str:
    """``"accepted"`` or ``"refused"``; ContractViolation (or the stray exception) otherwise."""
    from PIL import Image

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd files; the outcome is what counts
            img = load_image(data)
    except (ValueError, TypeError) as err:
        if not str(err).strip():
            raise ContractViolation(f"load_image raised {type(err).__name__} with an empty message") from None
        return "refused"
    finally:
        if time.perf_counter() - t0 > max_seconds:
            raise ContractViolation(f"load_image took {time.perf_counter() - t0:.1f} s")
    if not isinstance(img, Image.Image):
        raise ContractViolation(f"load_image returned {type(img).__name__}")
    if not (1 <= img.width and 1 <= img.height and img.width * img.height <= MAX_PIXELS):
        raise ContractViolation(f"load_image returned an image of {img.size}")
    try:
        rgb = to_rgb_array(img)
    except ValueError as err:  # a mode PIL cannot convert: refused by the conversion, with a message
        if not str(err).strip():
            raise ContractViolation("to_rgb_array raised ValueError with an empty message") from None
        return "accepted"
    if rgb.dtype != np.uint8 or rgb.shape != (img.height, img.width, 3):
        raise ContractViolation(f"to_rgb_array gave {rgb.dtype} {rgb.shape} for a {img.mode} {img.size} image")
    return "accepted"


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


# ============================================================================================ runs
TEMPLATE_CONFIG: dict = {
    "format_version": 1, "task": "classify",
    "model": {"name": "shallow_cnn", "kwargs": {"in_channels": 1, "num_classes": 4, "width": 0.0625}},
    "norm": "cn", "norm_kwargs": {"num_contexts": 2, "priors": [0.6, 0.4]},
    "layers": ["conv3"], "input_norm": None,
    "dataset": {"name": "fashion-mnist", "limit_train": None, "limit_test": None, "subset_seed": 0},
    "contexts": {"spec": "superclass", "num_contexts": 2, "names": ["a", "b"], "label_derived": True,
                 "label_to_context": [0, 1, 0, 1], "kmeans": None},
    "class_names": ["w", "x", "y", "z"],
    "preprocessing": {"channels": 1, "image_size": [8, 8], "mean": [0.5], "std": [0.25]},
    "training": {"epochs": 1}, "files": dict(runs.DEFAULT_FILES),
}


def make_template_run(path: Path) -> Path:
    """A small valid run directory (cn at conv3 of a tiny CNN) with two snapshots."""
    cfg = copy.deepcopy(TEMPLATE_CONFIG)
    torch.manual_seed(0)
    model = runs.build_model_from_config(cfg).train()
    runs.save_snapshot(path, model, 0)
    for _ in range(2):
        model(torch.randn(8, 1, 8, 8), context=torch.arange(8) % 2)
    runs.save_run(path, cfg, model.eval(), {"loss": [[1, 1.4]], "epochs": [], "test_acc": 0.25})
    runs.save_snapshot(path, model, 2)
    return path


def _edit_config(d: Path, fn: Callable[[dict], Any]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _set_header(d: Path, fn: Callable[[dict], Any], name: str = "model.safetensors") -> None:
    w = d / name
    data = w.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    fn(header)
    h = json.dumps(header).encode()
    w.write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n:])


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in sorted(header) if k != "__metadata__")]


def _torch_save(d: Path, legacy: bool) -> None:
    torch.save({"w": torch.zeros(3)}, d / "model.safetensors", _use_new_zipfile_serialization=not legacy)


def _symlink_weights(d: Path, tmp: Path) -> None:
    outside = tmp / "outside.safetensors"
    shutil.copy(d / "model.safetensors", outside)
    (d / "link.safetensors").symlink_to(outside)
    _edit_config(d, lambda c: c["files"].update(weights="link.safetensors"))


def _symlink_config(d: Path, tmp: Path) -> None:
    outside = tmp / "outside_config.json"
    shutil.copy(d / "config.json", outside)
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(outside)


def _symlink_snapshots_dir(d: Path, tmp: Path) -> None:
    outside = tmp / "outside_snapshots"
    shutil.copytree(d / "snapshots", outside)
    shutil.rmtree(d / "snapshots")
    (d / "snapshots").symlink_to(outside, target_is_directory=True)


def _symlink_metrics(d: Path, tmp: Path) -> None:
    outside = tmp / "outside_metrics.json"
    shutil.copy(d / "metrics.json", outside)
    (d / "metrics.json").unlink()
    (d / "metrics.json").symlink_to(outside)


def _empty_dir(d: Path, tmp: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()


def _only_subdirs(d: Path, tmp: Path) -> None:
    shutil.rmtree(d)
    (d / "snapshots").mkdir(parents=True)


def _nan_running_var(d: Path, tmp: Path) -> None:
    tensors, meta = runs.read_safetensors(d / "model.safetensors")
    tensors["blocks.conv3.norm.running_var"][0, 0] = float("nan")
    runs._save_safetensors(d / "model.safetensors", tensors, meta)


def _negative_running_var(d: Path, tmp: Path) -> None:
    tensors, meta = runs.read_safetensors(d / "model.safetensors")
    tensors["blocks.conv3.norm.running_var"][0, 1] = -2.0
    runs._save_safetensors(d / "model.safetensors", tensors, meta)


def _swap_shapes(d: Path, tmp: Path) -> None:
    tensors, meta = runs.read_safetensors(d / "model.safetensors")
    tensors["head.weight"] = tensors["head.weight"].t().contiguous()  # same bytes, transposed shape
    runs._save_safetensors(d / "model.safetensors", tensors, meta)


def _bytes_case(fn: Callable[[bytes], bytes], name: str = "model.safetensors"):
    def apply(d: Path, tmp: Path) -> None:
        p = d / name
        p.write_bytes(fn(p.read_bytes()))
    return apply


def _cfg_case(fn: Callable[[dict], Any]):
    return lambda d, tmp: _edit_config(d, fn)


def _hdr_case(fn: Callable[[dict], Any]):
    return lambda d, tmp: _set_header(d, fn)


def _write(name: str, text: bytes):
    def apply(d: Path, tmp: Path) -> None:
        (d / name).write_bytes(text)
    return apply


#: category -> {case name: function(run_dir, tmp_dir) that damages a copy of the template run}
RUN_CASES: dict[str, dict[str, Callable[[Path, Path], None]]] = {
    "pickled": {
        "torch_save_zip": lambda d, tmp: _torch_save(d, legacy=False),
        "torch_save_legacy": lambda d, tmp: _torch_save(d, legacy=True),
        "pickle_protocol_0": _write("model.safetensors", pickle.dumps({"a": 1}, protocol=0)),
        "pickle_protocol_2": _write("model.safetensors", pickle.dumps({"a": 1}, protocol=2)),
        "pickle_protocol_5": _write("model.safetensors", pickle.dumps({"a": [1.0] * 8}, protocol=5)),
        "pickle_as_snapshot": lambda d, tmp: (d / "snapshots" / "step_000002.safetensors").write_bytes(
            pickle.dumps({"a": 1}, protocol=4)),
    },
    "truncated": {
        "empty_file": _write("model.safetensors", b""),
        "4_bytes": _bytes_case(lambda b: b[:4]),
        "inside_header": _bytes_case(lambda b: b[:40]),
        "inside_data": _bytes_case(lambda b: b[:len(b) - 17]),
        "one_byte_short": _bytes_case(lambda b: b[:-1]),
    },
    "header": {
        "length_2**63": _bytes_case(lambda b: (2**63).to_bytes(8, "little") + b[8:]),
        "length_2**64-1": _bytes_case(lambda b: b"\xff" * 8 + b[8:]),
        "length_zero": _bytes_case(lambda b: (0).to_bytes(8, "little") + b[8:]),
        "shape_2**40_squared": _hdr_case(lambda h: _first_tensor(h).update(
            shape=[2**40, 2**40], data_offsets=[0, 2**80 * runs._ITEMSIZE[_first_tensor(h)["dtype"]]])),
        "offsets_past_end": _hdr_case(lambda h: _first_tensor(h).update(
            data_offsets=[10**12, 10**12 + 8 * max(1, int(np.prod(_first_tensor(h)["shape"])))])),
        "negative_offsets": _hdr_case(lambda h: _first_tensor(h).update(data_offsets=[-8, 0])),
        "negative_shape": _hdr_case(lambda h: _first_tensor(h).update(shape=[-2, -2])),
        "string_offsets": _hdr_case(lambda h: _first_tensor(h).update(data_offsets=["0", "8"])),
        "float_shape": _hdr_case(lambda h: _first_tensor(h).update(shape=[2.5])),
        "list_dtype": _hdr_case(lambda h: _first_tensor(h).update(dtype=["F32"])),
        "unknown_dtype": _hdr_case(lambda h: _first_tensor(h).update(dtype="F8_E4M3")),
        "overlapping_tensors": _hdr_case(lambda h: [v.update(data_offsets=[0, v["data_offsets"][1]
                                                                           - v["data_offsets"][0]])
                                                    for k, v in h.items() if k != "__metadata__"]),
        "metadata_not_strings": _hdr_case(lambda h: h.update(__metadata__={"format": 1})),
        "header_is_list": _bytes_case(lambda b: (2).to_bytes(8, "little") + b"[]" + b[8 + int.from_bytes(b[:8], "little"):]),
        "header_not_utf8": _bytes_case(lambda b: b[:8] + b"{\xff\xfe" + b[11:]),
    },
    "architecture": {
        "wider_model": _cfg_case(lambda c: c["model"]["kwargs"].update(width=0.125)),
        "more_classes": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=5)),
        "other_norm": _cfg_case(lambda c: c.update(norm="bn")),
        "more_contexts": _cfg_case(lambda c: c["norm_kwargs"].update(num_contexts=3, priors=None)),
        "more_norm_layers": _cfg_case(lambda c: c.update(layers=["conv2", "conv3"])),
        "vit_instead": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={"in_channels": 1, "num_classes": 4,
                                                                                 "image_size": 8})),
        "transposed_tensor": _swap_shapes,
        "nan_in_weights": _nan_running_var,
        "negative_running_var": _negative_running_var,
    },
    "config": {
        "unknown_norm": _cfg_case(lambda c: c.update(norm="supernorm")),
        "unknown_model": _cfg_case(lambda c: c["model"].update(name="resnet50")),
        "model_name_list": _cfg_case(lambda c: c["model"].update(name=["vit"])),
        "width_1e9": _cfg_case(lambda c: c["model"]["kwargs"].update(width=1e9)),
        "width_50": _cfg_case(lambda c: c["model"]["kwargs"].update(width=50)),
        "width_inf": _cfg_case(lambda c: c["model"]["kwargs"].update(width=float("inf"))),
        "num_classes_1e9": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=10**9)),
        "num_classes_1e30": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=10**30)),
        "num_classes_negative": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=-3)),
        "num_contexts_1e9": _cfg_case(lambda c: c["norm_kwargs"].update(num_contexts=10**9, priors=None)),
        "vit_dim_1e6": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={"in_channels": 1, "num_classes": 4,
                                                                                 "image_size": 8, "dim": 10**6})),
        "vit_depth_1e6": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={
            "in_channels": 1, "num_classes": 4, "image_size": 8, "depth": 10**6})),
        "vit_patch_0": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={
            "in_channels": 1, "num_classes": 4, "image_size": 8, "patch_size": 0})),
        "vit_heads_not_dividing": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={
            "in_channels": 1, "num_classes": 4, "image_size": 8, "dim": 10, "heads": 3})),
        "image_size_1e9": _cfg_case(lambda c: c["preprocessing"].update(image_size=[10**9, 10**9])),
        "image_size_inf": _cfg_case(lambda c: c["preprocessing"].update(image_size=[float("inf"), 8])),
        "std_zero": _cfg_case(lambda c: c["preprocessing"].update(std=[0.0])),
        "priors_negative": _cfg_case(lambda c: c["norm_kwargs"].update(priors=[-1.0, 2.0])),
        "format_version_99": _cfg_case(lambda c: c.update(format_version=99)),
        "not_an_object": _write("config.json", b"[1, 2, 3]"),
        "malformed_json": _write("config.json", b'{"format_version": 1,,}'),
        "nested_100000_deep": _write("config.json", b"[" * 100_000 + b"]" * 100_000),
        "not_utf8": _write("config.json", b"\xff\xfe{\x00}"),
    },
    "paths": {
        "weights_dotdot": _cfg_case(lambda c: c["files"].update(weights="../outside.safetensors")),
        "weights_nested_dotdot": _cfg_case(lambda c: c["files"].update(weights="snapshots/../../x.safetensors")),
        "weights_absolute": _cfg_case(lambda c: c["files"].update(weights="/etc/passwd")),
        "weights_windows_drive": _cfg_case(lambda c: c["files"].update(weights="C:\\weights.safetensors")),
        "metrics_dotdot": _cfg_case(lambda c: c["files"].update(metrics="../metrics.json")),
        "metrics_absolute": _cfg_case(lambda c: c["files"].update(metrics="/proc/self/environ")),
        "snapshots_dotdot": _cfg_case(lambda c: c["files"].update(snapshots="..")),
        "snapshots_absolute": _cfg_case(lambda c: c["files"].update(snapshots="/tmp")),
        "weights_symlink_outside": _symlink_weights,
        "config_symlink_outside": _symlink_config,
        "metrics_symlink_outside": _symlink_metrics,
        "snapshots_dir_symlink_outside": _symlink_snapshots_dir,
        "snapshot_symlink_outside": lambda d, tmp: (
            shutil.copy(d / "model.safetensors", tmp / "snap.safetensors"),
            (d / "snapshots" / "step_000099.safetensors").symlink_to(tmp / "snap.safetensors")),
        "files_not_object": _cfg_case(lambda c: c.update(files=["model.safetensors"])),
        "weights_empty_path": _cfg_case(lambda c: c["files"].update(weights="")),
    },
    "metrics": {
        "malformed_json": _write("metrics.json", b'{"loss": [[1, 2.0],]}'),
        "not_an_object": _write("metrics.json", b"[]"),
        "loss_not_a_list": _write("metrics.json", b'{"loss": "low"}'),
        "epochs_not_a_list": _write("metrics.json", b'{"epochs": 3}'),
        "nested_100000_deep": _write("metrics.json", b'{"loss": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "not_utf8": _write("metrics.json", b'{"loss": "\xff"}'),
        "empty_file": _write("metrics.json", b""),
        "missing": lambda d, tmp: (d / "metrics.json").unlink(),
    },
    "empty": {
        "empty_directory": _empty_dir,
        "only_subdirectories": _only_subdirs,
        "no_weights": lambda d, tmp: (d / "model.safetensors").unlink(),
        "no_config": lambda d, tmp: (d / "config.json").unlink(),
        "weights_is_a_directory": lambda d, tmp: ((d / "model.safetensors").unlink(),
                                                  (d / "model.safetensors").mkdir()),
    },
}
#: cases refused only when the snapshot is opened (Run.load_snapshot), not by load_run itself
SNAPSHOT_CASES = {"pickle_as_snapshot"}


@contextlib.contextmanager
def no_unpickling():
    """Make every unpickling entry point raise ContractViolation for the duration."""
    def trap(*a, **k):
        raise ContractViolation("something tried to unpickle")

    class TrapUnpickler:
        def __init__(self, *a, **k):
            trap()

    saved = (pickle.loads, pickle.load, pickle.Unpickler, torch.load)
    pickle.loads, pickle.load, pickle.Unpickler, torch.load = trap, trap, TrapUnpickler, trap
    try:
        yield
    finally:
        pickle.loads, pickle.load, pickle.Unpickler, torch.load = saved


def check_load_run(run_dir: Path, *, snapshot: bool = False, expect_refusal: bool = True) -> str:
    """``"refused"`` (ValueError with a message) or ``"accepted"``; ContractViolation when a case that must be
    refused loads, or when anything but ValueError escapes. ``snapshot``: also open every snapshot."""
    try:
        with no_unpickling():
            run = runs.load_run(run_dir)
            if snapshot:
                for step, _ in run.snapshots:
                    run.load_snapshot(step)
    except ValueError as err:
        if not str(err).strip():
            raise ContractViolation("load_run raised ValueError with an empty message") from None
        return "refused"
    if expect_refusal:
        raise ContractViolation(f"{run_dir} was loaded but must be refused")
    return "accepted"


# ------------------------------------------------------------------------------- random run mutations
_JSON_VALUES = [None, True, False, 0, -1, 1, 2, 3, 10**9, 10**30, 1e9, 1.5, -1e300, float("nan"), float("inf"),
                "", "x", "cn", "bn", "vit", "..", "/etc/passwd", [], [1], ["conv3"], [[1]], {}, {"a": 1},
                {"name": "vit"}, [0.5], "daynight", "classify", 0.0, 1e-300, [2**63, 0], "F32", "I64", [-2, 2]]


def _json_paths(o: Any, pre: tuple = ()):
    yield pre
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _json_paths(v, pre + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o[:4]):
            yield from _json_paths(v, pre + (i,))


def mutate_json(obj: Any, r: random.Random, edits: int = 3) -> Any:
    """A deep copy of ``obj`` with 1..``edits`` random values replaced, keys dropped or list items added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(r.randint(1, edits)):
        paths = [p for p in _json_paths(obj) if p]
        if not paths:
            break
        p = r.choice(paths)
        parent = obj
        for k in p[:-1]:
            parent = parent[k]
        value = json.loads(json.dumps(r.choice(_JSON_VALUES)))
        if r.random() < 0.8:
            parent[p[-1]] = value
        elif isinstance(parent, dict):
            parent.pop(p[-1], None)
        else:
            parent.append(value)
    return obj


def random_run_mutation(template: Path, d: Path, r: random.Random) -> str:
    """Copy ``template`` to ``d`` and damage it at random (config, safetensors header, or bytes); the kind."""
    shutil.copytree(template, d)
    kind = r.choice(["config", "config", "header", "header", "bytes", "metrics"])
    if kind == "config":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(mutate_json(cfg, r)))
    elif kind == "header":
        _set_header(d, lambda h: h.update(mutate_json(h, r)))
        if r.random() < 0.3:
            w = d / "model.safetensors"
            b = w.read_bytes()
            w.write_bytes(b[:r.randrange(len(b))] if r.random() < 0.5 else b + bytes(r.randrange(64)))
    elif kind == "metrics":
        m = json.loads((d / "metrics.json").read_text())
        (d / "metrics.json").write_text(json.dumps(mutate_json(m, r)))
    else:
        w = d / "model.safetensors"
        b = bytearray(w.read_bytes())
        for _ in range(r.randint(1, 16)):
            b[r.randrange(min(len(b), 400))] = r.randrange(256)  # mostly in the header
        w.write_bytes(bytes(b))
    return kind


# ============================================================================================ driver
class Tally:
    """Per category: tried, refused (with a message), accepted, crashes (and the first crash messages)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.crash_examples: dict[str, list[str]] = defaultdict(list)

    def run(self, category: str, fn: Callable[[], str], label: str = "") -> None:
        c = self.counts[category]
        c["tried"] += 1
        try:
            outcome = fn()
        except Exception as err:  # noqa: BLE001 - a crash is what we count
            c["crashes"] += 1
            if len(self.crash_examples[category]) < 5:
                tb = traceback.extract_tb(err.__traceback__)[-1]
                self.crash_examples[category].append(
                    f"{label}: {type(err).__name__}: {str(err)[:200]} @ {Path(tb.filename).name}:{tb.lineno}")
            return
        c[outcome] += 1

    def as_dict(self) -> dict:
        out = {}
        for cat, c in self.counts.items():
            out[cat] = {"tried": c["tried"], "refused_with_message": c["refused"], "accepted": c["accepted"],
                        "crashes": c["crashes"]}
            if self.crash_examples.get(cat):
                out[cat]["crash_examples"] = self.crash_examples[cat]
        return out


def bench_images(tally: Tally, cases: int, seed: int) -> None:
    seeds = seed_images()
    for kind, data in seeds.items():
        tally.run("images/valid", lambda: check_image(data), kind)
    fixed = {"empty": b"", "text": b"hello, this is a text file\n" * 20, "zip": b"PK\x03\x04" + b"\x00" * 200,
             "png_signature_only": b"\x89PNG\r\n\x1a\n", "not_bytes_str": "photo.png", "not_bytes_none": None,
             "png_100000x100000": png_claiming(100_000, 100_000), "png_8000x8000": png_claiming(8000, 8000),
             "png_1x60000000": png_claiming(1, 60_000_000), "png_0x0": png_claiming(0, 0),
             "dds_unknown_pixel_format": dds_unknown_flags()}
    if fixed["dds_unknown_pixel_format"] is None:
        del fixed["dds_unknown_pixel_format"]
    for name, data in fixed.items():
        tally.run("images/fixed", lambda: check_image(data), name)
    for kind, data in seeds.items():
        for side in (20000, 65535, 2**31 - 1):
            bomb = claim_size(data, kind, side, side)
            if bomb is not None:
                tally.run("images/huge_dims", lambda: check_image(bomb), f"{kind} {side}")
    for kind, data in seeds.items():  # every prefix of every valid file
        for cut in range(len(data)):
            tally.run("images/every_truncation", lambda: check_image(data[:cut]), f"{kind}[:{cut}]")
    r = random.Random(seed)
    for i in range(cases):
        if i % 5 == 0:
            blob = bytes(r.randrange(256) for _ in range(r.randrange(0, 512)))
            tally.run("images/random_bytes", lambda: check_image(blob), f"random #{i}")
            continue
        kind = r.choice(list(seeds))
        op = r.choice(IMAGE_MUTATIONS)
        blob = mutate_image(seeds[kind], kind, op, r)
        tally.run(f"images/mutated_{op}", lambda: check_image(blob), f"{kind} {op} #{i}")


def bench_layers(tally: Tally, cases: int, seed: int) -> None:
    r = random.Random(seed)
    for i in range(cases):
        kind = LAYER_CASE_KINDS[i % 3]
        case = random_layer_case(r, kind)

        def one() -> str:
            outcome = run_layer_case(**case)
            if kind == "well_formed" and outcome != "accepted":
                raise ContractViolation("a well-formed call with finite values was refused")
            return outcome
        tally.run(f"layers/random_{kind}", one, json.dumps(case, default=str))
    for label in LAYER_SPECS:  # the named hostile inputs, on every layer and mode
        for train in (True, False):
            c = 4
            fixed = {"nan": dict(inject=(("nan", 0.3),)), "inf": dict(inject=(("inf", 0.6),)),
                     "-inf": dict(inject=(("-inf", 0.1),)), "huge_1e30": dict(scale=1e30),
                     "huge_1e15": dict(scale=1e15), "tiny_1e-30": dict(scale=1e-30), "zeros": dict(scale=0.0),
                     "empty_batch": dict(n=0), "one_sample": dict(n=1), "rank_1": dict(rank=1),
                     "wrong_c": dict(c_in=c + 1), "int64": dict(dtype="int64"), "float16": dict(dtype="float16",
                                                                                                   scale=3e4),
                     "bfloat16": dict(dtype="bfloat16", scale=1e15), "float64": dict(dtype="float64", scale=1e30)}
            for name, over in fixed.items():
                kw = dict(rank=3 if LAYER_SPECS[label][1].get("channel_last") else 4, n=7, c_in=c, dims=(3, 2, 1),
                          dtype="float32", scale=1.0, offset=0.0)
                kw.update(over)
                tally.run("layers/named_inputs", lambda: run_layer_case(label=label, c=c, warm=True, train=train,
                                                                         **kw), f"{label} {train} {name}")
    for label in LAYER_SPECS:
        for dtype in (torch.float16, torch.bfloat16):
            for magnitude in ("huge", "tiny"):
                def autocast_check() -> str:
                    y_train, y_eval = autocast_case(label, dtype, magnitude)
                    if not (torch.isfinite(y_train).all() and torch.isfinite(y_eval).all()):
                        raise ContractViolation(f"{label} {dtype} {magnitude}: non-finite output")
                    return "accepted"
                tally.run("layers/autocast", autocast_check, f"{label} {dtype} {magnitude}")


def bench_runs(tally: Tally, cases: int, seed: int, tmp: Path) -> None:
    template = make_template_run(tmp / "template")
    tally.run("runs/valid", lambda: check_load_run(template, snapshot=True, expect_refusal=False), "template")
    i = 0
    for category, named in RUN_CASES.items():
        for name, damage in named.items():
            d = tmp / f"case{i}"
            i += 1
            shutil.copytree(template, d)
            damage(d, tmp)
            tally.run(f"runs/{category}", lambda: check_load_run(d, snapshot=name in SNAPSHOT_CASES), name)
    r = random.Random(seed)
    for j in range(cases):
        d = tmp / f"random{j}"
        kind = random_run_mutation(template, d, r)
        tally.run(f"runs/random_{kind}", lambda: check_load_run(d, snapshot=True, expect_refusal=False),
                  f"random {kind} #{j}")
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=500, help="random cases per door (images, layers, runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hostile.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.speed import machine

    info = machine("cpu")
    tally = Tally()
    times = {}
    t0 = time.perf_counter()
    bench_images(tally, args.cases, args.seed)
    times["images"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bench_layers(tally, args.cases, args.seed)
    times["layers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bench_runs(tally, args.cases, args.seed, Path(tmp))
    times["runs"] = time.perf_counter() - t0
    per_cat = tally.as_dict()
    doors = {}
    for door in ("images", "layers", "runs"):
        cats = [v for k, v in per_cat.items() if k.startswith(door + "/")]
        doors[door] = {key: sum(c[key] for c in cats) for key in ("tried", "refused_with_message", "accepted",
                                                                   "crashes")}
        doors[door]["seconds"] = round(times[door], 2)
    result = {
        "what": "hostile input against cbnorm.images.load_image, every layer (train/eval) and cbnorm.load_run; "
                "outcomes must be a result or ValueError/TypeError with a message (ValueError for load_run), "
                "layer state untouched by a refused call and finite after any call; see bench/hostile.py",
        "seed": args.seed, "random_cases_per_door": args.cases,
        "totals": {key: sum(d[key] for d in doors.values()) for key in ("tried", "refused_with_message", "accepted",
                                                                        "crashes")},
        "doors": doors, "categories": dict(sorted(per_cat.items())), "machine": info,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"totals": result["totals"], "doors": doors}, indent=1))
    crashes = {k: v for k, v in per_cat.items() if v["crashes"]}
    if crashes:
        print("CRASHES:", json.dumps(crashes, indent=1))
    return result


if __name__ == "__main__":
    main()
