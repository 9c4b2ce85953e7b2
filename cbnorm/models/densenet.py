"""DenseNets for small images (Huang et al. 2017), the MN and CB-Norm papers' deeper models.

Three dense blocks joined by two transition layers, then a final norm, ReLU, global average pooling and a
linear layer. A dense layer is norm-ReLU-conv3x3 producing ``growth_rate`` channels, concatenated to its
input; with ``bottleneck=True`` it is norm-ReLU-conv1x1 (4k) -norm-ReLU-conv3x3 (k) (DenseNet-B); a
transition is norm-ReLU-conv1x1-avgpool2, compressing channels by ``compression`` (DenseNet-C when < 1).

Reading chosen: ``densenet40`` is DenseNet {L=40, k=12} *without* bottleneck or compression, 12 layers per
block and 16 stem channels, because that is the network whose numbers the MN paper reports: its Table 7
gives 448 input channels to the last normalization layer of DenseNet-40, which is 16 + 3 * 12 * 12 (DenseNet-BC
with L=40 would end with 132). DenseNet-BC is ``densenet_bc100`` (L=100, k=12: 16 bottleneck layers per
block, compression 0.5, 2k stem channels) or any ``DenseNet(depth, bottleneck=True, compression=0.5)``.

Norm paths: ``block{1,2,3}.layer{j}.norm`` (``.norm1`` / ``.norm2`` with bottleneck),
``transition{1,2}.norm``, ``final``. The MN paper's placement is ``norm_layers=("transition*", "final")``;
default: all. Every norm starts as cbnorm's BatchNorm (``base_norm``) and those matched become ``norm``
through ``cbnorm.convert``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RoutedModel, make_norm, place_norm

__all__ = ["DenseNet", "densenet40", "densenet_bc100"]


class DenseLayer(nn.Module):
    """x (N, C, H, W) -> cat([x, new (N, k, H, W)], dim=1)."""

    def __init__(self, c_in: int, growth: int, bottleneck: bool, norm: str, kw: Optional[dict]) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        if bottleneck:
            self.norm1 = make_norm(norm, c_in, kw)
            self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
            self.norm2 = make_norm(norm, 4 * growth, kw)
            self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
        else:
            self.norm = make_norm(norm, c_in, kw)
            self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.bottleneck:
            out = self.conv1(torch.relu(self.norm1(x)))
            out = self.conv2(torch.relu(self.norm2(out)))
        else:
            out = self.conv(torch.relu(self.norm(x)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """norm-ReLU-conv1x1-avgpool2: (N, C_in, H, W) -> (N, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int, norm: str, kw: Optional[dict]) -> None:
        super().__init__()
        self.norm = make_norm(norm, c_in, kw)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(torch.relu(self.norm(x)))
        return F.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class DenseNet(RoutedModel):
    """DenseNet with three dense blocks. x (N, in_channels, H, W) -> logits (N, num_classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, depth: int = 40, growth_rate: int = 12,
                 bottleneck: bool = False, compression: float = 1.0, width: float = 1.0, norm: str = "bn",
                 norm_layers: Sequence[str] | str = ("*",), norm_kwargs: Optional[dict] = None,
                 base_norm: str = "bn", predict_contexts: Optional[int] = None) -> None:
        super().__init__()
        per = 6 if bottleneck else 3
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 4 + per or (depth - 4) % per:
            raise ValueError(f"depth must be 4 + {per}n with n >= 1 for bottleneck={bottleneck} "
                             f"(40 or 100), got {depth!r}")
        if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
            raise ValueError(f"growth_rate must be a positive int, got {growth_rate!r}")
        if not 0.0 < float(compression) <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        n = (depth - 4) // per
        k = max(1, int(round(growth_rate * width)))
        kw = dict(norm_kwargs or {})
        c = 2 * k if bottleneck else max(1, int(round(16 * width)))
        self.conv0 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        for b in range(3):
            layers = []
            for j in range(n):
                layers.append(DenseLayer(c, k, bottleneck, base_norm, kw))
                c += k
            block = nn.Module()
            for j, layer in enumerate(layers):
                block.add_module(f"layer{j + 1}", layer)
            self.add_module(f"block{b + 1}", block)
            if b < 2:
                c_out = max(1, int(c * compression))
                self.add_module(f"transition{b + 1}", Transition(c, c_out, base_norm, kw))
                c = c_out
        self.final = make_norm(base_norm, c, kw)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.depth, self.growth_rate, self.num_final_features, self.in_channels = depth, k, c, in_channels
        self.norm_layers = tuple(place_norm(self, norm, norm_layers, kw))
        self._make_predictor(in_channels, predict_contexts)

    def body(self, x: Tensor) -> Tensor:
        x = self.conv0(x)
        for b in range(3):
            for layer in getattr(self, f"block{b + 1}").children():
                x = layer(x)
            if b < 2:
                x = getattr(self, f"transition{b + 1}")(x)
        x = torch.relu(self.final(x))
        return self.fc(x.mean(dim=(2, 3)))


def densenet40(**kw) -> DenseNet:
    """DenseNet {L=40, k=12} as the MN paper uses it (448 channels into the final norm)."""
    return DenseNet(**{"depth": 40, "growth_rate": 12, **kw})


def densenet_bc100(**kw) -> DenseNet:
    """DenseNet-BC {L=100, k=12}: bottleneck layers and compression 0.5."""
    return DenseNet(**{"depth": 100, "growth_rate": 12, "bottleneck": True, "compression": 0.5, **kw})
