"""Distortion measures of a pruned layer, as pure functions of weights, masks and the layer graph.

- single layer: ``‖W − W̃‖_F`` (``W̃ = M ⊙ W``, or the method's updated kept weights);
- lookahead (three layers): ``‖W_{i+1} (W_i − W̃_i) W_{i−1}‖_F`` on the graph LAP uses. With several producers
  (a residual join feeds layer i) or consumers, the squared norms add: ``Σ_c Σ_p ‖C_c D P_p‖²``; a missing
  neighbour (the model's input or output) is the identity; BatchNorm between layers scales the neighbour's rows or
  columns by ``|γ/√(var+ε)|``. Convolutions are matrices over channels with kernel norms, as LAP treats them: the
  neighbours contribute ``‖W[o, c, :, :]‖`` per channel pair, the layer's own change counts per kernel tap
  (``Σ_t ‖C D_t P‖²``), so removing a single weight gives exactly its LAP score.
"""
from __future__ import annotations

import torch

from .graph import LayerGraph, Link
from .neighbours import apply_scales


def _channel_matrix(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A layer as a matrix over units, kernel norms for convs: ``(out, in)`` (grouped convs expanded, zeros
    outside the groups)."""
    w = w.detach().float()
    if w.dim() == 2 and groups == 1:
        return w
    per = w.reshape(w.shape[0], w.shape[1], -1).norm(dim=2) if w.dim() > 2 else w  # (out, in/g)
    if groups == 1:
        return per
    out, in_g = per.shape
    full = torch.zeros(out, in_g * groups, device=w.device)
    og = out // groups
    for g in range(groups):
        full[g * og:(g + 1) * og, g * in_g:(g + 1) * in_g] = per[g * og:(g + 1) * og]
    return full


def per_tap(d: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The change ``d`` of a layer per kernel tap: ``(taps, out, in)`` float32 (one tap for Linear; a grouped
    conv's taps expanded to the full ``in``, zeros outside the groups)."""
    d = d.float()
    if d.dim() == 2:
        return d.unsqueeze(0)
    out, in_g = d.shape[:2]
    t = d.reshape(out, in_g, -1).permute(2, 0, 1)  # (T, out, in/g)
    if groups == 1:
        return t
    full = torch.zeros(t.shape[0], out, in_g * groups, device=d.device)
    og = out // groups
    for g in range(groups):
        full[:, g * og:(g + 1) * og, g * in_g:(g + 1) * in_g] = t[:, g * og:(g + 1) * og]
    return full


def producer_matrix(link, n_in: int, graph: LayerGraph, weights: dict, scales: dict):
    """The producer side of ``link`` for a layer of ``n_in`` input units: ``(matrix, None)``, the producer as a
    matrix over units (rows = the layer's input units, BN factors applied), or ``(None, vector)`` for the identity
    as a vector: the near BN factors without a producer, ones where the geometry does not map."""
    if link.layer is None:
        return None, apply_scales(torch.ones(n_in), link.near_bn, scales).sqrt()
    p = graph.layers[link.layer]
    mat = _channel_matrix(weights[link.layer], p.groups)  # (C, in_p)
    sq = apply_scales(torch.ones(mat.shape[0], device=mat.device), link.far_bn, scales)
    mat = mat * sq.sqrt().unsqueeze(1)
    if mat.shape[0] != n_in:
        if n_in % mat.shape[0]:
            return None, torch.ones(n_in)
        mat = mat.repeat_interleave(n_in // mat.shape[0], dim=0)  # feature f is produced by channel f // HW
    near = apply_scales(torch.ones(n_in, device=mat.device), link.near_bn, scales).sqrt()
    return mat * near.unsqueeze(1), None


def consumer_matrix(link, n_out: int, graph: LayerGraph, weights: dict, scales: dict):
    """The consumer side of ``link`` for a layer of ``n_out`` output units: ``(matrix, None)``, the consumer as a
    matrix over units (columns = the layer's output units, BN factors applied), or ``(None, vector)`` for the
    identity as a vector: the near BN factors without a consumer, ones where the geometry does not map."""
    if link.layer is None:
        return None, apply_scales(torch.ones(n_out), link.near_bn, scales).sqrt()
    c = graph.layers[link.layer]
    mat = _channel_matrix(weights[link.layer], c.groups)  # (out_c, in_c)
    far = apply_scales(torch.ones(mat.shape[1], device=mat.device), link.far_bn, scales).sqrt()
    mat = mat * far.unsqueeze(0)
    if mat.shape[1] != n_out:
        if mat.shape[1] % n_out:
            return None, torch.ones(n_out)
        hw = mat.shape[1] // n_out  # channel j is read as the features j·HW … (j+1)·HW − 1: stack them as rows
        mat = mat.reshape(mat.shape[0], n_out, hw).permute(0, 2, 1).reshape(-1, n_out)
    near = apply_scales(torch.ones(n_out, device=mat.device), link.near_bn, scales).sqrt()
    return mat * near.unsqueeze(0), None


def lookahead_distortion(graph: LayerGraph, weights: dict, name: str, pruned_weight: torch.Tensor,
                         scales: dict | None = None) -> float:
    """``‖W_{i+1} (W_i − W̃_i) W_{i−1}‖_F`` of layer ``name`` (see the module docstring).

    ``weights``: every Linear/Conv weight of the graph (neighbours dense or as the caller wants them);
    ``pruned_weight``: ``W̃_i``, the layer after pruning (same shape as ``weights[name]``).

    >>> from torch import nn
    >>> from prune_lab.core.graph import build_graph
    >>> m = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False), nn.Linear(3, 2, bias=False))
    >>> w = {n: p.detach() for n, p in m.named_parameters()}
    >>> g = build_graph(m)
    >>> lookahead_distortion(g, w, "1.weight", w["1.weight"]) == 0.0
    True
    """
    scales = scales or {}
    layer = graph.layers[name]
    d = per_tap(weights[name].detach() - pruned_weight.detach().to(weights[name].device), layer.groups)  # (T,o,i)
    producers = graph.producers.get(name) or [Link(None)]
    consumers = graph.consumers.get(name) or [Link(None)]
    total = 0.0
    for p_link in producers:
        pm, pv = producer_matrix(p_link, layer.n_in, graph, weights, scales)
        dp = d @ pm.to(d.device) if pm is not None else d * pv.to(d.device).unsqueeze(0).unsqueeze(0)
        for c_link in consumers:
            cm, cv = consumer_matrix(c_link, layer.n_out, graph, weights, scales)
            cdp = cm.to(d.device) @ dp if cm is not None else dp * cv.to(d.device).unsqueeze(0).unsqueeze(2)
            total += float(cdp.double().pow(2).sum())
    return total ** 0.5
