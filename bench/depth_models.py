"""A researcher's model and data for the depth studies (bench/depth.py, bench/depth_causes.py, the depth test):
kuangliu/pytorch-cifar's ResNet18, copied as a user would (plain torch BatchNorm2d, no cbnorm), with a width
argument, and Fashion-MNIST minibatches padded to 32 x 32 and repeated to 3 channels."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """kuangliu's ResNet18 (x (N, 3, 32, 32) -> logits (N, 10)); ``width`` 64 is the original."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, 2, 1)
        self.layer2 = self._make_layer(2 * width, 2, 2)
        self.layer3 = self._make_layer(4 * width, 2, 2)
        self.layer4 = self._make_layer(8 * width, 2, 2)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def fashion_arrays(split: str = "train"):
    """Fashion-MNIST (images uint8 (N, 28, 28), labels (N,)) from cbnorm.data (Debian's package or the shipped
    test split)."""
    from cbnorm.data import load_dataset

    ds = load_dataset("fashion-mnist", split)
    return ds.images, ds.labels


def to_input(images: np.ndarray, channels: int = 3, pad: int = 2) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, channels, 28 + 2 pad, ...), standardized with Fashion-MNIST's mean/std."""
    x = (torch.from_numpy(np.ascontiguousarray(images)).float().div(255) - 0.2860) / 0.3530
    return F.pad(x, (pad,) * 4)[:, None].repeat(1, channels, 1, 1)


def fashion_batches(batch_size: int, seed: int, split: str = "train", channels: int = 3,
                    pad: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled minibatches (x (B, channels, 32, 32), y (B,)), reshuffled each epoch with ``seed``."""
    images, labels = fashion_arrays(split)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(labels))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = np.sort(order[i:i + batch_size])
            yield to_input(images[idx], channels, pad), torch.from_numpy(labels[idx].astype(np.int64))
