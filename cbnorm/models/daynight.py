"""Day <-> night translators (cbnorm.daynight.transfer, task "daynight"): input-level CN in front of a siamese CNN;
a conv autoencoder with context norms. They pass context ids to their layers explicitly (the encoder and the
decoder take different contexts), the layers' own ``layer(x, context=ids)`` API."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import make_norm as _make_norm

__all__ = ["DayNightSiamese", "DayNightAutoencoder", "DAYNIGHT_MODELS"]


class DayNightSiamese(nn.Module):
    """Input-level translator (context-normalization.txt IV-E, "American night"): a context norm on the 3 image
    channels (CN-Channels; ``input_norm``, context 0 = day, 1 = night) in front of a small CNN that embeds a
    crop; two crops go through the same network (siamese) and a contrastive loss pulls the embeddings of the
    same scene in both contexts together. x (N, 3, H, W) in [0, 1] -> embeddings (N, embed_dim).

    After training, the per-context (mean, var) of ``input_norm`` translate an image between the contexts
    (cbnorm.daynight.transfer). No other normalization layer, and embeddings are not length-normalized, so that the
    network cannot become blind to brightness and colour by itself: the input norm has to align the contexts.
    """

    def __init__(self, in_channels: int = 3, *, num_contexts: int = 2, input_norm: str = "cnx",
                 norm_kwargs: Optional[dict] = None, width: int = 16, embed_dim: int = 32) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        kw = {"num_contexts": num_contexts, **dict(norm_kwargs or {})}
        self.input_norm = _make_norm(input_norm, in_channels, kw)
        if not self.input_norm.uses_context:
            raise ValueError(f"input_norm must be a context layer (cn, cnx, cn-embed), got {input_norm!r}")
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, embed_dim)
        self.in_channels, self.num_contexts = in_channels, num_contexts
        self.norm_layers = ("input_norm",)
        self.uses_context = True

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        return self.head(self.features(self.input_norm(x, context=context)))


class DayNightAutoencoder(nn.Module):
    """Feature-level translator: a small convolutional U-Net-style autoencoder whose normalization layers are
    context layers. The encoder's layers (``enc1..enc3``) normalize with the *source* context, the decoder's
    (``dec2, dec1``) with the *target* context: ``forward(x, context=src, target_context=tgt)``; the default
    target is the source (reconstruction). x (N, 3, H, W) in [0, 1] -> (N, 3, H, W) in [0, 1] units (not
    clamped). H and W must be multiples of 4 (cbnorm.daynight.transfer pads).
    """

    ENCODER = ("enc1", "enc2", "enc3")
    DECODER = ("dec2", "dec1")

    def __init__(self, in_channels: int = 3, *, num_contexts: int = 2, norm: str = "cn",
                 norm_kwargs: Optional[dict] = None, width: int = 16) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        kw = {"num_contexts": num_contexts, **dict(norm_kwargs or {})}
        w = width
        conv = {"enc1": nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
                "enc2": nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
                "enc3": nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=False),
                "dec2": nn.Conv2d(4 * w, 2 * w, 3, padding=1, bias=False),
                "dec1": nn.Conv2d(3 * w, w, 3, padding=1, bias=False)}
        chans = {"enc1": w, "enc2": 2 * w, "enc3": 2 * w, "dec2": 2 * w, "dec1": w}
        self.blocks = nn.ModuleDict({k: nn.ModuleDict({"conv": conv[k], "norm": _make_norm(norm, chans[k], kw)})
                                     for k in self.ENCODER + self.DECODER})
        if not all(b["norm"].uses_context for b in self.blocks.values()):
            raise ValueError(f"norm must be a context layer (cn, cnx, cn-embed), got {norm!r}")
        self.out = nn.Conv2d(w, in_channels, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.in_channels, self.num_contexts = in_channels, num_contexts
        self.norm_layers = tuple(f"blocks.{k}.norm" for k in self.ENCODER + self.DECODER)
        self.uses_context = True

    def _block(self, name: str, x: Tensor, context: Optional[Tensor]) -> Tensor:
        b = self.blocks[name]
        return torch.relu(b["norm"](b["conv"](x), context=context))

    def encode(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W) with H, W multiples of 4, "
                             f"got shape {tuple(x.shape)}")
        e1 = self._block("enc1", x, context)
        e2 = self._block("enc2", e1, context)
        return e1, e2, self._block("enc3", e2, context)

    def decode(self, feats: tuple[Tensor, Tensor, Tensor], context: Optional[Tensor]) -> Tensor:
        e1, e2, e3 = feats
        d2 = self._block("dec2", torch.cat([self.up(e3), e2], dim=1), context)
        d1 = self._block("dec1", torch.cat([self.up(d2), e1], dim=1), context)
        return self.out(d1)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, target_context: Optional[Tensor] = None
                ) -> Tensor:
        return self.decode(self.encode(x, context), context if target_context is None else target_context)


#: models of task "daynight" (cbnorm.runs, cbnorm.train.daynight)
DAYNIGHT_MODELS = {"daynight_siamese": DayNightSiamese, "daynight_ae": DayNightAutoencoder}
