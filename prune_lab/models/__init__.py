"""The model zoo: ``create(name, **kw)``, ``list_models()`` and the architectures of the four papers.

>>> from prune_lab import models
>>> net = models.create("mlpnet", in_features=64, seed=0)
>>> [name for name, _ in net.named_parameters()]
['fc1.weight', 'fc2.weight', 'fc3.weight']

Every model is traceable by ``torch.fx.symbolic_trace`` and accepts ``(B, C, H, W)`` batches (MLPs flatten them).
"""
from .registry import ModelInfo, create, create_for, list_models, model_info, register_model, shape_kwargs
from .mlp import MLP, ffnn, fcn, lenet_300_100, mlpnet
from .conv import VGG, Conv6, conv6, vgg16_cifar
from .resnet import BasicBlock, CifarResNet, PadShortcut, resnet18_cifar, resnet20_cifar
from .stable import StableBlock, StableResNet, plain_resnet, stable_resnet
from .hf import causal_lm_exclude, conv1d_to_linear

__all__ = [
    "ModelInfo", "create", "create_for", "list_models", "model_info", "register_model", "shape_kwargs",
    "MLP", "Conv6", "VGG", "CifarResNet", "BasicBlock", "PadShortcut",
    "mlpnet", "fcn", "lenet_300_100", "ffnn", "conv6", "vgg16_cifar", "resnet20_cifar", "resnet18_cifar",
    "StableBlock", "StableResNet", "plain_resnet", "stable_resnet", "causal_lm_exclude", "conv1d_to_linear",
]
