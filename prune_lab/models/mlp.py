"""Fully connected models: MLPNet (CBS), FCN (LAP), LeNet-300-100 and the deep narrow FFNN (RPI).

Every model is an ``nn.Sequential`` whose first module is ``flatten``, so it accepts image batches
``(B, C, H, W)`` as well as flat batches ``(B, in_features)``. Layers are named ``fc1, fc2, ...``; parameter
names read ``fc1.weight``, ``fc2.bias`` and so on.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .registry import register_model

__all__ = ["MLP", "mlpnet", "fcn", "lenet_300_100", "ffnn"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """``flatten → fc1 → act1 → fc2 → act2 → … → fcL`` (no activation after the last layer).

    Args:
        sizes: layer widths including input and output, e.g. ``(784, 40, 20, 10)``.
        bias: whether the linear layers have biases.
        activation: ``"relu"`` or ``"tanh"``.

    Input ``(B, *)`` with ``prod(*) == sizes[0]``; output ``(B, sizes[-1])`` logits.

    >>> MLP((4, 3, 2))(torch.zeros(5, 1, 2, 2)).shape
    torch.Size([5, 2])
    """

    def __init__(self, sizes: Sequence[int], *, bias: bool = True, activation: str = "relu"):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes must hold at least two positive ints (input and output), got {sizes}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid choices: {', '.join(_ACTIVATIONS)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        n = len(sizes) - 1
        for i in range(n):
            layers[f"fc{i + 1}"] = nn.Linear(sizes[i], sizes[i + 1], bias=bias)
            if i < n - 1:
                layers[f"{activation}{i + 1}"] = _ACTIVATIONS[activation]()
        super().__init__(layers)
        self.sizes = tuple(sizes)


@register_model(
    "mlpnet",
    description="MLPNet 784-40-20-10, ReLU, no biases",
    paper="CBS (Yu et al., ICML 2022); WoodFisher (Singh & Alistarh, 2020)",
    input_shape=(1, 28, 28),
)
def mlpnet(in_features: int = 784, num_classes: int = 10) -> MLP:
    """MLPNet: ``in_features-40-20-num_classes``, ReLU, no biases. Input ``(B, 1, 28, 28)`` or ``(B, 784)``.

    >>> sum(p.numel() for p in mlpnet().parameters())
    32360
    """
    return MLP((in_features, 40, 20, num_classes), bias=False)


@register_model(
    "fcn",
    description="FCN 784-500-500-500-500-10, ReLU",
    paper="LAP (Park et al., ICLR 2020), Table 1",
    input_shape=(1, 28, 28),
)
def fcn(in_features: int = 784, num_classes: int = 10, hidden: int = 500) -> MLP:
    """LAP's FCN: ``in_features`` → four hidden layers of ``hidden`` units → ``num_classes``, ReLU, with biases.

    >>> fcn(in_features=64, hidden=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    return MLP((in_features, hidden, hidden, hidden, hidden, num_classes), bias=True)


@register_model(
    "lenet_300_100",
    description="LeNet-300-100: 784-300-100-10, ReLU",
    paper="LeCun et al. 1998; Han et al. 2015; LAMP (Lee et al., ICLR 2021)",
    input_shape=(1, 28, 28),
)
def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> MLP:
    """LeNet-300-100: ``in_features-300-100-num_classes``, ReLU, with biases.

    >>> lenet_300_100()(torch.zeros(2, 784)).shape
    torch.Size([2, 10])
    """
    return MLP((in_features, 300, 100, num_classes), bias=True)


@register_model(
    "ffnn",
    description="deep narrow fully connected net (depth hidden layers of equal width)",
    paper="RPI (Hayou et al., ICLR 2021)",
    input_shape=(1, 28, 28),
)
def ffnn(
    depth: int = 20,
    width: int = 100,
    in_features: int = 784,
    num_classes: int = 10,
    activation: str = "relu",
    bias: bool = True,
    sigma_w: float | None = None,
    sigma_b: float | None = None,
) -> MLP:
    """Deep narrow FFNN: ``depth`` hidden layers of ``width`` units (so ``depth + 1`` linear layers).

    Args:
        depth: number of hidden layers (>= 1).
        width: units per hidden layer.
        activation: ``"relu"`` or ``"tanh"``.
        bias: linear layers with biases.
        sigma_w, sigma_b: when ``sigma_w`` is given, initialise every weight ``W ~ N(0, sigma_w² / fan_in)`` and every
            bias ``b ~ N(0, sigma_b²)`` (``sigma_b`` defaults to 0). The ReLU edge of chaos is ``(sigma_b, sigma_w) =
            (0, √2)``; smaller ``sigma_w`` is the ordered phase. ``None`` keeps PyTorch's default init.

    >>> net = ffnn(depth=3, width=16, in_features=64, sigma_w=2 ** 0.5)
    >>> [name for name, _ in net.named_parameters()][:2]
    ['fc1.weight', 'fc1.bias']
    """
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1 (number of hidden layers), got {depth}")
    net = MLP((in_features, *([width] * int(depth)), num_classes), bias=bias, activation=activation)
    if sigma_w is not None:
        if sigma_w <= 0:
            raise ValueError(f"sigma_w must be positive, got {sigma_w}")
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, float(sigma_w) / math.sqrt(module.in_features))
                    if module.bias is not None:
                        if sigma_b:
                            module.bias.normal_(0.0, float(sigma_b))
                        else:
                            module.bias.zero_()
    elif sigma_b is not None:
        raise ValueError("sigma_b needs sigma_w (the EOC init sets both)")
    return net
