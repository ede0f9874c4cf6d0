"""The data batch of a data-driven method, with errors that name the method and the problem (no data, empty data,
data of the wrong kind) before any score is computed from it."""
from __future__ import annotations

import torch

from ..data import calibration_batch, resolve_dataset

__all__ = ["method_batch"]


def _is_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def method_batch(data, n: int, *, method: str | None, seed: int = 0, whole_pair: bool = True) -> tuple:
    """``(inputs, targets)`` for ``method`` from ``data``: an ``(inputs, targets)`` pair is validated and used whole
    (``whole_pair``) or sampled like any dataset; a bundle, dataset or ``DataLoader`` gives a seeded sample of
    ``n`` training examples. ``ValueError`` naming ``method`` when there is no data or it is empty (scores from an
    empty batch would be all zero: a silently arbitrary mask).

    >>> x, y = method_batch((torch.zeros(3, 4), torch.tensor([0, 1, 1])), 256, method="snip")
    >>> x.shape
    torch.Size([3, 4])
    """
    who = f"method {method!r}" if method else "scoring"
    if data is None:
        raise ValueError(f"{who} needs data (a batch, a DataLoader or a prune_lab dataset); pass "
                         f"data=... to the session or to prune().")
    try:
        if _is_pair(data) and whole_pair:
            resolve_dataset(data, what="data")  # validates shapes, label dtype and emptiness
            x, y = data
        else:
            x, y = calibration_batch(data, n=int(n), split="train", seed=seed)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{who}: {exc}") from exc
    if x.shape[0] == 0:
        raise ValueError(f"{who}: data is empty (0 samples); it needs at least one.")
    return x, y
