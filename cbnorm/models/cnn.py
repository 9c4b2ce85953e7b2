"""The papers' shallow CNN: the "CIFAR CNN" of mixture-normalization.txt Table 1 (= Table III of
cluster-based-normalization.txt): four conv+norm+ReLU blocks (64, 128, 128, 256 channels times ``width``),
3x3/2 max pools, global average pool, linear.

``norm`` replaces the BatchNorm of the blocks named in ``norm_layers`` (the papers replace "conv3"; "conv2"
is also studied); ``input_norm`` puts a norm on the image channels in front (CN-Channels, or the CB-Norm
paper's "first layer" placement). Norm paths: ``input_norm``, ``blocks.conv1.norm`` ... ``blocks.conv4.norm``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import RoutedModel, make_norm

__all__ = ["ShallowCNN", "CNN_BLOCKS"]

CNN_BLOCKS = ("conv1", "conv2", "conv3", "conv4")


class ShallowCNN(RoutedModel):
    """CIFAR CNN (Table 1 / Table III). x (N, in_channels, H, W) -> logits (N, num_classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, width: float = 1.0, norm: str = "bn",
                 norm_layers: Sequence[str] = ("conv3",), norm_kwargs: Optional[dict] = None,
                 input_norm: Optional[str] = None, base_norm: str = "bn",
                 predict_contexts: Optional[int] = None) -> None:
        super().__init__()
        if isinstance(norm_layers, str):
            norm_layers = (norm_layers,)
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        unknown = set(norm_layers) - set(CNN_BLOCKS)
        if unknown:
            raise ValueError(f"norm_layers must be among {CNN_BLOCKS}, got {sorted(unknown)}")
        kw = dict(norm_kwargs or {})
        widths = [max(4, int(round(c * width))) for c in (64, 128, 128, 256)]
        kernels = (5, 5, 5, 3)
        self.input_norm = make_norm(input_norm, in_channels, kw) if input_norm else None
        blocks = []
        c_in = in_channels
        for name, c, k in zip(CNN_BLOCKS, widths, kernels):
            layer = make_norm(norm if name in norm_layers else base_norm, c, kw)
            blocks.append(nn.ModuleDict({"conv": nn.Conv2d(c_in, c, k, padding=k // 2, bias=False), "norm": layer}))
            c_in = c
        self.blocks = nn.ModuleDict(dict(zip(CNN_BLOCKS, blocks)))
        self.pool = nn.MaxPool2d(3, 2)
        self.head = nn.Linear(c_in, num_classes)
        self.widths = widths
        self.in_channels = in_channels
        self.norm_layers = tuple(n for n in CNN_BLOCKS if n in norm_layers)
        self._make_predictor(in_channels, predict_contexts)

    def body(self, x: Tensor) -> Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        for i, name in enumerate(CNN_BLOCKS):
            block = self.blocks[name]
            x = torch.relu(block["norm"](block["conv"](x)))
            if i < 3:
                x = self.pool(x) if min(x.shape[-2:]) >= 3 else x
        return self.head(x.mean(dim=(2, 3)))
