"""What the second-order modules (:mod:`~prune_lab.core.fisher`, :mod:`~prune_lab.core.cbs`,
:mod:`~prune_lab.core.obs_layerwise`) share: their float64 working precision, an exact proportional split of a
count, and an optional progress bar."""
from __future__ import annotations

import math

import torch

__all__ = ["DT", "progress_bar", "split_counts"]

DT = torch.float64  # the working precision of the second-order math


def progress_bar(*args, **kw):
    """A ``tqdm.auto`` progress bar (imported on first use)."""
    from tqdm.auto import tqdm

    return tqdm(*args, **kw)


def split_counts(total: int, sizes: list) -> list:
    """Split ``total`` over parts of ``sizes`` proportionally, exactly (largest remainder, ties to the first; no
    part above its size).

    >>> split_counts(5, [4, 4, 2])
    [2, 2, 1]
    """
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    raw = [total * s / n for s in sizes]
    base = [min(int(math.floor(r)), s) for r, s in zip(raw, sizes)]
    left = total - sum(base)
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order:
        if left == 0:
            break
        if base[i] < sizes[i]:
            base[i] += 1
            left -= 1
    while left:  # parts that were full: give to any part with room
        for i in range(len(sizes)):
            if left and base[i] < sizes[i]:
                base[i] += 1
                left -= 1
    return base
