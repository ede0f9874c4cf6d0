"""Per-weight scores (higher = keep), one pure function per method of METHODS.md.

Every function takes ``{name: weight}`` (``(out, in)`` for Linear, ``(out, in // groups, *kernel)`` for Conv) and
returns ``{name: score}`` of the same shapes, never changing its inputs.
"""
from __future__ import annotations

import numpy as np
import torch

from .graph import LayerGraph
from .neighbours import input_channel_index, neighbour_factors


def magnitude_scores(weights: dict) -> dict:
    """``|w|``.

    >>> magnitude_scores({"a": torch.tensor([-2.0, 1.0])})["a"].tolist()
    [2.0, 1.0]
    """
    return {n: w.detach().abs() for n, w in weights.items()}


def random_scores(weights: dict, seed: int = 0) -> dict:
    """I.i.d. uniform scores from one generator seeded with ``seed``, drawn layer by layer in the given order
    (on the CPU, so the same seed gives the same scores on every device).

    >>> random_scores({"a": torch.zeros(3)}, seed=1)["a"].equal(random_scores({"a": torch.zeros(3)}, seed=1)["a"])
    True
    """
    g = torch.Generator().manual_seed(int(seed))
    return {n: torch.rand(w.shape, generator=g).to(w.device) for n, w in weights.items()}


def lamp_sorted_values(w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer in ascending-magnitude ``order`` (``(n,)`` indices, stable): ``w_u² / Σ_{v ≥ u}
    w_v²``, summed in float64; non-decreasing. ``w``: any shape with n entries → ``(n,)`` float32."""
    w2 = w.detach().reshape(-1).index_select(0, order).to(torch.float64).pow_(2)
    # Σ_{v ≥ u} = total − Σ_{v < u}: one prefix sum; the cancellation error (~1e-16 · total) stays far below the
    # smallest suffix that matters (the largest weight's w²).
    suffix = torch.cumsum(w2, 0).neg_().add_(w2).add_(w2.sum())
    return torch.nan_to_num_(w2.div_(suffix), nan=0.0).to(torch.float32)


def lamp_scores(weights: dict) -> dict:
    """LAMP: sort a layer's weights ascending by ``|w|`` (index u, stable); ``score(u) = w_u² / Σ_{v ≥ u} w_v²``.

    The largest weight of every layer scores 1, so global selection on LAMP scores never empties a layer.

    >>> [round(v, 6) for v in lamp_scores({"w": torch.tensor([0.1, -0.5, 0.3, -0.2, 0.4])})["w"].tolist()]
    [0.018182, 1.0, 0.18, 0.074074, 0.390244]
    """
    out = {}
    for n, w in weights.items():
        order = torch.sort(w.detach().reshape(-1).abs(), stable=True).indices
        score = torch.empty(order.numel(), dtype=torch.float32, device=w.device)
        score[order] = lamp_sorted_values(w, order)
        out[n] = score.reshape(w.shape)
    return out


def lap_score_layer(w: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Lookahead score of one layer: ``|W[j, k]| · prev[k] · next[j]``.

    ``w: (out, in)`` or ``(out, in // groups, *kernel)``; ``prev: (in,)`` input-unit factors; ``nxt: (out,)``.
    """
    a = w.detach().abs().float()
    if w.dim() == 2 and groups == 1:
        return a * nxt.unsqueeze(1) * prev.unsqueeze(0)
    idx = input_channel_index(tuple(w.shape), groups, device=w.device)  # (out, in/g)
    factor = nxt.unsqueeze(1) * prev[idx]
    return a * factor.reshape(factor.shape + (1,) * (w.dim() - 2))


def lap_scores(weights: dict, graph: LayerGraph, bn_scales: dict | None = None, names=None) -> dict:
    """Lookahead pruning (LAP, Park et al. 2020): ``|W_i[j,k]| · ‖W_{i−1}[k,:]‖ · ‖W_{i+1}[:,j]‖`` with BatchNorm
    factors, the flatten rule and residual joins as the layer graph gives them (see :mod:`prune_lab.core.graph`).

    ``weights`` must hold every Linear/Conv layer of the graph (neighbours too); scores are returned for ``names``
    (default: the graph's prunable layers).
    """
    out = {}
    for n in names if names is not None else graph.prunable:
        prev, nxt = neighbour_factors(graph, weights, n, bn_scales)
        out[n] = lap_score_layer(weights[n], prev, nxt, graph.layers[n].groups)
    return out


def lap_sequential_masks(weights: dict, graph: LayerGraph, counts: dict, bn_scales: dict | None = None,
                         direction: str = "forward", start_masks: dict | None = None) -> dict:
    """Sequential LAP: prune layers one at a time (first→last for ``"forward"``, last→first for ``"backward"``),
    each scored with its already-pruned neighbours. ``counts[name]``: weights to prune in that layer.

    Returns ``{name: BoolTensor}`` masks (True = kept). ``start_masks``: weights already pruned score −∞.
    """
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}.")
    current = dict(weights)
    names = [n for n in graph.prunable if n in counts]
    if direction == "backward":
        names = names[::-1]
    masks = {}
    for n in names:
        prev, nxt = neighbour_factors(graph, current, n, bn_scales)
        s = lap_score_layer(current[n], prev, nxt, graph.layers[n].groups).reshape(-1)
        if start_masks is not None and n in start_masks:
            s = torch.where(start_masks[n].reshape(-1).to(s.device), s, torch.full_like(s, -np.inf))
        order = torch.sort(s, stable=True).indices
        m = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        m[order[: int(counts[n])]] = False
        masks[n] = m.reshape(current[n].shape)
        current[n] = current[n] * masks[n]
    return {n: masks[n] for n in graph.prunable if n in masks}
