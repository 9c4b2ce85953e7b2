"""CIFAR ResNets of He et al. 2016 (Sec. 4.2), the Mode Normalization paper's models (ResNet-20 / ResNet-56).

A 3x3 convolution with 16 channels, three stages of n basic blocks (16, 32, 64 channels, stride 2 at the
start of stages 2 and 3), global average pooling and a linear layer: depth = 6n + 2. Shortcuts are the
paper's option A (identity, subsampled and zero-padded where the shape changes), so every normalization
layer sits in the main path. ``width`` multiplies the channel counts (1.0 = the paper's).

Norm paths (torchvision's names): ``bn1`` after the stem, ``layer{1,2,3}.{i}.bn1`` / ``.bn2`` in the blocks.
Every norm starts as cbnorm's BatchNorm (``base_norm``) and those matched by ``norm_layers`` (fnmatch
patterns, e.g. ``"layer3.*"``, ``"layer3.*.bn2"``; default: all) become ``norm`` through ``cbnorm.convert``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RoutedModel, make_norm, place_norm

__all__ = ["CifarResNet", "BasicBlock", "resnet20", "resnet56"]


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm plus an option-A shortcut, then ReLU. x (N, C_in, H, W)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, kw: Optional[dict]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, c_out, kw)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, c_out, kw)
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(RoutedModel):
    """ResNet-(6n+2) for small images. x (N, in_channels, H, W) -> logits (N, num_classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, depth: int = 20, width: float = 1.0,
                 norm: str = "bn", norm_layers: Sequence[str] | str = ("*",), norm_kwargs: Optional[dict] = None,
                 base_norm: str = "bn", predict_contexts: Optional[int] = None) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}")
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        n = (depth - 2) // 6
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        kw = dict(norm_kwargs or {})
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = make_norm(base_norm, widths[0], kw)
        c_in = widths[0]
        for s, c in enumerate(widths):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c_in, c, 2 if (s > 0 and i == 0) else 1, base_norm, kw))
                c_in = c
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.depth, self.widths, self.in_channels = depth, widths, in_channels
        self.norm_layers = tuple(place_norm(self, norm, norm_layers, kw))
        self._make_predictor(in_channels, predict_contexts)

    def body(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def resnet20(**kw) -> CifarResNet:
    """ResNet-20 (n = 3), 0.27 M parameters at width 1 (He et al. Table 6)."""
    return CifarResNet(depth=20, **kw)


def resnet56(**kw) -> CifarResNet:
    """ResNet-56 (n = 9), 0.85 M parameters at width 1."""
    return CifarResNet(depth=56, **kw)
