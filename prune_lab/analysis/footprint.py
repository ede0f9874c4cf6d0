"""Deployable accounting: what a mask set would cost to store and to run, per layer and in total.

Every number here is **computed** from shapes, dtypes and masks (analytical counts), not measured on hardware: the
table says so in a ``basis`` column and in ``df.attrs["note"]``. Formulas, per layer with weight ``W`` of ``n``
entries (``e`` bytes each), ``k`` kept, viewed as a matrix ``(out, n / out)``:

- ``bytes_dense = n·e``; ``bytes_bitmask = k·e + ⌈n/8⌉``; ``bytes_csr = k·e + 4k + 4(out + 1)`` (int32 column
  indices and row pointers); ``bytes_2_4 = (n₄/2)·e + ⌈n₄/8⌉``: half the values of the weight padded to groups of 4
  along the input dimension (``n₄`` entries) plus 2 bits of position per kept value (NVIDIA's semi-structured
  format), whatever the mask: it is the size after projecting to 2:4.
- ``macs_dense = n·P`` multiply-adds per sample, ``P`` the number of output positions (1 for a Linear on
  ``(B, in)``, ``H_out·W_out`` for a Conv2d: recorded with forward hooks on a copy of the model run on one example
  of ``input_shape``); ``macs_sparse = k·P`` (unstructured sparse execution skipping every pruned weight);
  ``macs_effective`` the same for effectively kept weights.
- **Effective sparsity:** a kept weight counts as pruned when no path of kept weights joins it to the model's
  input or to its output (its input unit receives nothing, or its output unit feeds nothing), through the layer
  graph (:func:`prune_lab.core.graph.build_graph`: chains, flattens, residual joins). Biases and BatchNorm shifts
  are ignored, as in the literature (a unit with no kept input weight counts as dead).
- **2:4 compliance:** the share of groups of 4 consecutive weights along the input dimension (input channels for a
  conv, at each kernel tap) with at most 2 kept; ``extra_frobenius_2_4 = ‖M⊙W − P₂:₄(M⊙W)‖_F``, the distortion
  added by keeping only the 2 largest kept magnitudes of each group (``relative_extra_frobenius_2_4`` divides by
  ``‖W‖_F``).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.graph import PRUNABLE_TYPES, build_graph
from .collapse import effective_masks

__all__ = ["footprint"]

NOTE = ("computed, not measured: analytical counts from shapes, dtypes and masks (CSR with int32 indices, 2:4 "
        "with 2-bit metadata per kept value); real sizes and speed depend on the kernel and the hardware")


def _masks_of(result) -> tuple[dict, dict | None]:
    if isinstance(result, dict):
        return result, None
    if hasattr(result, "masks") and hasattr(result, "layers"):
        return result.masks, result.weights
    raise TypeError(f"result must be a PruneResult or a dict {{name: BoolTensor}}, got {type(result).__name__}.")


def _positions(model: nn.Module, graph, input_shape) -> dict:
    """``{weight name: output positions per sample}`` from one forward pass on a copy (hooks); Linear-only models
    without ``input_shape`` get 1 per call."""
    if input_shape is None:
        if any(layer.is_conv for layer in graph.layers.values()):
            return {}
        return {n: 1 for n in graph.layers}
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be the shape of one sample, positive ints (e.g. (1, 28, 28)), got "
                         f"{input_shape!r}.")
    twin = copy.deepcopy(model).eval()
    canonical = {}
    for name, p in twin.named_parameters():
        canonical.setdefault(id(p), name)
    counts = {n: 0 for n in graph.layers}
    handles = []
    for _, mod in twin.named_modules():  # every module using a weight: tied weights count each of their uses
        n = canonical.get(id(getattr(mod, "weight", None)))
        if isinstance(mod, PRUNABLE_TYPES) and n in graph.layers:
            def hook(mod, args, out, _n=n, _units=graph.layers[n].n_out):
                counts[_n] += out.numel() // (out.shape[0] * _units)
            handles.append(mod.register_forward_hook(hook))
    try:
        p = next(twin.parameters(), None)
        x = torch.zeros((1, *shape), dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else "cpu")
        with torch.no_grad():
            twin(x)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"footprint could not run the model on one input of input_shape={shape}: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return counts


def _groups_of_four(w: torch.Tensor) -> torch.Tensor:
    """``(…, 4)`` groups of consecutive entries along the input dimension (input channels at each kernel tap for a
    conv), the input dimension zero-padded to a multiple of 4."""
    if w.dim() > 2:  # (out, in, *k) -> (out, *k, in)
        w = w.movedim(1, -1)
    pad = (-w.shape[-1]) % 4
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(-1, 4)


def _two_four(w: torch.Tensor, mask: torch.Tensor) -> tuple[float, int, int, float]:
    """``(compliant groups share, groups, padded numel, extra Frobenius² of projecting M⊙W to 2:4)``."""
    kept = _groups_of_four(mask.to(torch.float32))
    masked = _groups_of_four((w.float() * mask).abs())
    groups = kept.shape[0]
    compliant = int((kept.sum(1) <= 2).sum())
    # keep the 2 largest kept magnitudes of each group (ties: lower position first, a stable order)
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    drop = torch.zeros_like(masked, dtype=torch.bool).scatter_(1, order[:, 2:], True)
    extra2 = float((masked.double() * drop).pow(2).sum())
    return compliant / groups if groups else 1.0, groups, groups * 4, extra2


def footprint(model: nn.Module, result, *, input_shape=None) -> pd.DataFrame:
    """Per-layer storage, compute and 2:4 readiness of ``result``'s masks on ``model`` (see the module docstring
    for every formula), plus a ``(model)`` row of totals. Computed, not measured (``basis`` column,
    ``df.attrs["note"]``).

    ``model``: the model the result was computed on (never modified); ``result``: a PruneResult (its updated
    weights are used when it has them) or a dict ``{name: BoolTensor}`` of the weights' shapes (``(out, in)`` or
    ``(out, in/groups, *kernel)``); ``input_shape``: the shape of one sample (``(C, H, W)``), needed for the
    multiply-adds of conv layers (without it they are NaN).

    Columns: ``layer, shape, params, kept, nominal_sparsity, effective_kept, effective_sparsity, bytes_dense,
    bytes_bitmask, bytes_csr, bytes_2_4, macs_dense, macs_sparse, macs_effective, compliance_2_4,
    extra_frobenius_2_4, relative_extra_frobenius_2_4, basis``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> masks = {"0.weight": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
    ...          "2.weight": torch.tensor([[False, True]])}
    >>> df = footprint(net, masks)
    >>> df[["layer", "kept", "effective_kept", "compliance_2_4"]].values.tolist()
    [['0.weight', 2, 0, 1.0], ['2.weight', 1, 0, 1.0], ['(model)', 3, 0, 1.0]]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    masks, weights = _masks_of(result)
    graph = build_graph(model)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in graph.layers:
            raise ValueError(f"result does not fit the model {type(model).__name__}: {n!r} is not one of its "
                             f"Linear/Conv weights ({', '.join(list(graph.layers)[:5])}).")
        if tuple(m.shape) != tuple(params[n].shape):
            raise ValueError(f"result does not fit the model: the mask of {n!r} has shape {tuple(m.shape)}, the "
                             f"weight {tuple(params[n].shape)}.")
    shapes = {n: tuple(params[n].shape) for n in graph.layers}
    positions = _positions(model, graph, input_shape)
    eff = effective_masks(model, masks)
    rows = []
    for n in masks:
        w = (weights[n] if weights is not None and n in weights else params[n]).detach().cpu()
        m = masks[n].detach().cpu().bool()
        numel, k, k_eff = m.numel(), int(m.sum()), int(eff[n].sum())
        e = params[n].element_size()
        out = shapes[n][0]
        comp, groups, n4, extra2 = _two_four(w, m)
        pos = positions.get(n)
        norm = float(params[n].detach().double().norm())
        rows.append({
            "layer": n, "shape": shapes[n], "params": numel, "kept": k,
            "nominal_sparsity": 1 - k / numel, "effective_kept": k_eff, "effective_sparsity": 1 - k_eff / numel,
            "bytes_dense": numel * e, "bytes_bitmask": k * e + math.ceil(numel / 8),
            "bytes_csr": k * e + 4 * k + 4 * (out + 1), "bytes_2_4": (n4 // 2) * e + math.ceil(n4 / 8),
            "macs_dense": numel * pos if pos is not None else np.nan,
            "macs_sparse": k * pos if pos is not None else np.nan,
            "macs_effective": k_eff * pos if pos is not None else np.nan,
            "compliance_2_4": comp, "_groups": groups, "_extra2": extra2,
            "extra_frobenius_2_4": math.sqrt(extra2), "relative_extra_frobenius_2_4":
                math.sqrt(extra2) / norm if norm > 0 else 0.0,
            "_norm2": norm ** 2, "basis": "computed",
        })
    if not rows:
        raise ValueError("result has no masks: nothing to account for.")
    tot = {c: sum(r[c] for r in rows) for c in ("params", "kept", "effective_kept", "bytes_dense", "bytes_bitmask",
                                                 "bytes_csr", "bytes_2_4", "macs_dense", "macs_sparse",
                                                 "macs_effective", "_groups", "_extra2", "_norm2")}
    total = {
        "layer": "(model)", "shape": None, **{c: tot[c] for c in ("params", "kept", "effective_kept")},
        "nominal_sparsity": 1 - tot["kept"] / tot["params"], "effective_sparsity":
            1 - tot["effective_kept"] / tot["params"],
        **{c: tot[c] for c in ("bytes_dense", "bytes_bitmask", "bytes_csr", "bytes_2_4", "macs_dense",
                               "macs_sparse", "macs_effective")},
        "compliance_2_4": sum(r["compliance_2_4"] * r["_groups"] for r in rows) / tot["_groups"],
        "extra_frobenius_2_4": math.sqrt(tot["_extra2"]),
        "relative_extra_frobenius_2_4": math.sqrt(tot["_extra2"] / tot["_norm2"]) if tot["_norm2"] > 0 else 0.0,
        "basis": "computed",
    }
    rows.append(total)
    df = pd.DataFrame(rows).drop(columns=["_groups", "_extra2", "_norm2"])
    df.attrs["note"] = NOTE
    if not positions:
        df.attrs["note"] += "; multiply-adds are NaN: pass input_shape=(C, H, W) to count those of conv layers"
    return df
