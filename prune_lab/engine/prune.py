"""One-call entry points: ``prune`` and ``score`` (a fresh session each call; use PruneSession to prune many times)."""
from __future__ import annotations

from torch import nn

from .result import PruneResult
from .session import PruneSession


def prune(model: nn.Module, method: str, sparsity: float, *, allocation: str | None = None, data=None, seed: int = 0,
          masks=None, device="auto", include=None, exclude=None, **hp) -> PruneResult:
    """Prune ``model``'s Linear/Conv weights to ``sparsity`` (fraction removed) with ``method``.

    The model is not changed; the result holds the masks (``{name: BoolTensor}``, True = kept).

    >>> import torch, prune_lab as pl
    >>> m = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    >>> res = pl.prune(m, "global_magnitude", 0.8)
    >>> round(res.sparsity, 2), res.masks["0.weight"].shape
    (0.8, torch.Size([10, 10]))
    """
    session = PruneSession(model, data, device=device, include=include, exclude=exclude)
    return session.prune(method, sparsity, allocation=allocation, seed=seed, masks=masks, **hp)


def score(model: nn.Module, method: str, *, data=None, seed: int = 0, device="auto", include=None, exclude=None,
          **hp) -> dict:
    """Raw per-weight scores ``{name: Tensor}`` of ``method`` (higher = keep), in the weights' shapes.

    >>> import torch, prune_lab as pl
    >>> s = pl.score(torch.nn.Sequential(torch.nn.Linear(3, 2)), "magnitude")
    >>> s["0.weight"].shape
    torch.Size([2, 3])
    """
    session = PruneSession(model, data, device=device, include=include, exclude=exclude)
    return session.scores(method, seed=seed, **hp)
