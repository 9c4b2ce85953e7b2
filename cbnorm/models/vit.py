"""A small Vision Transformer whose patch tokens (N, L, D) go through a norm with ``channel_last=True`` right
after the patch embedding (CN-Patches, context-normalization.txt IV). Norm path: ``patch_norm``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import RoutedModel, make_norm

__all__ = ["SmallViT"]


class SmallViT(RoutedModel):
    """A small ViT. x (N, C, H, W) -> patches (N, L, D) -> ``patch_norm`` (channel_last) -> encoder -> logits."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, image_size: int = 32, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, patch_norm: str = "ln",
                 norm_kwargs: Optional[dict] = None, dropout: float = 0.0,
                 predict_contexts: Optional[int] = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        n_patches = (image_size // patch_size) ** 2
        self.patch_norm = make_norm(patch_norm, dim, dict(norm_kwargs or {}), channel_last=True)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.image_size, self.in_channels = image_size, in_channels
        self._make_predictor(in_channels, predict_contexts)

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels \
                or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got shape {shape}")

    def body(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
        tokens = self.patch_norm(tokens)  # CN-Patches
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))
