"""Day <-> night translation by swapping context parameters (context-normalization.txt IV-E), and baselines.

Translators
-----------
A context layer normalizes a sample of context k with an affine map per channel,
``y = A_k x + B_k`` (``A_k = gamma_k s_k / sqrt(var_k + eps)``, ``B_k = beta_k - A_k mu_k``: CN's eq. 22/26
with the layer's prior scale s_k and affine (gamma_k, beta_k); just ``(x - mu_k) / sigma_k`` for the input
norm of the committed run, which has neither). Translating from context s to context t = normalize with s's
parameters, de-normalize with t's: ``x -> (A_s x + B_s - B_t) / A_t``, so the network sees the translated
image under context t exactly as it saw the original under context s.

* ``translate(run, image, source, target, strength)`` with an **input-level** run (``"translator":
  "input"``; CN on the 3 image channels in front of a siamese network): the map above on the RGB values
  of every pixel (values in [0, 1], clipped). Per pixel and per channel: any image size, processed in
  blocks of rows; the limit is the image door's (``cbnorm.images.MAX_PIXELS`` = 50 megapixels).
* with a **feature-level** run (``"translator": "feature"``; a conv autoencoder whose norm layers are
  context layers): the encoder's layers use the source context's parameters, the decoder's the target's:
  ``D_t(E_s(x))``. Images up to ``AE_MAX_PIXELS`` (2 megapixels) are processed at full resolution in
  ``AE_TILE`` x ``AE_TILE`` tiles that overlap by ``AE_OVERLAP`` pixels and are blended with linear ramps
  (no seams); a larger image is downscaled to 2 megapixels for the autoencoder, and the change it makes
  (output minus input) is resized back and added to the full-resolution image (so the original's fine
  detail stays; at 2 MP a CPU core needs ~10-20 s).

``strength`` in [0, 1] interpolates the parameters: the target's coefficients are ``lerp((A_s, B_s),
(A_t, B_t), strength)``. Input level: ``x -> (A_s x + B_s - B') / A'`` with those. Feature level:
``D'(E_s(x)) + (1 - strength) (x - D_s(E_s(x)))``, D' decoding with the interpolated parameters; the second
term (what the autoencoder's own reconstruction misses) fades out as the strength grows, so ``strength=0``
gives the input back and ``strength=1`` gives ``D_t(E_s(x))``. ``strength=0`` returns the input's pixels
exactly (both levels).

The run's model is shared (cached by the app, used by several sessions): it is never modified. Input-level
translation only reads the layer's statistics; feature-level translation works on a ``copy.deepcopy`` of the
model whose norm layers are replaced by fixed affine maps.

Images: any PIL mode is accepted (``cbnorm.images.to_rgb_array``); the result has the input's size, in mode
RGB, or RGBA when the input had transparency (the alpha channel is returned unchanged).

Fit your own contexts
---------------------
``fit_contexts(day_images, night_images)`` computes CN's statistics (eq. 23-24: mean and biased variance
per channel over all pixels of all images of a context) of unpaired user photos, in memory; nothing is
written anywhere. ``translate_with_stats(image, stats, ...)`` translates with them exactly as the
input-level translator does with learned ones.

Baselines
---------
``reinhard(image, reference)``: Reinhard et al. 2001 colour transfer, in CIELAB (``skimage.color``):
each channel of the image shifted and scaled from its own mean/std to the reference set's.
``histogram_match(image, reference)``: ``skimage.exposure.match_histograms`` per channel against the pixels
of the reference set. ``reference`` = images of the target context (the bench uses the training photos).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..images import alpha_of, from_rgb_array, to_rgb_array
from ..norms.functional import normalizing_coefficients
from .render import (CONTEXTS, TRAIN_PHOTOS, DayNightPairs, NightParams, linear_to_srgb, load_photo, photo_seed,
                     render_night, xyz_to_rgb)

__all__ = ["translate", "translate_array", "fit_contexts", "translate_with_stats", "ContextStats",
           "context_parameters", "context_stats_of_run", "reinhard", "reinhard_array", "lab_stats",
           "histogram_match", "histogram_match_array", "bundled_image", "training_stats", "AE_MAX_PIXELS", "AE_TILE",
           "AE_OVERLAP", "RGB"]

RGB = ("R", "G", "B")
#: largest image the autoencoder processes at full resolution (larger: downscaled, change resized back)
AE_MAX_PIXELS = 2_000_000
#: tile size and overlap of the autoencoder's tiled processing (multiples of 4)
AE_TILE = 256
AE_OVERLAP = 32
_ROWS_PER_BLOCK = 512


# ============================================================================ checks
def _check_image(image: Any) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image (use cbnorm.images.load_image for uploaded bytes), "
                        f"got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has no pixels ({image.width} x {image.height})")


def _check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (0 = unchanged, 1 = full translation), "
                         f"got {strength!r}")
    return float(strength)


def _context_ids(names: Sequence[str], source: Any, target: Any) -> tuple[int, int]:
    names = list(names)
    for what, v in (("source", source), ("target", target)):
        if v not in names:
            raise ValueError(f"{what} must be one of {names}, got {v!r}")
    return names.index(source), names.index(target)


def _check_run(run: Any) -> None:
    cfg = getattr(run, "config", None)
    if not isinstance(cfg, dict) or not hasattr(run, "model"):
        raise TypeError(f"run must be a cbnorm.runs.Run (cbnorm.load_run(path)), got {type(run).__name__}")
    if cfg.get("task") != "daynight":
        raise ValueError(f"run {getattr(run, 'path', '')} is a {cfg.get('task')!r} run, not a day/night "
                         f"translator (task 'daynight', trained by python -m cbnorm.train_daynight)")


def _as_rgb01(image: Any) -> np.ndarray:
    """PIL image or uint8 (H, W, 3) -> float32 (H, W, 3) in [0, 1]."""
    arr = to_rgb_array(image) if isinstance(image, Image.Image) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"images must be (H, W, 3) RGB arrays or PIL images, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    raise TypeError(f"image arrays must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _finish(image: Image.Image, rgb_u8: np.ndarray) -> Image.Image:
    return from_rgb_array(rgb_u8, alpha_of(image))


# ============================================================================ per-channel (input level)
def _lerp_target(a: np.ndarray, b: np.ndarray, s: int, t: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of the interpolated target context: lerp((A_s, B_s), (A_t, B_t), strength)."""
    return a[s] + strength * (a[t] - a[s]), b[s] + strength * (b[t] - b[s])


def _affine_translate(rgb01: np.ndarray, a: np.ndarray, b: np.ndarray, s: int, t: int, strength: float
                      ) -> np.ndarray:
    """x -> (A_s x + B_s - B') / A' per channel, in blocks of rows; uint8 (H, W, 3)."""
    at, bt = _lerp_target(a, b, s, t, strength)
    gain = (a[s] / at).astype(np.float32)
    bias = ((b[s] - bt) / at).astype(np.float32)
    out = np.empty(rgb01.shape, np.uint8)
    for r in range(0, rgb01.shape[0], _ROWS_PER_BLOCK):
        out[r:r + _ROWS_PER_BLOCK] = _to_uint8(rgb01[r:r + _ROWS_PER_BLOCK] * gain + bias)
    return out


@dataclass(frozen=True)
class ContextStats:
    """Per-context Gaussians of RGB pixel values in [0, 1]: ``mean`` and ``var`` (K, 3), context ``names``,
    ``counts`` = pixels per context. A translation normalizes with one context's (mean, std) and
    de-normalizes with another's. Built by :func:`fit_contexts` or :func:`context_stats_of_run`."""

    names: tuple[str, ...]
    mean: np.ndarray
    var: np.ndarray
    counts: tuple[int, ...] = ()
    source: str = "fitted"

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def coefficients(self, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) (K, 3) with A x + B = (x - mean) / sqrt(var + eps)."""
        inv = 1.0 / np.sqrt(np.asarray(self.var, np.float64) + eps)
        return inv, -np.asarray(self.mean, np.float64) * inv

    def parameters(self) -> dict:
        """The page's bar-chart data, in the layout of :func:`context_parameters`."""
        return {"translator": self.source, "contexts": list(self.names),
                "layers": [_layer_entry(self.source, list(RGB), self.mean, self.std, self.names,
                                        "pixel value in [0, 1]")]}


def fit_contexts(day_images: Iterable[Any], night_images: Iterable[Any], names: Sequence[str] = CONTEXTS
                 ) -> ContextStats:
    """CN's per-context statistics (eq. 23-24) of unpaired images: per-channel mean and biased variance over
    all pixels of all images of each context. Images: PIL images (any mode; fully transparent pixels are
    left out) or uint8 (H, W, 3) arrays. ``ValueError`` when a context has no image."""
    groups = [list(day_images), list(night_images)]
    means, variances, counts = [], [], []
    for name, imgs in zip(names, groups):
        if not imgs:
            raise ValueError(f"fit_contexts needs at least one {name} image, got none")
        n, mean, m2 = 0, np.zeros(3), np.zeros(3)
        for i, img in enumerate(imgs):
            try:
                px = _as_rgb01(img).reshape(-1, 3).astype(np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name} image {i + 1}: {err}") from None
            if isinstance(img, Image.Image):
                alpha = alpha_of(img)
                if alpha is not None:
                    px = px[alpha.reshape(-1) > 0]
            if px.shape[0] == 0:
                continue
            nb, mb = px.shape[0], px.mean(0)
            m2b = ((px - mb) ** 2).sum(0)
            delta = mb - mean  # Chan et al.: merge (n, mean, M2) with the batch's
            tot = n + nb
            mean = mean + delta * nb / tot
            m2 = m2 + m2b + delta ** 2 * n * nb / tot
            n = tot
        if n == 0:
            raise ValueError(f"the {name} images have no visible pixels (all fully transparent)")
        means.append(mean)
        variances.append(m2 / n)
        counts.append(n)
    return ContextStats(tuple(names), np.array(means), np.array(variances), tuple(counts))


def translate_with_stats(image: Image.Image, stats: ContextStats, source: str = "day", target: str = "night",
                         strength: float = 1.0) -> Image.Image:
    """Translate ``image`` between two contexts of ``stats`` (from :func:`fit_contexts`); same size as the
    input, RGB (RGBA when it had transparency)."""
    _check_image(image)
    if not isinstance(stats, ContextStats):
        raise TypeError(f"stats must be a ContextStats (from fit_contexts), got {type(stats).__name__}")
    s, t = _context_ids(stats.names, source, target)
    strength = _check_strength(strength)
    rgb = to_rgb_array(image)
    if strength == 0.0 or s == t:
        return _finish(image, rgb)
    a, b = stats.coefficients()
    return _finish(image, _affine_translate(rgb.astype(np.float32) / 255.0, a, b, s, t, strength))


# ============================================================================ runs
def _pre(run) -> tuple[np.ndarray, np.ndarray]:
    pre = run.config["preprocessing"]
    return np.asarray(pre["mean"], np.float64), np.asarray(pre["std"], np.float64)


def _coefficients(layer) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) (K, C) of a context layer's eval transform y = A_k x + B_k (read-only)."""
    with torch.no_grad():
        mean, var = layer.context_statistics()
        mean, var = mean.detach().double().cpu(), var.detach().double().cpu()
        scale = layer._prior_scale(torch.float64)
        gain, shift = layer._affine(torch.float64)
        a, b = normalizing_coefficients(mean, var, layer.eps, None if scale is None else scale.cpu(),
                                        None if gain is None else gain.detach().cpu(),
                                        None if shift is None else shift.detach().cpu())
    return a.numpy(), b.numpy()


def _input_coefficients(run) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of the input norm in pixel units ([0, 1]): the model sees (pixel - m) / sd (preprocessing)."""
    a, b = _coefficients(run.model.input_norm)
    m, sd = _pre(run)
    return a / sd, b - a * m / sd


def context_stats_of_run(run) -> ContextStats:
    """The input-level run's per-context Gaussians in pixel units, as a :class:`ContextStats`: the effective
    (mean, std) of the input norm's full transform (equal to its (mu_k, sigma_k) when it has no affine and
    no prior scale, as in the committed run)."""
    _check_run(run)
    if run.config.get("translator") != "input":
        raise ValueError("context_stats_of_run needs an input-level run (translator 'input')")
    a, b = _input_coefficients(run)
    return ContextStats(tuple(run.context_names), -b / a, 1.0 / a ** 2, source="input")


class _FixedAffine(nn.Module):
    """Replaces a context layer in a private copy of the model: y = A x + B with fixed (C,) coefficients."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        return x * self.a.to(x.dtype) + self.b.to(x.dtype)


def _fixed_ae(run, s: int, t: int, strength: float) -> nn.Module:
    """A private copy of the autoencoder: encoder layers fixed to context s, decoder to lerp(s, t, strength)."""
    model = copy.deepcopy(run.model).eval()
    for name in model.ENCODER + model.DECODER:
        block = model.blocks[name]
        a, b = _coefficients(block["norm"])
        if name in model.ENCODER:
            block["norm"] = _FixedAffine(a[s], b[s])
        else:
            block["norm"] = _FixedAffine(*_lerp_target(a, b, s, t, strength))
    return model.to(run.device)


def _pad4(x: Tensor) -> tuple[Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % 4 + (8 if h < 8 else 0), (-w) % 4 + (8 if w < 8 else 0)
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


def _ramp(n: int, overlap: int, lo: bool, hi: bool) -> np.ndarray:
    r = np.ones(n, np.float32)
    k = min(overlap, n // 2)
    if k > 0:
        edge = (np.arange(k, dtype=np.float32) + 0.5) / k
        if lo:
            r[:k] = edge
        if hi:
            r[n - k:] = edge[::-1]
    return r


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = tile - overlap
    out = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(out))


@torch.no_grad()
def _apply_tiled(fn, x: Tensor, tile: int = AE_TILE, overlap: int = AE_OVERLAP) -> Tensor:
    """fn on (1, C, h, w) tiles of x (1, C, H, W) -> (1, C', H, W), overlapping tiles blended with ramps."""
    _, _, h, w = x.shape
    if h <= tile and w <= tile:
        xp, h0, w0 = _pad4(x)
        return fn(xp)[..., :h0, :w0]
    acc = wsum = None
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = x[..., y0:y0 + tile, x0:x0 + tile]
            xp, h0, w0 = _pad4(part)
            out = fn(xp)[..., :h0, :w0]
            if acc is None:
                acc = torch.zeros(1, out.shape[1], h, w, dtype=out.dtype, device=out.device)
                wsum = torch.zeros(1, 1, h, w, dtype=out.dtype, device=out.device)
            wy = _ramp(h0, overlap, i > 0, i < len(ys) - 1)
            wx = _ramp(w0, overlap, j > 0, j < len(xs) - 1)
            wt = torch.as_tensor(np.outer(wy, wx), dtype=out.dtype, device=out.device)[None, None]
            acc[..., y0:y0 + h0, x0:x0 + w0] += out * wt
            wsum[..., y0:y0 + h0, x0:x0 + w0] += wt
    return acc / wsum


def _ae_change(run, rgb01: np.ndarray, s: int, t: int, strength: float, residual: bool = False) -> np.ndarray:
    """float32 (H, W, 3): ``D'(E_s(x)) + w (x - D_s(E_s(x)))`` in [0, 1] units (not clipped), where D' decodes
    with the interpolated target parameters and w = 1 - strength (w = 1 with ``residual``)."""
    model = _fixed_ae(run, s, t, strength)
    w = 1.0 if residual else 1.0 - strength
    recon = _fixed_ae(run, s, s, 1.0) if w > 0 else None  # D_s(E_s(x)); same encoder
    m, sd = _pre(run)
    mt = torch.as_tensor(m, dtype=torch.float32).view(1, 3, 1, 1).to(run.device)
    st = torch.as_tensor(sd, dtype=torch.float32).view(1, 3, 1, 1).to(run.device)

    def change(xp: Tensor) -> Tensor:  # the output minus the input
        feats = model.encode((xp - mt) / st, None)
        out = model.decode(feats, None) * st + mt
        if recon is not None:
            out = out + w * (xp - (recon.decode(feats, None) * st + mt))
        return out - xp

    h, wd = rgb01.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(rgb01.transpose(2, 0, 1)))[None].to(run.device)
    if h * wd <= AE_MAX_PIXELS:
        out = x + _apply_tiled(change, x)
    else:  # the autoencoder sees a downscaled copy; its change is resized back onto the full image
        f = math.sqrt(AE_MAX_PIXELS / (h * wd))
        small = torch.nn.functional.interpolate(x, size=(max(1, int(h * f)), max(1, int(wd * f))), mode="area")
        y = _apply_tiled(change, small)
        out = x + torch.nn.functional.interpolate(y, size=(h, wd), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).cpu().numpy()


def translate_array(run, rgb: np.ndarray, source: str = "day", target: str = "night", strength: float = 1.0,
                    *, residual: bool = False) -> np.ndarray:
    """:func:`translate` on a uint8 (H, W, 3) array -> uint8 (H, W, 3) (used by the bench).
    ``residual=True`` (feature level only): ``x + D_t(E_s(x)) - D_s(E_s(x))`` at full strength, i.e. the
    original's detail kept (measured worse for day->night, see checkpoints/DAYNIGHT.md)."""
    _check_run(run)
    s, t = _context_ids(run.context_names, source, target)
    strength = _check_strength(strength)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if strength == 0.0 or s == t:
        return rgb.copy()
    x = rgb.astype(np.float32) / 255.0
    if run.config["translator"] == "input":
        a, b = _input_coefficients(run)
        return _affine_translate(x, a, b, s, t, strength)
    return _to_uint8(_ae_change(run, x, s, t, strength, residual))


def translate(run, image: Image.Image, source: str = "day", target: str = "night", strength: float = 1.0
              ) -> Image.Image:
    """Translate a PIL image (any mode, any size up to the limits in the module docstring) from context
    ``source`` to ``target`` with a day/night run; returns an image of the same size (RGB, or RGBA with the
    input's alpha). ``strength`` in [0, 1]: 0 = the input, 1 = full translation."""
    _check_run(run)
    _check_image(image)
    _context_ids(run.context_names, source, target)
    return _finish(image, translate_array(run, to_rgb_array(image), source, target, strength))


def _layer_entry(name: str, channels: list, mean: np.ndarray, std: np.ndarray, names: Sequence[str],
                 units: str) -> dict:
    return {"name": name, "channels": channels, "units": units,
            "mean": {c: [float(v) for v in mean[k]] for k, c in enumerate(names)},
            "std": {c: [float(v) for v in std[k]] for k, c in enumerate(names)}}


def context_parameters(run) -> dict:
    """Per-context, per-channel mean and std of every context layer of a day/night run, for bar charts::

        {"translator": "input" | "feature", "contexts": ["day", "night"],
         "layers": [{"name": "input_norm", "channels": ["R", "G", "B"], "units": "pixel value in [0, 1]",
                     "mean": {"day": [3 floats], "night": [...]}, "std": {"day": [...], "night": [...]}},
                    ...]}

    Input level: one layer, in pixel units (the learned mu_k, sigma_k of CN-Channels). Feature level: one
    entry per norm layer (enc1, enc2, enc3, dec2, dec1), in activation units, channels numbered. Values are
    the layer's statistics (running statistics of ``cn``, learned ones of ``cnx``), read without touching
    the model."""
    _check_run(run)
    names = run.context_names
    layers = []
    with torch.no_grad():
        if run.config["translator"] == "input":
            mean, var = (v.detach().double().cpu().numpy() for v in run.model.input_norm.context_statistics())
            m, sd = _pre(run)
            layers.append(_layer_entry("input_norm", list(RGB), mean * sd + m, np.sqrt(var) * sd, names,
                                       "pixel value in [0, 1]"))
        else:
            for name in run.model.ENCODER + run.model.DECODER:
                mean, var = (v.detach().double().cpu().numpy()
                             for v in run.model.blocks[name]["norm"].context_statistics())
                layers.append(_layer_entry(name, [str(i) for i in range(mean.shape[1])], mean, np.sqrt(var),
                                           names, "activation"))
    return {"translator": run.config["translator"], "contexts": list(names), "layers": layers}


# ============================================================================ baselines
def lab_stats(images: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mean (3,), std (3,)) of CIELAB over all pixels of ``images`` (PIL or uint8 arrays)."""
    from skimage.color import rgb2lab

    px = np.concatenate([rgb2lab(_as_rgb01(im)).reshape(-1, 3) for im in images])
    return px.mean(0), px.std(0)


def _lab_to_rgb01(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65, as skimage.color.rgb2lab) -> sRGB in [0, 1]; out-of-gamut XYZ clipped at 0 silently
    (skimage's lab2rgb does the same but warns on every call)."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    d = 6.0 / 29.0
    xyz = np.where(f > d, f ** 3, 3 * d * d * (f - 4.0 / 29.0)) * np.array([0.95047, 1.0, 1.08883])
    return linear_to_srgb(xyz_to_rgb(np.clip(xyz, 0.0, None)))


def reinhard_array(rgb: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray) -> np.ndarray:
    """Reinhard colour transfer of uint8 (H, W, 3) to the Lab statistics (ref_mean, ref_std) -> uint8."""
    from skimage.color import rgb2lab

    lab = rgb2lab(_as_rgb01(rgb))
    mu, sd = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)
    out = (lab - mu) / np.maximum(sd, 1e-6) * np.asarray(ref_std) + np.asarray(ref_mean)
    return _to_uint8(_lab_to_rgb01(out))


def reinhard(image: Image.Image, reference: Iterable[Any]) -> Image.Image:
    """Reinhard et al. 2001 colour transfer (CIELAB) of ``image`` toward the images ``reference``."""
    _check_image(image)
    mean, std = lab_stats(list(reference))
    return _finish(image, reinhard_array(to_rgb_array(image), mean, std))


def histogram_match_array(rgb: np.ndarray, reference_pixels: np.ndarray) -> np.ndarray:
    """``skimage.exposure.match_histograms`` of uint8 (H, W, 3) to reference pixels uint8 (M, 3) -> uint8."""
    from skimage.exposure import match_histograms

    ref = np.asarray(reference_pixels).reshape(-1, 1, 3)
    return np.clip(np.rint(match_histograms(np.asarray(rgb), ref, channel_axis=-1)), 0, 255).astype(np.uint8)


def histogram_match(image: Image.Image, reference: Iterable[Any]) -> Image.Image:
    """Per-channel histogram matching of ``image`` to all pixels of the images ``reference``."""
    _check_image(image)
    ref = np.concatenate([(to_rgb_array(r) if isinstance(r, Image.Image) else np.asarray(r)).reshape(-1, 3)
                          for r in reference])
    return _finish(image, histogram_match_array(to_rgb_array(image), ref))


# ============================================================================ bundled photos
def training_stats(params: Optional[NightParams | Mapping] = None) -> ContextStats:
    """CN's statistics (eq. 23-24) of the training photos (day) and their night renderings with ``params``
    (a run's ``run.config["renderer"]``; default NightParams()): the no-learning translator of the bench's
    ``cn_statistics`` row, for :func:`translate_with_stats`. ~2 s; cache it."""
    p = params if isinstance(params, NightParams) else NightParams.from_dict(params or {})
    pairs = DayNightPairs(TRAIN_PHOTOS, p)
    st = fit_contexts(pairs.day, pairs.night)
    return ContextStats(st.names, st.mean, st.var, st.counts, source="training photos")


def bundled_image(name: str, context: str = "day", params: Optional[NightParams | Mapping] = None
                  ) -> Image.Image:
    """A photo shipped with scikit-image / scikit-learn (``cbnorm.daynight.PHOTOS``) as a PIL image: the
    photo itself (``context="day"``) or its night rendering with ``params`` (a run's
    ``run.config["renderer"]``; default NightParams()). Held-out photos: ``cbnorm.daynight.HOLDOUT_PHOTOS``."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    day = load_photo(name)
    if context == "day":
        return Image.fromarray(np.array(day), "RGB")
    p = params if isinstance(params, NightParams) else NightParams.from_dict(params or {})
    return Image.fromarray(render_night(day, p, seed=photo_seed(p, name)), "RGB")
