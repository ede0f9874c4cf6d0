"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter, ICLR 2024, arXiv 2306.11695).

The score of weight ``W_ij`` is ``|W_ij| · ‖X_j‖₂``, where ``X_j`` is input feature ``j`` of that layer over every
calibration token (batch × sequence; padding excluded) or sample. The inputs are captured by forward pre-hooks on
one pass of the model over ``n_calibration`` calibration sequences (a seeded sample of the data's ``train`` split,
the same every call), and the per-layer norms are cached in the session keyed by the data's content and ``n``.
By default (``sequential=False``) the pass runs the dense model (or, with starting ``masks=``, the already-pruned
one), so the norms do not depend on the sparsity and moving it costs one sort per row. ``sequential=True`` follows
the reference code's order: the decoder blocks (:func:`prune_lab.models.hf.decoder_blocks`; in a model without
them, every layer on its own) are calibrated and pruned one after the other, block ``k``'s norms coming from a pass in
which the blocks before it are already pruned (its own layers dense, as in the reference, which records a whole
block before pruning it). That costs one calibration pass per block (each stopped after the block) at every
sparsity; the norms then depend on the sparsity (the scores the engine ranks for a global-type allocation's
per-layer counts stay the one-pass ones). Layers outside the blocks (an ``lm_head`` that is not excluded)
come after them, each on its own.

``group="row"`` (default, the paper's): every output row is pruned to the layer's sparsity: with ``k`` weights to
prune in a layer of ``R`` rows, each row loses ``⌊k/R⌋`` of its lowest-scored weights and the ``k mod R``
remaining ones go, one each, to the rows whose next-lowest score is smallest (ties: the lower row), so the layer's
count is exact for any allocation (``uniform`` is the paper's; ``global`` and the others give the per-layer
counts, spread over the rows the same way). ``group="layer"``: the layer's ``k`` lowest scores, wherever they are.

Any model works: Linear layers as above; a Conv1d/Conv2d's inputs are unfolded into patches, so ``X_j`` is the
norm of input channel ``c`` at kernel offset ``(u, v)`` over every output position (its padding mode included),
and a row is one output filter. Conv3d layers are refused (exclude them). Transformers' GPT-2 ``Conv1D`` layers are
not Linear layers: convert them with :func:`prune_lab.models.conv1d_to_linear`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..core.capture import calibration_pass, conv_patches, eval_mode, input_hooks, token_rows
from ..core.graph import stored_weight
from ..core.neighbours import input_channel_index
from ..core.validation import match_input_dtype
from ..data import as_tokens
from ..models.hf import decoder_blocks, vocab_size
from ._data import data_id, method_batch
from .registry import MethodSpec, hparam, register_method

WANDA_REF = ("Sun, Liu, Bair, Kolter: A Simple and Effective Pruning Approach for Large Language Models (Wanda), "
             "ICLR 2024 (arXiv 2306.11695)")
_IMAGE_CHUNK = 256


@dataclass(frozen=True)
class WandaHyperparameters:
    """Wanda: calibration size and the comparison group."""

    n_calibration: int = hparam(128, low=1, high=1_000_000, log=True,
                                help="Calibration sequences (token data; the paper uses 128 × 2048 tokens) or "
                                     "samples whose layer inputs give the feature norms ‖X_j‖.")
    group: str = hparam("row", choices=("row", "layer"),
                        help="'row': each output row keeps the layer's density (the paper); 'layer': the layer's "
                             "lowest scores wherever they are.")
    sequential: bool = hparam(False, choices=(False, True),
                              help="True: calibrate block by block, each block's inputs coming from the already "
                                   "pruned blocks before it (the reference code; one pass per block and sparsity); "
                                   "False: one pass of the dense model.")


# ------------------------------------------------------------------------------------------------ input norms
def _conv_sq(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ over samples and output positions of the squared unfolded input: ``(C_in, *kernel)``."""
    if isinstance(mod, nn.Conv3d) or not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"Wanda scores Linear, Conv1d and Conv2d layers; {type(mod).__name__} is not supported: "
                         f"exclude it (exclude=[...]).")
    cols = conv_patches(mod, x)  # (B, C·k, P)
    return cols.pow(2).sum((0, 2)).reshape((x.shape[1],) + tuple(mod.kernel_size))


def _linear_sq(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ over tokens (or samples) of the squared input features: ``(in,)``; padding positions left out."""
    return token_rows(x, mask).pow(2).sum(0)


class _StopPass(Exception):
    """Raised by a forward hook to end a calibration pass once the layers of interest have run."""


@contextlib.contextmanager
def _stopping_after(module: nn.Module | None):
    """Inside the block, every forward pass ends (``_StopPass``) once ``module`` has run (nothing when ``None``)."""
    if module is None:
        yield
        return

    def stop(_m, _inputs, _output):
        raise _StopPass

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def input_feature_norms(model: nn.Module, data, names=None, *, n: int = 128, weights: dict | None = None,
                        seed: int = 0, stop_after: nn.Module | None = None) -> dict:
    """``{weight name: ‖X_j‖₂}`` for the Linear / Conv1d / Conv2d layers ``names`` (default: all of them): the
    norm of every input feature over ``n`` calibration sequences (token data, padding excluded) or samples of
    ``data``'s train split. Shapes: ``(in_features,)`` for a Linear, ``(C_in, *kernel)`` for a conv (unfolded
    patches). ``weights`` (``{name: tensor}``) replace the model's during the pass (``functional_call``); the model
    is not modified and its train/eval modes are restored. ``stop_after``: a submodule after whose forward each
    pass ends (the layers ``names`` must all run before it ends).

    >>> net = nn.Sequential(nn.Linear(2, 1))
    >>> input_feature_norms(net, (torch.tensor([[3.0, 0.0], [4.0, 1.0]]), torch.tensor([0, 0])))["0.weight"]
    tensor([5., 1.], dtype=torch.float64)
    """
    canonical: dict = {}
    for pname, p in model.named_parameters():
        canonical.setdefault(id(p), pname)
    owners: dict = {}
    for mname, m in model.named_modules():
        w = stored_weight(m) if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None  # no .weight:
        if w is not None:  # a parametrization (spectral norm in train mode) would change the model's buffers
            owners.setdefault(canonical.get(id(w)), []).append(m)
    names = [k for k in owners if k is not None] if names is None else list(names)
    for name in names:
        if name not in owners:
            raise ValueError(f"Wanda scores the weights of Linear / Conv layers; {name!r} is not one.")
        for m in owners[name]:
            if isinstance(m, nn.Conv3d):
                _conv_sq(m, None)  # raises the explanation
    tokens = as_tokens(data, split="train")
    x, aux = method_batch(data, n, method="wanda", seed=seed, whole_pair=False)
    if tokens is not None:
        tokens.check_vocab(vocab_size(model))
        chunk = tokens.batch_size
    else:
        if not x.is_floating_point():
            raise TypeError(f"data: inputs must be floating point, got dtype {x.dtype}; token ids of a language "
                            f"model: wrap them with prune_lab.data.tokens(ids).")
        # float32 data for a half-precision model: the inputs are cast to the model's precision
        x = match_input_dtype(x, [p for p in model.parameters()])
        chunk = _IMAGE_CHUNK
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    overrides = {k: v.detach().to(dev) for k, v in (weights or {}).items()}
    sums: dict = {name: None for name in names}
    current: dict = {"mask": None}

    def record(name, mod, inp):
        inp = inp.detach().float()
        sq = _linear_sq(inp, current["mask"]) if isinstance(mod, nn.Linear) else _conv_sq(mod, inp)
        sq = sq.double()
        sums[name] = sq if sums[name] is None else sums[name] + sq

    pairs = [(name, m) for name in names for m in owners[name]]
    with eval_mode(model), input_hooks(pairs, record), _stopping_after(stop_after), torch.no_grad():
        calibration_pass(model, lambda xb, kw: functional_call(model, overrides, (xb,), kw) if overrides
                         else model(xb, **kw), x, chunk=chunk, device=dev,
                         mask=aux if tokens is not None else None, current=current,
                         data_errors=tokens is None, skip=_StopPass)
    silent = [name for name in names if sums[name] is None]
    if silent:
        raise ValueError(f"Wanda: layer(s) {', '.join(map(repr, silent[:3]))} never ran on the calibration data, so "
                         f"their inputs are unknown; exclude them (exclude=[...]).")
    return {name: sums[name].sqrt() for name in names}


# ------------------------------------------------------------------------------------------------ scores, masks
def _norms(ctx, hp) -> dict:
    if ctx.data is None or ctx.model is None:
        raise ValueError("wanda needs calibration data (prune_lab.data.tokens(ids) for a language model, or a "
                         "batch / DataLoader / prune_lab dataset) and the model; pass data=... to the session or to "
                         "prune().")
    key = ("wanda.norms", data_id(ctx, "wanda"), int(hp.n_calibration), ctx.start_key, tuple(ctx.prunable))
    hit = ctx.cache.get(key)
    if hit is None:
        weights = ctx.weights if ctx.start_masks is not None else None  # the already-pruned model's activations
        hit = {k: v.to(ctx.device) for k, v in
               input_feature_norms(ctx.model, ctx.data, ctx.prunable, n=hp.n_calibration, weights=weights).items()}
        ctx.cache[key] = hit
    return hit


def wanda_scores(w: torch.Tensor, norms: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``|W| · ‖X_j‖`` for one layer. ``w: (out, in)`` with ``norms: (in,)``, or ``w: (out, in // groups, *k)``
    with ``norms: (in, *k)``. Returns float32 scores of ``w``'s shape.

    >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 0.5]))
    tensor([[3., 1.]])
    """
    norms = norms.to(w.device, torch.float64)
    if w.dim() == 2:
        return (w.abs().double() * norms.unsqueeze(0)).float()
    per = norms[input_channel_index(tuple(w.shape), groups, device=w.device)]  # (out, in // groups, *k)
    return (w.abs().double() * per).float()


def _scores(ctx, hp) -> dict:
    norms = _norms(ctx, hp)
    return {n: wanda_scores(ctx.weights[n], norms[n], ctx.graph.layers[n].groups) for n in ctx.prunable}


def row_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` weights to prune of a layer, spread evenly over its rows: ``scores: (R, C)`` (``-inf`` = already
    pruned, kept pruned) → bool ``(R, C)``, True = pruned, exactly ``k`` of them. Every row prunes its lowest
    scores; row counts are as even as the already-pruned weights allow (each row ``max(fixed_r, t)`` for one level
    ``t``); the remaining ``k − Σ`` go one each to the rows whose next-lowest score is smallest (ties: lower row).

    >>> row_pruned(torch.tensor([[1.0, 2.0, 3.0], [9.0, 5.0, 4.0]]), 3).int()
    tensor([[1, 1, 0],
            [0, 0, 1]], dtype=torch.int32)
    """
    R, C = scores.shape
    k = int(k)
    if not 0 <= k <= R * C:
        raise ValueError(f"cannot prune {k} of {R * C} weights.")
    fixed = torch.isneginf(scores).sum(1)
    values, order = torch.sort(scores, dim=1, stable=True)
    if int(fixed.sum()) > k:
        raise ValueError(f"{int(fixed.sum())} weights are already pruned, more than the {k} asked for.")
    lo, hi = 0, C  # the largest level t with Σ max(fixed_r, t) <= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(fixed.clamp(min=mid).sum()) <= k:
            lo = mid
        else:
            hi = mid - 1
    per = fixed.clamp(min=lo)
    extra = k - int(per.sum())
    if extra > 0:
        nxt = values.gather(1, per.clamp(max=C - 1).unsqueeze(1)).squeeze(1)
        nxt = torch.where(fixed <= lo, nxt, torch.full_like(nxt, float("inf")))
        per[torch.sort(nxt, stable=True).indices[:extra]] += 1
    pruned_sorted = torch.arange(C, device=scores.device).unsqueeze(0) < per.unsqueeze(1)
    return torch.zeros_like(pruned_sorted).scatter(1, order, pruned_sorted)


def _layer_mask(ctx, name: str, s: torch.Tensor, k: int, hp) -> torch.Tensor:
    """Kept (True) weights of layer ``name`` from its scores ``s``: ``k`` pruned by row or over the layer."""
    if ctx.start_masks is not None:
        s = torch.where(ctx.start_masks[name].to(s.device), s, torch.full_like(s, float("-inf")))
    if hp.group == "row":
        pruned = row_pruned(s.reshape(s.shape[0], -1), k).reshape(s.shape)
    else:
        pruned = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
        pruned[torch.sort(s.reshape(-1), stable=True).indices[:k]] = True
        pruned = pruned.reshape(s.shape)
    return ~pruned


def calibration_groups(model: nn.Module, names: list) -> list:
    """``[(block module or None, [weight names])]``: the layers ``names`` grouped by decoder block
    (:func:`prune_lab.models.hf.decoder_blocks`), blocks in order, then every layer outside a block on its own (in
    ``names`` order). The units of ``sequential=True``.

    >>> groups = calibration_groups(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["0.weight", "1.weight"])
    >>> [g for _, g in groups]
    [['0.weight'], ['1.weight']]
    """
    blocks = decoder_blocks(model)
    module_of: dict = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            module_of.setdefault(f"{mname}.{pname}" if mname else pname, mname)
    inside = [[] for _ in blocks]
    outside = []
    for n in names:
        mname = module_of.get(n, n.rsplit(".", 1)[0])
        for i, (bname, _) in enumerate(blocks):
            if mname.startswith(bname + "."):
                inside[i].append(n)
                break
        else:
            outside.append(n)
    return ([(b, g) for (_, b), g in zip(blocks, inside) if g] + [(None, [n]) for n in outside])


def _sequential_masks(ctx, counts, hp) -> dict:
    """Block by block: block k's norms from a pass with the blocks before it already pruned (see the module)."""
    if ctx.data is None or ctx.model is None:
        _norms(ctx, hp)  # raises the explanation
    base = data_id(ctx, "wanda"), int(hp.n_calibration), ctx.start_key, tuple(ctx.prunable), hp.group
    overrides = {n: ctx.weights[n] for n in ctx.prunable} if ctx.start_masks is not None else {}
    out, before = {}, ()
    for block, names in calibration_groups(ctx.model, ctx.prunable):
        key = ("wanda.sequential_norms",) + base + (tuple(names), before)
        norms = ctx.cache.get(key)
        if norms is None:
            norms = {k: v.to(ctx.device) for k, v in input_feature_norms(
                ctx.model, ctx.data, names, n=hp.n_calibration, weights=overrides or None, stop_after=block).items()}
            ctx.cache[key] = norms
        for n in names:
            w = ctx.weights[n]
            out[n] = _layer_mask(ctx, n, wanda_scores(w, norms[n], ctx.graph.layers[n].groups), int(counts[n]), hp)
            overrides[n] = w * out[n].to(w.device, w.dtype)
        before += tuple((n, int(counts[n])) for n in names)
    return out


def _masks(ctx, counts, hp) -> dict:
    if hp.sequential:
        return _sequential_masks(ctx, counts, hp)
    scores = _scores(ctx, hp)
    return {n: _layer_mask(ctx, n, scores[n], int(counts[n]), hp) for n in ctx.prunable}


register_method(MethodSpec(
    "wanda", "Wanda", WANDA_REF, _scores, "uniform", needs=frozenset({"data"}), sparsity_dependent=True,
    hyperparameters=WandaHyperparameters, masks=_masks,
    description="|W_ij|·‖X_j‖₂: weight magnitude times the norm of its input feature over the calibration tokens "
                "(forward hooks); each output row pruned to the layer's sparsity (group='row', the paper) or the "
                "layer's lowest scores (group='layer'); sequential=True calibrates block by block on the already "
                "pruned blocks (the reference code). Made for LLMs (no retraining, no weight update); works on "
                "any Linear / Conv1d / Conv2d model."))
