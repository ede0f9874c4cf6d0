"""Neighbour factors of the layer graph's links, as pure functions of weights and BatchNorm factors: the BN scales
``|γ/√(var+ε)|``, their squares applied to squared norms, the squared norms of a layer's output and input units
(grouped convolutions included), the input unit each weight entry reads, and LAP's neighbour factors of a layer
(producers' rows, consumers' columns; conv channels ↔ linear features across a flatten). The graph itself
(:mod:`prune_lab.core.graph`) says who the neighbours are; this module says how much they weigh.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["apply_scales", "bn_scales", "in_unit_sq_norms", "input_channel_index", "neighbour_factors",
           "out_unit_sq_norms"]


def bn_scales(model: nn.Module, names: Iterable[str]) -> dict:
    """``{bn module name: |γ / sqrt(running_var + eps)|}`` (a 1-D tensor per BatchNorm), detached copies.

    >>> bn = nn.BatchNorm1d(2); m = nn.Sequential(nn.Linear(2, 2), bn, nn.Linear(2, 2))
    >>> bn_scales(m, ["1"])["1"]
    tensor([1.0000, 1.0000])
    """
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        bn = modules[name]
        with torch.no_grad():
            scale = torch.ones(bn.num_features, dtype=torch.float32, device=_device_of(bn))
            if bn.affine and bn.weight is not None:
                scale = scale * bn.weight.detach().float()
            if bn.running_var is not None:
                scale = scale / torch.sqrt(bn.running_var.detach().float() + bn.eps)
            out[name] = scale.abs()
    return out


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def apply_scales(values: torch.Tensor, bns: Sequence[str], scales: dict) -> torch.Tensor:
    """``values`` (squared norms over units) times the squared BatchNorm factor of every BN of ``bns`` in ``scales``
    whose size matches (a BN of another size, e.g. before a flatten, is left out).

    >>> apply_scales(torch.ones(2), ["bn"], {"bn": torch.tensor([2.0, 3.0])}).tolist()
    [4.0, 9.0]
    """
    for bn in bns:
        s = scales.get(bn)
        if s is not None and s.numel() == values.numel():
            values = values * s.to(values.device, values.dtype).pow(2)
    return values


def out_unit_sq_norms(w: torch.Tensor) -> torch.Tensor:
    """``‖W[j]‖²`` for every output unit j (a whole filter for a conv). ``w: (out, …) → (out,)``."""
    return w.detach().float().pow(2).reshape(w.shape[0], -1).sum(1)


def in_unit_sq_norms(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``‖W[:, k]‖²`` for every input unit k (all weights reading channel k, grouped convs included).

    ``w: (out, in // groups, …) → (in,)``.
    """
    w2 = w.detach().float().pow(2)
    per = w2.reshape(w.shape[0], w.shape[1], -1).sum(2)  # (out, in/g)
    if groups == 1:
        return per.sum(0)
    out_per_group = w.shape[0] // groups
    per = per.reshape(groups, out_per_group, w.shape[1]).sum(1)  # (g, in/g)
    return per.reshape(-1)


def input_channel_index(shape: tuple, groups: int, device=None) -> torch.Tensor:
    """For a weight ``(out, in // groups, …)``, the input unit each ``(o, k)`` entry reads: ``(out, in // groups)``."""
    out, in_g = shape[0], shape[1]
    o = torch.arange(out, device=device).unsqueeze(1)
    k = torch.arange(in_g, device=device).unsqueeze(0)
    return (o // (out // groups)) * in_g + k


def neighbour_factors(graph, weights: dict, name: str, scales: dict | None = None):
    """LAP's neighbour factors of layer ``name`` in ``graph`` (a :class:`~prune_lab.core.graph.LayerGraph`):
    ``(prev, next)`` with ``prev: (n_in,)``, ``next: (n_out,)``.

    ``prev[k] = sqrt(Σ_producers (scale_k · ‖W_{i−1}[k, :]‖)²)`` and ``next[j] = sqrt(Σ_consumers (scale_j ·
    ‖W_{i+1}[:, j]‖)²)``; a missing neighbour (model input / output) contributes 1. ``weights`` maps names to the
    (possibly masked) weights of every layer in the graph; ``scales`` are :func:`bn_scales`.
    """
    scales = scales or {}
    graph.warn_unresolved("LAP", stacklevel=4)
    layer = graph.layers[name]
    w = weights[name]
    dev = w.device
    prev = torch.zeros(layer.n_in, device=dev)
    for link in graph.producers.get(name, []):
        prev += _producer_sq(link, layer, graph, weights, scales, dev)
    if not graph.producers.get(name):
        prev += 1.0
    nxt = torch.zeros(layer.n_out, device=dev)
    for link in graph.consumers.get(name, []):
        nxt += _consumer_sq(link, layer, graph, weights, scales, dev)
    if not graph.consumers.get(name):
        nxt += 1.0
    return prev.sqrt(), nxt.sqrt()


def _producer_sq(link, layer, graph, weights, scales, dev) -> torch.Tensor:
    d_in = layer.n_in
    if link.layer is None:
        return apply_scales(torch.ones(d_in, device=dev), link.near_bn, scales)
    norms = out_unit_sq_norms(weights[link.layer]).to(dev)  # producer's channel space (C,)
    norms = apply_scales(norms, link.far_bn, scales)
    c = norms.numel()
    if c != d_in:
        if d_in % c == 0:  # conv channels -> linear features after a flatten: f // HW is the channel
            norms = norms.repeat_interleave(d_in // c)
        else:
            return apply_scales(torch.ones(d_in, device=dev), link.near_bn, scales)
    return apply_scales(norms, link.near_bn, scales)


def _consumer_sq(link, layer, graph, weights, scales, dev) -> torch.Tensor:
    d_out = layer.n_out
    if link.layer is None:
        return apply_scales(torch.ones(d_out, device=dev), link.near_bn, scales)
    consumer = graph.layers[link.layer]
    norms = in_unit_sq_norms(weights[link.layer], consumer.groups).to(dev)  # consumer's input space
    norms = apply_scales(norms, link.far_bn, scales)
    n = norms.numel()
    if n != d_out:
        if n % d_out == 0:  # channel j is read as the features j·HW … (j+1)·HW − 1
            norms = norms.reshape(d_out, n // d_out).sum(1)
        else:
            return apply_scales(torch.ones(d_out, device=dev), link.near_bn, scales)
    return apply_scales(norms, link.near_bn, scales)
