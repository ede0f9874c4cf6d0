"""Plain convolutional models: Conv-6 (LAP, after Frankle & Carbin) and VGG-16 with BatchNorm (LAMP).

Both are ``features`` (an ``nn.Sequential`` of convolutions) → ``flatten`` → ``classifier``; parameter names read
``features.0.weight``, ``classifier.0.weight`` (Conv-6) or ``classifier.weight`` (VGG-16).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import register_model

__all__ = ["Conv6", "VGG", "conv6", "vgg16_cifar"]


class Conv6(nn.Module):
    """Conv-6: conv64-conv64-pool-conv128-conv128-pool-conv256-conv256-pool-fc256-fc256-fc(num_classes).

    3×3 convolutions with padding 1 and ReLU, 2×2 max-pooling, no BatchNorm. The first linear layer reads
    ``256 · (input_size // 8)²`` features, so the net runs on 32×32 (default), 28×28 or 8×8 inputs.
    Input ``(B, in_channels, input_size, input_size)``; output ``(B, num_classes)``.

    >>> Conv6(in_channels=1, input_size=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32):
        super().__init__()
        if int(input_size) < 8:
            raise ValueError(f"Conv6 needs input_size >= 8 (three 2x2 poolings), got {input_size}")
        layers: list[nn.Module] = []
        c = int(in_channels)
        for width in (64, 128, 256):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            c = width
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        side = int(input_size) // 8
        self.classifier = nn.Sequential(
            nn.Linear(256 * side * side, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model(
    "conv6",
    description="Conv-6: 6 conv (64-64-128-128-256-256) + 3 fc (256-256-10), no BN",
    paper="LAP (Park et al., ICLR 2020); Frankle & Carbin 2019",
    input_shape=(3, 32, 32),
)
def conv6(in_channels: int = 3, num_classes: int = 10, input_size: int = 32) -> Conv6:
    """Conv-6 for ``input_size``×``input_size`` images (32 for CIFAR-10; 28 and 8 work too).

    >>> conv6()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return Conv6(in_channels=in_channels, num_classes=num_classes, input_size=input_size)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: ``features`` (conv3×3-BN-ReLU blocks, 2×2 max-pool at each ``"M"``), then one
    ``classifier`` Linear(512 → num_classes). Input ``(B, in_channels, 32, 32)``; output ``(B, num_classes)``.

    >>> VGG((8, "M"), in_channels=1)(torch.zeros(2, 1, 2, 2)).shape
    torch.Size([2, 10])
    """

    def __init__(self, cfg: Sequence = _VGG16, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = int(in_channels)
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model(
    "vgg16_cifar",
    description="VGG-16 with BatchNorm for 32x32 inputs, one Linear 512 -> num_classes",
    paper="Simonyan & Zisserman 2015; LAMP (Lee et al., ICLR 2021)",
    input_shape=(3, 32, 32),
)
def vgg16_cifar(in_channels: int = 3, num_classes: int = 10) -> VGG:
    """VGG-16 (13 conv3×3 without bias + BN, 5 max-pools) and a single Linear(512, num_classes); 32×32 inputs.

    >>> vgg16_cifar()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return VGG(_VGG16, in_channels=in_channels, num_classes=num_classes)
