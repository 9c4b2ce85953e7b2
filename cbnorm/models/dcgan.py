"""DCGAN (Radford et al. 2016) sized for 28x28 grey and 32x32 colour images: the GAN experiments of
mixture-normalization.txt Sec. 4.5 (Fig. 6-7) and prior-knowledge-normalization.txt Sec. IV-B (Fig. 5-6).

Generator (the papers' "one linear and four deconvolution layers, the first three ... followed by
normalization and ReLU")::

    z (N, latent_dim) -> linear -> (8w, s0, s0)                       s0 = 3 (28x28) or 4 (32x32)
      deconv1 -> norm1 -> ReLU    (4w, 7, 7)   | (4w, 8, 8)
      deconv2 -> norm2 -> ReLU    (2w, 14, 14) | (2w, 16, 16)
      deconv3 -> norm3 -> ReLU    (w, 28, 28)  | (w, 32, 32)
      deconv4 (3x3, stride 1) -> tanh          (C, H, W) in [-1, 1]

Norm paths: ``norm1``, ``norm2``, ``norm3``. Every norm starts as cbnorm's BatchNorm (``base_norm``) and those
matched by ``norm_layers`` (fnmatch patterns; default all) become ``norm`` through ``cbnorm.convert``: the MN
paper replaces the norms of the first two deconvolutions (``norm_layers=("norm1", "norm2")``).

Discriminator (DCGAN's: strided convolutions, LeakyReLU 0.2, BatchNorm except on the input layer; torch's
BatchNorm2d, it is not studied)::

    x (N, C, H, W) -> conv 4x4/2 (w) -> conv 4x4/2 (2w) -> BN -> conv 3x3/2 (4w) -> BN -> linear -> logit (N,)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..convert import route_contexts
from .base import make_norm, norm_layers_of, place_norm

__all__ = ["DCGANGenerator", "DCGANDiscriminator", "GAN_MODELS", "GENERATOR_NORMS", "START_SIZES", "check_gan_config"]

#: image side -> side of the linear layer's output (three 2x upsamplings reach the image side)
START_SIZES = {28: 3, 32: 4}
#: the generator's norm paths, in forward order
GENERATOR_NORMS = ("norm1", "norm2", "norm3")
MAX_LATENT_DIM = 4096


def _positive_int(name: str, v, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
        raise ValueError(f"{name} must be a positive int{'' if hi is None else f' <= {hi}'}, got {v!r}")
    return v


def _image_size(v) -> int:
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    if v not in START_SIZES or isinstance(v, bool):
        raise ValueError(f"image_size must be one of {sorted(START_SIZES)} (square images), got {v!r}")
    return int(v)


class DCGANGenerator(nn.Module):
    """z (N, latent_dim) -> images (N, out_channels, image_size, image_size) in [-1, 1] (tanh)."""

    def __init__(self, latent_dim: int = 64, out_channels: int = 1, image_size: int = 28, *, width: int = 16,
                 norm: str = "bn", norm_layers: Sequence[str] | str = ("*",), norm_kwargs: Optional[dict] = None,
                 base_norm: str = "bn") -> None:
        super().__init__()
        self.latent_dim = _positive_int("latent_dim", latent_dim, MAX_LATENT_DIM)
        self.out_channels = _positive_int("out_channels", out_channels, 64)
        self.image_size = _image_size(image_size)
        self.width = w = _positive_int("width", width, 1024)
        s0 = self.s0 = START_SIZES[self.image_size]
        kw = dict(norm_kwargs or {})
        self.linear = nn.Linear(self.latent_dim, 8 * w * s0 * s0)
        # 28: 3 -> 7 (k3, s2, p0) -> 14 -> 28; 32: 4 -> 8 -> 16 -> 32 (k4, s2, p1)
        first = (3, 2, 0) if self.image_size == 28 else (4, 2, 1)
        self.deconv1 = nn.ConvTranspose2d(8 * w, 4 * w, *first, bias=False)
        self.norm1 = make_norm(base_norm, 4 * w, kw)
        self.deconv2 = nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False)
        self.norm2 = make_norm(base_norm, 2 * w, kw)
        self.deconv3 = nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False)
        self.norm3 = make_norm(base_norm, w, kw)
        self.deconv4 = nn.ConvTranspose2d(w, self.out_channels, 3, 1, 1)
        for m in self.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)  # DCGAN's initialisation
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.norm_layers = tuple(place_norm(self, norm, norm_layers, kw))

    @property
    def uses_context(self) -> bool:
        return any(m.uses_context for m in norm_layers_of(self).values())

    def check_input(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be (N, {self.latent_dim}) latent vectors, got shape {shape}")

    def forward(self, z: Tensor, context: Optional[Tensor] = None) -> Tensor:
        self.check_input(z)
        with route_contexts(self, context):
            x = self.linear(z).view(z.shape[0], 8 * self.width, self.s0, self.s0)
            x = torch.relu(self.norm1(self.deconv1(x)))
            x = torch.relu(self.norm2(self.deconv2(x)))
            x = torch.relu(self.norm3(self.deconv3(x)))
            return torch.tanh(self.deconv4(x))


class DCGANDiscriminator(nn.Module):
    """images (N, in_channels, image_size, image_size) in [-1, 1] -> logits (N,) (real > 0)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, *, width: int = 16) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels, 64)
        self.image_size = _image_size(image_size)
        w = self.width = _positive_int("width", width, 1024)
        self.features = nn.Sequential(
            nn.Conv2d(self.in_channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2))
        self.head = nn.Linear(4 * w * 4 * 4, 1)  # 28 -> 14 -> 7 -> 4; 32 -> 16 -> 8 -> 4
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size,
                                                                         self.image_size):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, {self.in_channels}, {self.image_size}, {self.image_size}), got {shape}")
        return self.head(self.features(x).flatten(1)).squeeze(1)


#: generator name -> constructor (task "gan" runs: config "model" names the generator)
GAN_MODELS: dict[str, Callable[..., nn.Module]] = {"dcgan": DCGANGenerator}


def check_gan_config(config: dict) -> None:
    """The parts of a task "gan" run's config.json that cbnorm.runs does not check: ``latent`` {"dim",
    "num_fixed"} matching the generator's ``latent_dim``, ``preprocessing`` matching its output (channels,
    image size), ``evaluation`` a JSON object, ``class_names`` (the feature classifier's classes) a list.
    ``ValueError`` naming the key."""
    kw = config["model"].get("kwargs") or {}
    lat = config.get("latent")
    if not isinstance(lat, dict) or isinstance(lat.get("dim"), bool) or not isinstance(lat.get("dim"), int) \
            or not 1 <= lat["dim"] <= MAX_LATENT_DIM:
        raise ValueError(f"config.json 'latent' of a gan run must be {{\"dim\": 1..{MAX_LATENT_DIM}, ...}}, "
                         f"got {lat!r}")
    if kw.get("latent_dim", 64) != lat["dim"]:
        raise ValueError(f"config.json latent.dim {lat['dim']} differs from model.kwargs.latent_dim "
                         f"{kw.get('latent_dim', 64)}")
    pre = config["preprocessing"]
    if int(pre["channels"]) != kw.get("out_channels", 1):
        raise ValueError(f"config.json preprocessing.channels {pre['channels']} differs from the generator's "
                         f"out_channels {kw.get('out_channels', 1)}")
    side = kw.get("image_size", 28)
    if [int(s) for s in pre["image_size"]] != [side, side]:
        raise ValueError(f"config.json preprocessing.image_size {pre['image_size']} differs from the generator's "
                         f"image_size {side}")
    if not isinstance(config.get("evaluation", {}), dict):
        raise ValueError("config.json 'evaluation' of a gan run must be a JSON object")
    names = config.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("config.json 'class_names' of a gan run must be a list of strings")
