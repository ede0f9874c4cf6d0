"""Layer collapse: critical sparsity (Hayou et al., ICLR 2021), fully-pruned layers, and effective sparsity (kept
weights that no input-to-output path uses count as pruned).

Scores and masks are ``{name: Tensor}`` keyed by parameter names; weights are ``(out, in)`` for Linear and
``(out, in // groups, *kernel)`` for Conv; masks are bool, True = kept.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..core.graph import build_graph
from ..core.neighbours import input_channel_index

__all__ = ["critical_sparsity", "layer_collapse", "effective_sparsity", "effective_masks"]


def critical_sparsity(scores: dict) -> float:
    """The critical sparsity ``s_cr`` of a global threshold on ``scores`` (``{name: Tensor}``, higher = keep): with
    ``t* = min_l max_ij g^l_ij`` (the smallest of the layers' best scores), ``s_cr`` is the fraction of all weights
    whose score is ``< t*``. Pruning those weights leaves every layer at least its best weight; pruning more empties
    a layer (Hayou et al.). Scores of ``-inf`` (already pruned weights) count as below ``t*``.

    >>> critical_sparsity({"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 1.5])})
    0.4
    """
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"scores must be a non-empty dict {{name: Tensor}}, got {scores!r}.")
    flat = {}
    for n, s in scores.items():
        s = torch.as_tensor(s).detach().reshape(-1)
        if s.numel() == 0:
            raise ValueError(f"scores[{n!r}] is empty.")
        if s.is_floating_point() and torch.isnan(s).any():
            raise ValueError(f"scores[{n!r}] contains NaN.")
        flat[n] = s.double() if s.is_floating_point() else s.to(torch.float64)
    t_star = min(float(s.max()) for s in flat.values())
    below = sum(int((s < t_star).sum()) for s in flat.values())
    total = sum(s.numel() for s in flat.values())
    return below / total


def _masks_of(result_or_masks) -> dict:
    masks = getattr(result_or_masks, "masks", result_or_masks)
    if not isinstance(masks, dict):
        raise TypeError(f"expected a PruneResult or a dict {{name: BoolTensor}}, got {type(result_or_masks).__name__}.")
    for n, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{n!r}] must be a bool tensor (True = kept), got "
                            f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}.")
    return masks


def layer_collapse(result_or_masks) -> list:
    """Names of the layers whose weights are all pruned (in the masks' order). Takes a ``PruneResult`` (its
    ``masks``) or ``{name: BoolTensor}``.

    >>> layer_collapse({"a": torch.tensor([True, False]), "b": torch.tensor([False, False])})
    ['b']
    """
    return [n for n, m in _masks_of(result_or_masks).items() if m.numel() and not bool(m.any())]


def _any_per_in(m: torch.Tensor, groups: int, n_in: int) -> torch.Tensor:
    """``m: (out, in/g, …)`` bool → ``(out, in)`` bool: whether output unit j has a kept weight from input unit k."""
    per = m.reshape(m.shape[0], m.shape[1], -1).any(2)  # (out, in/g)
    if groups == 1:
        return per
    full = torch.zeros(m.shape[0], n_in, dtype=torch.bool, device=m.device)
    full.scatter_(1, input_channel_index(tuple(m.shape), groups, device=m.device), per)
    return full


def _to_space(v: torch.Tensor, n: int) -> torch.Tensor | None:
    """A unit vector in a producer's space mapped to a consumer's (conv channel c ↔ features c·HW … after flatten)."""
    if v.numel() == n:
        return v
    if n % v.numel() == 0:
        return v.repeat_interleave(n // v.numel())
    return None


def _from_space(v: torch.Tensor, n: int) -> torch.Tensor | None:
    """A consumer's input-feature vector mapped back to the producer's ``n`` channels (any feature of channel c)."""
    if v.numel() == n:
        return v
    if v.numel() % n == 0:
        return v.reshape(n, -1).any(1)
    return None


def effective_masks(model: nn.Module, masks) -> dict:
    """The masks with every kept weight that lies on no input-to-output path removed (a weight ``W[j, k]`` is
    effective when input unit k is reachable from the model's input and output unit j reaches the model's output
    through kept weights). Paths follow the layer graph (:func:`prune_lab.core.graph.build_graph`): chains of
    Linear / Conv layers, flattens, residual joins; biases and BatchNorm shifts are not paths. Layers without a mask
    are dense. ``masks``: a PruneResult or ``{name: BoolTensor}``; returns ``{name: BoolTensor}`` of the same keys.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> m = {"0.weight": torch.tensor([[True, True], [False, False]]), "2.weight": torch.tensor([[False, True]])}
    >>> effective_masks(net, m)["0.weight"].tolist()
    [[False, False], [False, False]]
    """
    masks = _masks_of(masks)
    graph = build_graph(model)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in graph.layers:
            raise ValueError(f"masks[{n!r}]: not a Linear/Conv weight of the model.")
        if m.shape != params[n].shape:
            raise ValueError(f"masks[{n!r}] has shape {tuple(m.shape)}, the weight {tuple(params[n].shape)}.")
    names = list(graph.layers)  # data-flow (topological) order
    conn = {}
    for n in names:
        layer = graph.layers[n]
        m = masks[n].cpu() if n in masks else torch.ones(layer.shape, dtype=torch.bool)
        conn[n] = _any_per_in(m, layer.groups, layer.n_in)  # (out, in)
    alive_in, alive_out = {}, {}
    for n in names:  # forward: which units carry signal from the input
        layer = graph.layers[n]
        a = torch.zeros(layer.n_in, dtype=torch.bool)
        links = graph.producers.get(n) or []
        if not links:
            a[:] = True
        for link in links:
            if link.layer is None or link.layer not in alive_out:
                a[:] = True
                continue
            v = _to_space(alive_out[link.layer], layer.n_in)
            a |= v if v is not None else True
        alive_in[n] = a
        alive_out[n] = (conn[n] & a.unsqueeze(0)).any(1)
    reach_out, reach_in = {}, {}
    for n in reversed(names):  # backward: which units reach the output
        layer = graph.layers[n]
        r = torch.zeros(layer.n_out, dtype=torch.bool)
        links = graph.consumers.get(n) or []
        if not links:
            r[:] = True
        for link in links:
            if link.layer is None or link.layer not in reach_in:
                r[:] = True
                continue
            v = _from_space(reach_in[link.layer], layer.n_out)
            r |= v if v is not None else True
        reach_out[n] = r
        reach_in[n] = (conn[n] & r.unsqueeze(1)).any(0)
    out = {}
    for n, m in masks.items():
        layer = graph.layers[n]
        a_idx = alive_in[n][input_channel_index(tuple(m.shape), layer.groups)]  # (out, in/g)
        ok = a_idx & reach_out[n].unsqueeze(1)
        out[n] = m & ok.reshape(ok.shape + (1,) * (m.dim() - 2)).to(m.device)
    return out


def effective_sparsity(model: nn.Module, masks) -> float:
    """Fraction of the masked weights that are pruned or kept-but-disconnected (see :func:`effective_masks`): the
    sparsity the network really has. ``masks``: a PruneResult or ``{name: BoolTensor}``.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> m = {"0.weight": torch.tensor([[True, True], [False, False]]), "2.weight": torch.tensor([[False, True]])}
    >>> import warnings; warnings.simplefilter("ignore")
    >>> effective_sparsity(net, m)
    1.0
    """
    eff = effective_masks(model, masks)
    empty = [n for n, m in eff.items() if m.numel() and not bool(m.any())]
    if empty:
        warnings.warn(f"{len(empty)} layer(s) have no effective weight left (the network is disconnected): "
                      f"{', '.join(empty[:5])}{', …' if len(empty) > 5 else ''}.", UserWarning, stacklevel=2)
    total = sum(m.numel() for m in eff.values())
    return 1.0 - sum(int(m.sum()) for m in eff.values()) / total if total else 0.0
