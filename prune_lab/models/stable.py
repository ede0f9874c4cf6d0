"""Stable ResNet (Hayou et al., ICLR 2021): a CIFAR-style ResNet whose residual branches are scaled by ``1/√L``
(``L`` = number of residual blocks), ``y ← shortcut(y) + F(y)/√L``, and its plain counterpart (the same network
with branch scale 1) for comparison.

Blocks: ``F(y) = bn2(conv2(relu(bn1(conv1(y)))))``; the shortcut is the identity, or a 1×1 conv + BN where the
shape changes (so every path is made of prunable layers). Stem: 3×3 conv-BN-ReLU; head: ReLU, global average pool,
``fc``. Weights start at ``N(0, 2/fan_in)`` (the ReLU edge of chaos). Names follow torchvision: ``conv1``,
``layer1.0.conv1``, ``layer2.0.shortcut.0``, ``fc``. Traceable by ``torch.fx``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .registry import register_model

__all__ = ["StableBlock", "StableResNet", "stable_resnet", "plain_resnet"]


class StableBlock(nn.Module):
    """``shortcut(x) + scale · bn2(conv2(relu(bn1(conv1(x)))))``; input ``(B, in_planes, H, W)`` →
    ``(B, planes, H/stride, W/stride)``.

    >>> StableBlock(4, 8, stride=2, scale=0.5)(torch.zeros(1, 4, 8, 8)).shape
    torch.Size([1, 8, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, scale: float = 1.0, batchnorm: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=not batchnorm)
        self.bn2 = norm(planes)
        self.scale = float(scale)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=not batchnorm),
                                          norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.shortcut(x) + branch * self.scale


class StableResNet(nn.Module):
    """A CIFAR-style ResNet of ``depth = 6n + 2`` layers (three stages of ``n`` blocks, widths ``w, 2w, 4w``).

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, …); ``L = 3n`` residual blocks.
        width: channels of the first stage.
        stable: scale each residual branch by ``1/√L`` (Stable ResNet); ``False`` gives the plain ResNet.
        batchnorm: BatchNorm after every conv (``False``: biases instead).

    Input ``(B, in_channels, H, W)`` (any size ≥ 4×4); output ``(B, num_classes)``.

    >>> net = StableResNet(depth=8, width=4, in_channels=1)
    >>> net.num_blocks, round(net.branch_scale, 4), net(torch.zeros(2, 1, 8, 8)).shape
    (3, 0.5774, torch.Size([2, 10]))
    """

    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 3, num_classes: int = 10,
                 stable: bool = True, batchnorm: bool = True):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, …), got {depth!r}.")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}.")
        n = (depth - 2) // 6
        self.num_blocks = 3 * n
        self.branch_scale = 1.0 / math.sqrt(self.num_blocks) if stable else 1.0
        self.stable = bool(stable)
        norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=not batchnorm)
        self.bn1 = norm(width)
        self.relu = nn.ReLU()
        in_planes = width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(StableBlock(in_planes, planes, stride, self.branch_scale, batchnorm))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.head_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight[0].numel()))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(self.head_relu(x))))


@register_model(
    "stable_resnet",
    description="Stable ResNet (CIFAR-style, depth 6n+2): residual branches scaled by 1/sqrt(L)",
    paper="RPI (Hayou et al., ICLR 2021)",
    input_shape=(3, 32, 32),
)
def stable_resnet(depth: int = 20, width: int = 16, in_channels: int = 3, num_classes: int = 10,
                  batchnorm: bool = True) -> StableResNet:
    """Stable ResNet-``depth``: ``y ← shortcut(y) + F(y)/√L`` with ``L = (depth − 2)/2`` blocks.

    >>> stable_resnet(depth=8, width=4)(torch.zeros(1, 3, 8, 8)).shape
    torch.Size([1, 10])
    """
    return StableResNet(depth, width, in_channels, num_classes, stable=True, batchnorm=batchnorm)


@register_model(
    "plain_resnet",
    description="the plain counterpart of stable_resnet (branch scale 1), same layers and init",
    paper="RPI (Hayou et al., ICLR 2021), baseline",
    input_shape=(3, 32, 32),
)
def plain_resnet(depth: int = 20, width: int = 16, in_channels: int = 3, num_classes: int = 10,
                 batchnorm: bool = True) -> StableResNet:
    """The same network as :func:`stable_resnet` with unscaled residual branches, ``y ← shortcut(y) + F(y)``.

    >>> plain_resnet(depth=8, width=4).branch_scale
    1.0
    """
    return StableResNet(depth, width, in_channels, num_classes, stable=False, batchnorm=batchnorm)
