"""CIFAR ResNets: ResNet-20 (He et al. 2016, §4.2) and ResNet-18 as used by LAMP (3×3 stem, no max-pool).

Names follow torchvision: ``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.shortcut.0`` (1×1 projection), ``fc``.
Residual blocks compute ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["BasicBlock", "PadShortcut", "CifarResNet", "resnet20_cifar", "resnet18_cifar"]


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters).

    Input ``(B, C, H, W)`` → ``(B, C + 2·pad, H/stride, W/stride)``.

    >>> PadShortcut(2, 4)(torch.ones(1, 8, 4, 4)).shape
    torch.Size([1, 16, 2, 2])
    """

    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride = int(stride)
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a shortcut. When the shape changes, the shortcut is a 1×1 conv + BN
    (``shortcut="conv"``, option B) or parameter-free subsampling + zero padding (``shortcut="pad"``, option A);
    otherwise it is the identity (an empty ``nn.Sequential``).

    >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
    torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Sequential()
        elif shortcut == "conv":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        elif shortcut == "pad":
            if planes - in_planes < 0 or (planes - in_planes) % 2:
                raise ValueError(f"pad shortcut needs an even channel increase, got {in_planes} -> {planes}")
            self.shortcut = PadShortcut(stride, (planes - in_planes) // 2)
        else:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid choices: 'conv', 'pad'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet: 3×3 stem conv-BN-ReLU, stages of :class:`BasicBlock`, global average pool, ``fc``.

    Args:
        widths: channels of each stage; the first stage has stride 1, the others stride 2.
        blocks: number of blocks per stage.
        in_channels, num_classes: input channels and classes.
        shortcut: ``"conv"`` (1×1 projection, option B) or ``"pad"`` (option A).

    Input ``(B, in_channels, H, W)`` (32×32 for CIFAR); output ``(B, num_classes)``.

    >>> CifarResNet((4, 8), (1, 1))(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, widths, blocks, in_channels: int = 3, num_classes: int = 10, shortcut: str = "conv"):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths and blocks must have the same non-zero length, got {widths}, {blocks}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_planes, width, stride, shortcut))
                in_planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):  # a fixed Python loop: unrolled by torch.fx, no data dependence
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


@register_model(
    "resnet20_cifar",
    description="ResNet-20 for CIFAR (16-32-64 channels, 3x3 blocks), 1x1-conv shortcuts by default",
    paper="He et al. 2016 (CIFAR ResNet); LAMP (Lee et al., ICLR 2021)",
    input_shape=(3, 32, 32),
)
def resnet20_cifar(in_channels: int = 3, num_classes: int = 10, shortcut: str = "conv") -> CifarResNet:
    """ResNet-20: stem + 3 stages × 3 basic blocks (16, 32, 64 channels) + fc. ``shortcut="conv"`` (default) uses
    1×1 conv + BN projections where the shape changes (so every path is made of prunable layers);
    ``shortcut="pad"`` is He et al.'s parameter-free option A.

    >>> resnet20_cifar()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return CifarResNet((16, 32, 64), (3, 3, 3), in_channels=in_channels, num_classes=num_classes, shortcut=shortcut)


@register_model(
    "resnet18_cifar",
    description="ResNet-18 for CIFAR: 3x3 stem, no max-pool, 64-128-256-512, 1x1-conv shortcuts",
    paper="He et al. 2016; LAMP (Lee et al., ICLR 2021)",
    input_shape=(3, 32, 32),
)
def resnet18_cifar(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-18 as used on CIFAR-10 by LAMP: 3×3 stride-1 stem without max-pool, 4 stages × 2 basic blocks
    (64, 128, 256, 512 channels), 1×1-conv shortcuts, global average pool, fc.

    >>> resnet18_cifar()(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes)
