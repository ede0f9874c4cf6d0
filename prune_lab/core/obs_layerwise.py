"""Layerwise OBS (Optimal Brain Compression / SparseGPT): the Hessians ``H = 2XᵀX / n`` of every layer's
inputs on a calibration batch (at once, or on demand within a memory budget), the layerwise saliency, and the
Cholesky-based pruning of one layer with the update of its remaining weights, unstructured or N:M.

Everything here is a pure function of its inputs (tensors are read, never written; the model runs in eval mode
with its modes restored).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from .capture import calibration_pass, conv_patches, eval_mode, input_hooks, token_rows
from .obs_common import DT, split_counts
from .validation import match_input_dtype

__all__ = ["LayerHessians", "layer_inputs_hessian", "obs_layerwise", "obs_layerwise_saliency", "parse_nm"]


def _hessian_owners(model: nn.Module, names: list) -> dict:
    modules = dict(model.named_modules())
    owners = {}
    for n in names:
        mod_name = n.rsplit(".", 1)[0] if "." in n else ""
        mod = modules.get(mod_name)
        if not isinstance(mod, nn.Linear) and not (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            raise ValueError(f"layerwise OBS supports nn.Linear and nn.Conv2d (groups=1) weights; {n!r} belongs "
                             f"to {type(mod).__name__}{'' if not isinstance(mod, nn.Conv2d) else ' with groups > 1'}.")
        owners[n] = mod
    return owners


def _hessian_columns(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * math.prod(mod.kernel_size)


def _capture_hessians(model: nn.Module, weights: dict, owners: dict, x: torch.Tensor, batch_size: int,
                      mask: torch.Tensor | None = None) -> dict:
    """One pass of ``x`` through the model with forward pre-hooks on ``owners`` (``{name: module}``) only:
    ``{name: 2XᵀX / n}``. ``mask``: the attention mask ``(N, L)`` of token ids ``x``; the model gets it and the
    Linear inputs at padding positions are left out (:func:`~prune_lab.core.capture.token_rows`); a Conv2d's input
    is unfolded into its patches (:func:`~prune_lab.core.capture.conv_patches`, padding mode included). The hooks
    are always removed and the modules' train/eval modes restored."""
    sums = {n: None for n in owners}
    counts = {n: 0 for n in owners}
    current = {"mask": None}

    def record(n, mod, inp):
        inp = inp.detach().to(DT)
        if isinstance(mod, nn.Conv2d):
            rows = conv_patches(mod, inp).transpose(1, 2)
            rows = rows.reshape(-1, rows.shape[-1])
        else:
            rows = token_rows(inp, current["mask"])
        h = rows.T @ rows
        sums[n] = h if sums[n] is None else sums[n].add_(h)
        counts[n] += rows.shape[0]

    params = {k: v.detach() for k, v in model.named_parameters()}
    params.update({k: v.detach() for k, v in weights.items()})
    x = match_input_dtype(x, list(weights.values()))  # float32 data, half-precision model: cast
    with eval_mode(model), input_hooks(owners.items(), record), torch.no_grad():
        calibration_pass(model, lambda xb, kw: functional_call(model, params, (xb,), kw), x, chunk=batch_size,
                         device=next(iter(weights.values())).device, mask=mask, current=current)
    out = {}
    for n in owners:
        h = sums.pop(n)
        if h is None:
            c = _hessian_columns(owners[n])
            h = torch.zeros(c, c, dtype=DT, device=next(iter(weights.values())).device)
        out[n] = h.mul_(2).div_(max(counts[n], 1))  # (2·XᵀX) / n, rounded as always
    return out


def layer_inputs_hessian(model: nn.Module, weights: dict, names: list, x: torch.Tensor, *,
                         batch_size: int = 256, mask: torch.Tensor | None = None) -> dict:
    """``{name: H}`` with ``H = 2XᵀX / n`` (``(c, c)`` float64; c = in_features, or in·kh·kw for a Conv2d) from
    the inputs each layer ``name`` sees on the batch ``x``, captured by forward pre-hooks that are always
    removed. The model runs through ``functional_call`` with ``weights`` (eval mode; modes restored). Every
    layer's Hessian at once, in one pass: :class:`LayerHessians` holds at most a memory budget of them. Token ids
    ``x: (N, L)`` of a causal LM go with their attention ``mask: (N, L)``: padding positions are left out.

    >>> net = nn.Sequential(nn.Linear(3, 2))
    >>> tuple(layer_inputs_hessian(net, {"0.weight": net[0].weight.detach()}, ["0.weight"], torch.randn(4, 3))
    ...       ["0.weight"].shape)
    (3, 3)
    """
    if x.shape[0] == 0:
        raise ValueError("x is empty (N = 0): layer Hessians need at least one calibration sample.")
    return _capture_hessians(model, weights, _hessian_owners(model, names), x, batch_size, mask)


class LayerHessians:
    """The layer Hessians ``H = 2XᵀX / n`` of :func:`layer_inputs_hessian`, computed on demand and held within a
    memory budget: a mapping ``{name: (c, c) float64}``.

    ``H[name]`` returns the kept Hessian, or runs the calibration batch through the model once for ``name`` and
    the layers after it (in ``names`` order, not yet kept) whose Hessians fit in what is left of ``max_bytes``,
    keeps those that fit and returns ``name``'s. With the budget at least the sum of all Hessians this is one pass
    for all (as :func:`layer_inputs_hessian`); with a budget of 0 nothing is kept, every access makes a pass for one
    layer, and the caller that uses one layer's Hessian and drops it before asking for the next (layerwise OBS)
    holds one Hessian at a time: peak memory bounded by the largest layer, not the sum, at the cost of one
    forward pass of the calibration batch per layer. The class default ``max_bytes`` (1 GiB) can be changed on the
    class or per instance.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> w = {k: v.detach() for k, v in net.named_parameters() if k.endswith("weight")}
    >>> H = LayerHessians(net, w, ["0.weight", "2.weight"], torch.randn(8, 3), max_bytes=0)
    >>> tuple(H["2.weight"].shape), len(H.kept)
    ((4, 4), 0)
    """

    max_bytes = 1 << 30

    def __init__(self, model: nn.Module, weights: dict, names: list, x: torch.Tensor, *, batch_size: int = 256,
                 max_bytes: int | None = None, mask: torch.Tensor | None = None):
        if x.shape[0] == 0:
            raise ValueError("x is empty (N = 0): layer Hessians need at least one calibration sample.")
        self.model, self.weights, self.names, self.x, self.mask = model, weights, list(names), x, mask
        self.batch_size = int(batch_size)
        if max_bytes is not None:
            self.max_bytes = int(max_bytes)
        self.owners = _hessian_owners(model, self.names)
        self.nbytes = {n: _hessian_columns(m) ** 2 * 8 for n, m in self.owners.items()}
        self.kept: dict = {}
        self.passes = 0  # forward passes of the calibration batch so far

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name):
        return name in self.owners

    def keys(self):
        return list(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        hit = self.kept.get(name)
        if hit is not None:
            return hit
        if name not in self.owners:
            raise KeyError(name)
        free = self.max_bytes - sum(self.nbytes[n] for n in self.kept)
        group, used = [name], self.nbytes[name]
        for n in self.names[self.names.index(name) + 1:]:
            if n not in self.kept and used + self.nbytes[n] <= free:
                group.append(n)
                used += self.nbytes[n]
        got = _capture_hessians(self.model, self.weights, {n: self.owners[n] for n in group}, self.x,
                                self.batch_size, self.mask)
        self.passes += 1
        out = got.pop(name)
        if self.nbytes[name] <= free:
            self.kept[name] = out
        self.kept.update(got)  # the others were taken only as far as they fit
        return out


def _damped_hessian(H: torch.Tensor, W: torch.Tensor, damp: float):
    H = H.to(DT).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    mean = float(H.diagonal().mean())
    H.diagonal().add_(damp * mean if mean > 0 else damp)
    return H, dead


def obs_layerwise_saliency(W: torch.Tensor, H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Layerwise OBS saliency ``w_rc² / [H⁻¹]_cc²`` (the SparseGPT criterion), ``W: (out, c)`` or a conv weight
    (flattened to ``(out, in·kh·kw)``), ``H: (c, c)`` damped by ``damp`` × mean diagonal; same shape as ``W``.

    >>> [round(v, 6) for v in obs_layerwise_saliency(torch.tensor([[1.0, 2.0]]), 2 * torch.eye(2), damp=0.0)[0].tolist()]
    [4.0, 16.0]
    """
    W2 = W.reshape(W.shape[0], -1).to(DT)
    Hd, dead = _damped_hessian(H, W2, damp)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd)).diagonal()
    sal = W2.pow(2) / hinv.pow(2)[None, :]
    sal[:, dead] = 0.0
    return sal.reshape(W.shape)


def parse_nm(pattern: str):
    """``"2:4"`` → ``(2, 4)``: at most N nonzero weights in every M consecutive inputs of a row.

    >>> parse_nm("2:4")
    (2, 4)
    """
    try:
        n, m = (int(t) for t in str(pattern).split(":"))
    except ValueError as exc:
        raise ValueError(f"an N:M pattern must look like '2:4' (N kept of every M), got {pattern!r}.") from exc
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {pattern!r}.")
    return n, m


def obs_layerwise(W: torch.Tensor, H: torch.Tensor, n_pruned: int | None = None, *, nm: tuple | None = None,
                  block_columns: int = 128, damp: float = 0.01, fixed: torch.Tensor | None = None):
    """Layerwise OBS with Cholesky updates (SparseGPT's algorithm): prune ``n_pruned`` weights of ``W`` (exactly),
    or an N:M pattern (``nm=(N, M)``: N kept in every M consecutive input columns of each row), minimising
    ``‖WX − ŴX‖²`` for ``H = 2XᵀX``. Columns are processed left to right in blocks of ``block_columns``; in each
    block the mask is chosen by ``w² / [chol(H⁻¹)]_cc²`` on the current (updated) weights, then every pruned
    weight's error is spread over the later columns with the upper Cholesky factor of ``H⁻¹``.

    ``W: (out, c)`` (or a conv weight, flattened to ``(out, in·kh·kw)``), ``H: (c, c)``; ``fixed`` (bool, ``W``'s
    shape): weights that must end pruned (already pruned before; they count in ``n_pruned``). Returns
    ``(mask, W_new)``: bool kept mask and updated weights (zero where pruned), both of ``W``'s shape and dtype.

    >>> m, w = obs_layerwise(torch.tensor([[1.0, -0.2, 0.5, 0.1]]), torch.eye(4), 2)
    >>> m.tolist(), int((w == 0).sum())
    ([[True, False, True, False]], 2)
    """
    shape, dtype = W.shape, W.dtype
    W = W.detach().reshape(shape[0], -1).to(DT).clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for a weight with {cols} input columns, got {tuple(H.shape)}.")
    if (n_pruned is None) == (nm is None):
        raise ValueError("give exactly one of n_pruned (unstructured) and nm (an N:M pattern).")
    if nm is not None:
        keep_n, m = nm
        if cols % m:
            raise ValueError(f"an {keep_n}:{m} pattern needs the input size ({cols}) to be a multiple of {m}.")
        block_columns = max(m, (block_columns // m) * m)
    elif not 0 <= n_pruned <= W.numel():
        raise ValueError(f"n_pruned must be in [0, {W.numel()}], got {n_pruned!r}.")
    if block_columns < 1:
        raise ValueError(f"block_columns must be >= 1, got {block_columns!r}.")
    fixed = (torch.zeros(rows, cols, dtype=torch.bool, device=W.device) if fixed is None
             else fixed.reshape(rows, cols).to(device=W.device, dtype=torch.bool))
    Hd, dead = _damped_hessian(H, W, damp)
    W[:, dead] = 0
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    bounds = [(a, min(a + block_columns, cols)) for a in range(0, cols, block_columns)]
    per_block = None
    if nm is None:
        n_fixed = int(fixed.sum())
        if n_pruned < n_fixed:
            raise ValueError(f"n_pruned ({n_pruned}) is below the {n_fixed} weights that fixed keeps pruned.")
        fb = [int(fixed[:, a:b].sum()) for a, b in bounds]
        extra = split_counts(n_pruned - n_fixed, [rows * (b - a) - f for (a, b), f in zip(bounds, fb)])
        per_block = [f + x for f, x in zip(fb, extra)]
    elif (fixed.reshape(rows, -1, nm[1]).sum(-1) > nm[1] - nm[0]).any():
        raise ValueError(f"fixed prunes more than {nm[1] - nm[0]} weights in some group of {nm[1]}: no "
                         f"{nm[0]}:{nm[1]} mask contains it.")
    for bi, (i1, i2) in enumerate(bounds):
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        d1 = H1.diagonal()
        m1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
        f1 = fixed[:, i1:i2]
        if nm is None and per_block[bi]:
            tmp = (W1.pow(2) / d1.pow(2)[None, :]).masked_fill(f1, -1.0).reshape(-1)
            m1.view(-1)[torch.sort(tmp, stable=True).indices[:per_block[bi]]] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = (W1[:, i:i + nm[1]].pow(2) / d1[i:i + nm[1]].pow(2)[None, :]).masked_fill(
                    f1[:, i:i + nm[1]], -1.0)
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, :nm[1] - nm[0]]
                m1[:, i:i + nm[1]].scatter_(1, idx, True)
            w = W1[:, i]
            q = torch.where(m1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
            E1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = ~m1
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    W = torch.where(mask, W, torch.zeros_like(W))
    return mask.reshape(shape), W.to(dtype).reshape(shape)
