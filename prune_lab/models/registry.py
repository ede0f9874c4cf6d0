"""The model registry: one record per architecture (builder, description, paper, default input shape).

Builders are registered with :func:`register_model`; users call :func:`create` and :func:`list_models`.
Registering a name twice is an error, so two modules cannot silently shadow each other.
"""
from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["ModelInfo", "register_model", "create", "create_for", "list_models", "model_info", "shape_kwargs"]


@dataclass(frozen=True)
class ModelInfo:
    """One registry record.

    Attributes:
        name: the registry key, e.g. ``"mlpnet"``.
        builder: the function that builds the ``nn.Module`` from keyword arguments.
        description: one line saying what the architecture is.
        paper: where it comes from (the paper that uses it in this project).
        input_shape: the default ``(C, H, W)`` of one input sample (without the batch dimension).
        parameters: the keyword arguments the builder accepts, with their defaults.
    """

    name: str
    builder: Callable[..., nn.Module] = field(repr=False)
    description: str
    paper: str
    input_shape: tuple[int, ...]
    parameters: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, description: str, paper: str, input_shape: Sequence[int]):
    """Decorator registering a model builder under ``name``.

    Args:
        name: registry key (lowercase, unique). Registering a name twice raises ``ValueError``.
        description: one line describing the architecture.
        paper: the paper (or papers) the architecture is taken from.
        input_shape: default ``(C, H, W)`` of one sample.

    >>> @register_model("tiny_doc_example", description="a 1-layer net", paper="none", input_shape=(1, 2, 2))
    ... def tiny(num_classes=2):
    ...     return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, num_classes))
    >>> "tiny_doc_example" in list_models()
    True
    >>> _ = _REGISTRY.pop("tiny_doc_example")  # keep the doctest side-effect free
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"model name must be a non-empty string, got {name!r}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].builder.__module__}).")
        params = {
            p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(builder).parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        _REGISTRY[name] = ModelInfo(name, builder, description, paper, shape, params)
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted.

    >>> "mlpnet" in list_models()
    True
    """
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry record of ``name`` (raises ``ValueError`` with suggestions for an unknown name).

    >>> model_info("mlpnet").input_shape
    (1, 28, 28)
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        choices = list_models()
        hint = ""
        if isinstance(name, str):
            close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.4)
            if close:
                hint = f" Did you mean {close[0]!r}?"
        raise ValueError(f"unknown model {name!r}.{hint} Valid choices: {', '.join(choices)}.")
    return _REGISTRY[name]


def create(name: str, *, seed: int | None = None, **kw) -> nn.Module:
    """Build the registered model ``name`` with the builder's keyword arguments ``kw``.

    Args:
        name: a name from :func:`list_models`.
        seed: when given, the weights are initialised under ``torch.manual_seed(seed)`` inside
            ``torch.random.fork_rng``, so the result is reproducible and the global RNG is left untouched.
        **kw: builder arguments (e.g. ``in_features``, ``num_classes``); unknown ones raise ``TypeError``.

    Returns:
        A fresh ``nn.Module`` in training mode.

    >>> net = create("mlpnet", in_features=64, seed=0)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    info = model_info(name)
    unknown = [k for k in kw if k not in info.parameters]
    if unknown:
        accepted = ", ".join(info.parameters) or "(none)"
        raise TypeError(f"create({name!r}) got unexpected argument(s) {', '.join(unknown)}; accepted: {accepted}.")
    if seed is None:
        return info.builder(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return info.builder(**kw)


def shape_kwargs(name: str, input_shape: Sequence[int], num_classes: int | None = None) -> dict:
    """The builder arguments of ``name`` that follow from a data shape: ``in_features`` (= prod of the shape),
    ``in_channels`` (= C), ``input_size`` (= H, for square inputs) and ``num_classes``, each only when the builder
    accepts it.

    >>> shape_kwargs("mlpnet", (1, 8, 8), 10)
    {'in_features': 64, 'num_classes': 10}
    >>> shape_kwargs("conv6", (3, 8, 8), 10)
    {'in_channels': 3, 'input_size': 8, 'num_classes': 10}
    """
    params = model_info(name).parameters
    shape = tuple(int(d) for d in input_shape)
    out: dict = {}
    if "in_features" in params:
        out["in_features"] = int(math.prod(shape))
    if "in_channels" in params:
        if len(shape) != 3:
            raise ValueError(f"model {name!r} expects image inputs (C, H, W), got input_shape={shape}")
        out["in_channels"] = shape[0]
    if "input_size" in params:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"model {name!r} expects square images (C, S, S), got input_shape={shape}")
        out["input_size"] = shape[1]
    if num_classes is not None and "num_classes" in params:
        out["num_classes"] = int(num_classes)
    return out


def create_for(name: str, input_shape: Sequence[int], num_classes: int, *, seed: int | None = None, **kw) -> nn.Module:
    """Build ``name`` sized for data of ``input_shape`` (one sample, e.g. ``(1, 8, 8)``) and ``num_classes``;
    explicit ``kw`` win over the inferred arguments.

    >>> create_for("conv6", (1, 8, 8), 10, seed=0)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    return create(name, seed=seed, **{**shape_kwargs(name, input_shape, num_classes), **kw})
