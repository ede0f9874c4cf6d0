"""Second-order methods: WoodFisher (global OBS), the Combinatorial Brain Surgeon (``cbs`` = CBS-S + CBS-U,
``cbs_select`` = CBS-S alone), layerwise OBS (``obs_layerwise``), and the ``cbs_u`` weight update that any selection
can use (``session.prune("global_magnitude", s, update="cbs_u")`` is the paper's MP+U).

The per-sample gradients, the Fisher factorisations and the captured layer Hessians are kept in the session's
``ctx.cache`` keyed by everything they depend on besides the weights (data identity, number of samples, seed,
damping, blocks, starting masks), so moving the sparsity reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core import cbs as CBS
from ..core import fisher as FI
from ..core import obs_layerwise as LW
from ..core.capture import eval_mode
from ..core.losses import is_token_batch, loss_terms, model_loss
from ..core.validation import match_input_dtype
from ..data import as_tokens
from ._data import data_id, method_batch
from .registry import MethodSpec, hparam, register_method, register_updater

CBS_REF = "Yu, Serra, Ramalingam, Zhe: The Combinatorial Brain Surgeon, ICML 2022 (arXiv 2203.04466)"
WF_REF = "Singh & Alistarh: WoodFisher, NeurIPS 2020 (arXiv 2004.14340); Hassibi & Stork: OBS, 1993"
OBC_REF = "Frantar & Alistarh: Optimal Brain Compression (2022) and SparseGPT (2023)"


# ------------------------------------------------------------------------------------------------ hyperparameters
_N = dict(low=1, high=1_000_000, log=True,
          help="N: training samples whose per-sample gradients form the empirical Fisher.")
_DAMPING = dict(low=1e-10, high=10.0, log=True, help="λ: the damping of F = λI + GᵀG/N.")
_BLOCKS = dict(choices=("full", "layer"),
               help="'full': one Fisher over all prunable weights; 'layer': block-diagonal per layer.")
_BLOCK_SIZE = dict(low=0, high=10**9, help="Split every Fisher block into chunks of at most this many weights "
                                           "(0: no split).")
_GRAD_CHUNK = dict(low=1, high=65536, log=True,
                   help="Samples per vmap call when computing per-sample gradients (bounds memory).")


@dataclass(frozen=True)
class WoodFisherHyperparameters:
    """WoodFisher: the empirical Fisher and whether to update the kept weights."""

    n_samples: int = hparam(1000, **_N)
    damping: float = hparam(1e-3, **_DAMPING)
    blocks: str = hparam("full", **_BLOCKS)
    block_size: int = hparam(0, **_BLOCK_SIZE)
    grad_chunk: int = hparam(256, **_GRAD_CHUNK)
    obs_update: bool = hparam(True, choices=(True, False),
                              help="Apply the WoodFisher (summed single-weight OBS) update to the kept weights.")


@dataclass(frozen=True)
class CBSHyperparameters:
    """CBS: the empirical Fisher and the swap local search."""

    n_samples: int = hparam(1000, **_N)
    damping: float = hparam(1e-3, **_DAMPING)
    blocks: str = hparam("full", **_BLOCKS)
    block_size: int = hparam(0, **_BLOCK_SIZE)
    grad_chunk: int = hparam(256, **_GRAD_CHUNK)
    trials: int = hparam(5, low=1, high=100,
                         help="Randomised magnitude starts (trial 0 = magnitude); the lowest training loss wins.")
    chunks: int = hparam(10, low=1, high=10_000, help="Chunks per unit in the randomised magnitude starts.")
    epsilon: float = hparam(1e-4, low=0.0, high=1.0, help="ε: accept a swap only when it lowers Obj by at least this.")
    window: int = hparam(100, low=1, high=100_000, log=True,
                         help="Swap candidates per side: the largest α in P and the smallest β outside it.")
    max_swaps: int = hparam(1000, low=0, high=10**7, help="Iteration cap of the swap search.")
    max_misses: int = hparam(5, low=1, high=1000,
                             help="Windows of β tried without an improving swap before the search stops.")
    eval_every: int = hparam(1, low=0, high=10**7,
                             help="Take the training loss after every this many swaps (1: after every outer "
                                  "iteration, as the reference does; 0: at the end only); the lowest-loss mask is "
                                  "kept.")
    scope: str = hparam("layer", choices=("layer", "global"),
                        help="'layer': swaps stay inside a layer (the allocation's per-layer counts are exact); "
                             "'global': swaps may move weights between layers (the paper's setting; only the total "
                             "count is kept, so use it with allocation='global').")


@dataclass(frozen=True)
class LayerwiseOBSHyperparameters:
    """Layerwise OBS: calibration size, damping, column blocks and the sparsity pattern."""

    n_samples: int = hparam(256, low=1, high=1_000_000, log=True, help="Calibration samples for H = 2XᵀX.")
    damp: float = hparam(0.01, low=0.0, high=10.0, help="Damping added to H, as a fraction of its mean diagonal.")
    block_columns: int = hparam(128, low=1, high=1_000_000, log=True,
                                help="Columns per block; the mask of a block is chosen on the updated weights.")
    pattern: str = hparam("unstructured", choices=("unstructured", "2:4", "4:8", "1:4"),
                          help="'unstructured' (the allocation's counts) or N:M: N kept of every M inputs.")


# ------------------------------------------------------------------------------------------------ shared pieces
def _require_data(ctx, what):
    if ctx.data is None or ctx.model is None:
        raise ValueError(f"{what} needs data (a batch, a DataLoader or a prune_lab dataset) and the model; pass "
                         f"data=... to the session or to prune().")


def _flat(ctx) -> torch.Tensor:
    return torch.cat([ctx.weights[n].detach().reshape(-1).to(torch.float64) for n in ctx.prunable])


def _sizes(ctx) -> list:
    return [ctx.weights[n].numel() for n in ctx.prunable]


def _unflatten(ctx, flat: torch.Tensor, dtype=None) -> dict:
    out, a = {}, 0
    for n in ctx.prunable:
        w = ctx.weights[n]
        out[n] = flat[a:a + w.numel()].reshape(w.shape).to(dtype or w.dtype)
        a += w.numel()
    return out


_METHOD_OF = {"WoodFisherHyperparameters": "woodfisher", "CBSHyperparameters": "cbs",
              "LayerwiseOBSHyperparameters": "obs_layerwise"}


def _method(hp) -> str:
    return _METHOD_OF.get(type(hp).__name__, "second-order")


def _batch(ctx, n, method="second-order"):
    if ctx.data is None:
        method_batch(None, n, method=method)  # raises: names the method
    key = ("second_order.batch", data_id(ctx, method), int(n), ctx.seed)
    hit = ctx.cache.get(key)
    if hit is None:
        x, y = method_batch(ctx.data, n, method=method, seed=ctx.seed, whole_pair=False, model=ctx.model)
        # float32 data for a half-precision model: the inputs are cast to the model's precision
        x = match_input_dtype(x, [ctx.weights[k] for k in ctx.prunable])
        hit = (x.to(ctx.device), y.to(ctx.device))
        ctx.cache[key] = hit
    return hit


def _fisher(ctx, hp) -> FI.EmpiricalFisher:
    """The cached empirical Fisher for ``hp`` (per-sample gradients shared across damping / blocks)."""
    _require_data(ctx, "the empirical Fisher")
    base = (data_id(ctx, _method(hp)), int(hp.n_samples), ctx.seed, ctx.start_key, tuple(ctx.prunable))
    gkey = ("second_order.grads",) + base
    grads = ctx.cache.get(gkey)
    if grads is None:
        x, y = _batch(ctx, hp.n_samples, _method(hp))
        grads = FI.per_sample_gradients(ctx.model, ctx.weights, ctx.prunable, x, y, chunk_size=hp.grad_chunk,
                                       progress=True)
        ctx.cache[gkey] = grads
    fkey = ("second_order.fisher", float(hp.damping), hp.blocks, int(hp.block_size)) + base
    fisher = ctx.cache.get(fkey)
    if fisher is None:
        blocks = FI.fisher_blocks(_sizes(ctx), blocks=hp.blocks, block_size=hp.block_size)
        fisher = FI.EmpiricalFisher(grads, float(hp.damping), blocks)
        ctx.cache[fkey] = fisher
    return fisher


def _inverse_diag(ctx, hp, fisher) -> torch.Tensor:
    key = ("second_order.inverse_diag", id(fisher))
    hit = ctx.cache.get(key)
    if hit is None or hit[0] is not fisher:
        hit = (fisher, fisher.inverse_diag())
        ctx.cache[key] = hit
    return hit[1]


def _fixed(ctx) -> torch.Tensor | None:
    if ctx.start_masks is None:
        return None
    return torch.cat([~ctx.start_masks[n].reshape(-1) for n in ctx.prunable]).to(ctx.device)


def _pruned_to_masks(ctx, pruned: torch.Tensor) -> dict:
    return {n: ~m.to(torch.bool) for n, m in _unflatten(ctx, pruned.to(torch.float64), torch.float64).items()}


def _lowest_per_layer(ctx, scores: torch.Tensor, counts: dict) -> torch.Tensor:
    """Pruned set (bool, flat): the ``counts[name]`` lowest ``scores`` of every layer (stable order)."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    a = 0
    for n, size in zip(ctx.prunable, _sizes(ctx)):
        order = torch.sort(scores[a:a + size], stable=True).indices
        pruned[a + order[:int(counts[n])]] = True
        a += size
    return pruned


# ------------------------------------------------------------------------------------------------ WoodFisher
def _wf_saliency(ctx, hp) -> torch.Tensor:
    fisher = _fisher(ctx, hp)
    rho = FI.obs_saliency(_flat(ctx), _inverse_diag(ctx, hp, fisher))
    fixed = _fixed(ctx)
    return rho if fixed is None else torch.where(fixed, torch.full_like(rho, -torch.inf), rho)


def _wf_scores(ctx, hp):
    rho = _wf_saliency(ctx, hp)
    return {n: v.to(torch.float32) for n, v in _unflatten(ctx, rho, torch.float64).items()}


def _wf_masks(ctx, counts, hp):
    rho = _wf_saliency(ctx, hp)
    pruned = _lowest_per_layer(ctx, rho, counts)
    masks = _pruned_to_masks(ctx, pruned)
    if not hp.obs_update:
        return masks
    fisher = _fisher(ctx, hp)
    new = FI.woodfisher_update(fisher, _flat(ctx), pruned, _inverse_diag(ctx, hp, fisher))
    return masks, _unflatten(ctx, new)


# ------------------------------------------------------------------------------------------------ CBS
def _magnitude_scores(ctx, hp):
    return {n: ctx.weights[n].detach().abs() for n in ctx.prunable}


def _magnitude_scores_select(ctx, hp):  # its own function: the session keys its caches by the score function
    return _magnitude_scores(ctx, hp)


def _loss_fn(ctx, hp, w_flat):
    x, y = _batch(ctx, hp.n_samples, _method(hp))
    fixed = {k: v.detach() for k, v in ctx.model.named_parameters()}
    fixed.update({k: v.detach() for k, v in ctx.model.named_buffers()})
    fixed.update({k: v.detach() for k, v in ctx.weights.items()})
    model = ctx.model
    chunk = 32 if is_token_batch(x, y) else 1024  # sequences or samples per forward pass

    def loss(pruned):
        params = dict(fixed)
        params.update(_unflatten(ctx, torch.where(pruned, torch.zeros_like(w_flat), w_flat)))
        with eval_mode(model), torch.no_grad():
            total, terms = 0.0, 0
            for a in range(0, x.shape[0], chunk):
                xb, yb = x[a:a + chunk], y[a:a + chunk]
                total += float(model_loss(model, params, xb, yb, reduction="sum"))
                terms += loss_terms(xb, yb)
        return total / max(terms, 1)

    return loss


def _cbs_pruned(ctx, counts, hp) -> tuple:
    fisher = _fisher(ctx, hp)
    w = _flat(ctx)
    sizes = _sizes(ctx)
    if hp.scope == "global":
        units, unit_counts = [(0, sum(sizes))], [int(sum(counts[n] for n in ctx.prunable))]
    else:
        bounds = np.cumsum([0] + sizes)
        units = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        unit_counts = [int(counts[n]) for n in ctx.prunable]
    res = CBS.cbs_select(fisher, w, units, unit_counts, trials=hp.trials, chunks=hp.chunks, epsilon=hp.epsilon,
                       window=hp.window, max_swaps=hp.max_swaps, max_misses=hp.max_misses,
                       loss_fn=_loss_fn(ctx, hp, w), eval_every=hp.eval_every, fixed=_fixed(ctx), progress=True)
    ctx.cache[("second_order.last_cbs", ctx.seed)] = res
    ctx.info.update(res.info())  # the result's info: the kept mask's objective and loss beside magnitude's
    return fisher, w, res.pruned


def _cbs_masks(ctx, counts, hp):
    fisher, w, pruned = _cbs_pruned(ctx, counts, hp)
    return _pruned_to_masks(ctx, pruned), _unflatten(ctx, CBS.cbs_update(fisher, w, pruned))


def _cbs_select_masks(ctx, counts, hp):
    _, _, pruned = _cbs_pruned(ctx, counts, hp)
    return _pruned_to_masks(ctx, pruned)


def cbs_u_update(ctx, masks: dict) -> dict:
    """The ``cbs_u`` weight update for any selection: ``δw_R = F_RR⁻¹ F_RP w_P`` with the default Fisher
    (N = 1000 samples, λ = 1e-3, one full block); returns ``{name: updated weights}`` (zero where pruned).

    >>> import torch, prune_lab as pl
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    >>> res = pl.prune(net, "global_magnitude", 0.5, data=pl.data.digits(), update="cbs_u")
    >>> bool((res.weights["1.weight"][~res.masks["1.weight"]] == 0).all())
    True
    """
    hp = CBSHyperparameters()
    fisher = _fisher(ctx, hp)
    pruned = torch.cat([~masks[n].reshape(-1).to(ctx.device) for n in ctx.prunable])
    return _unflatten(ctx, CBS.cbs_update(fisher, _flat(ctx), pruned))


# ------------------------------------------------------------------------------------------------ layerwise OBS
def _hessians(ctx, hp) -> LW.LayerHessians:
    """The layer Hessians, computed on demand and kept within ``LW.LayerHessians.max_bytes`` (beyond it, one layer
    at a time: the callers below use one layer's Hessian and drop it before asking for the next)."""
    _require_data(ctx, "layerwise OBS")
    key = ("second_order.layer_hessians", data_id(ctx, "obs_layerwise"), int(hp.n_samples), ctx.seed, ctx.start_key,
           tuple(ctx.prunable))
    hit = ctx.cache.get(key)
    if hit is None:
        x, y = _batch(ctx, hp.n_samples, "obs_layerwise")
        # token data: (ids, attention mask), run in the data's batches; the padding positions stay out of H
        tokens = as_tokens(ctx.data, split="train") if is_token_batch(x, y) else None
        hit = LW.LayerHessians(ctx.model, ctx.weights, ctx.prunable, x, mask=None if tokens is None else y,
                              batch_size=256 if tokens is None else tokens.batch_size)
        ctx.cache[key] = hit
    return hit


def _obc_scores(ctx, hp):
    H = _hessians(ctx, hp)
    out = {}
    for n in ctx.prunable:
        s = LW.obs_layerwise_saliency(ctx.weights[n], H[n], hp.damp).to(torch.float32)
        if ctx.start_masks is not None:
            s = torch.where(ctx.start_masks[n].to(s.device), s, torch.full_like(s, -torch.inf))
        out[n] = s
    return out


def _obc_masks(ctx, counts, hp):
    from tqdm.auto import tqdm

    H = _hessians(ctx, hp)
    nm = None if hp.pattern == "unstructured" else LW.parse_nm(hp.pattern)
    masks, weights = {}, {}
    for n in tqdm(ctx.prunable, desc="layerwise OBS", disable=None, leave=False):
        w = ctx.weights[n]
        fixed = None if ctx.start_masks is None else ~ctx.start_masks[n].to(w.device)
        if nm is not None:
            cols = w[0].numel()
            expected = w.shape[0] * (cols // nm[1]) * (nm[1] - nm[0]) if cols % nm[1] == 0 else None
            if expected != int(counts[n]):
                raise ValueError(
                    f"pattern {hp.pattern!r} prunes exactly {1 - nm[0] / nm[1]:g} of every layer (needs an input "
                    f"size that is a multiple of {nm[1]}); layer {n!r} was asked to prune {counts[n]} of "
                    f"{w.numel()} weights. Use sparsity={1 - nm[0] / nm[1]:g} with allocation='uniform'.")
            m, new = LW.obs_layerwise(w, H[n], nm=nm, block_columns=hp.block_columns, damp=hp.damp, fixed=fixed)
        else:
            m, new = LW.obs_layerwise(w, H[n], int(counts[n]), block_columns=hp.block_columns, damp=hp.damp,
                                     fixed=fixed)
        masks[n], weights[n] = m, new
    return masks, weights


# ------------------------------------------------------------------------------------------------ registration
_FISHER_NEEDS = frozenset({"data", "gradients"})

register_method(MethodSpec(
    "woodfisher", "WoodFisher (OBS)", WF_REF, _wf_scores, "global", needs=_FISHER_NEEDS, sparsity_dependent=True,
    stochastic=True, hyperparameters=WoodFisherHyperparameters, masks=_wf_masks,
    description="OBS saliency w²/(2[F⁻¹]_qq) with the empirical Fisher (Woodbury inverse), global threshold, "
                "then the summed OBS update δw = −F⁻¹ Σ_P (w_q/[F⁻¹]_qq) e_q of the kept weights."))
register_method(MethodSpec(
    "cbs", "CBS (CBS-S + CBS-U)", CBS_REF, _magnitude_scores, "global", needs=_FISHER_NEEDS,
    sparsity_dependent=True, stochastic=True, hyperparameters=CBSHyperparameters, masks=_cbs_masks,
    description="Randomised magnitude starts, then swap local search minimising w_PᵀF_PP w_P, then the exact "
                "update δw_R = F_RR⁻¹F_RP w_P."))
register_method(MethodSpec(
    "cbs_select", "CBS-S (selection only)", CBS_REF, _magnitude_scores_select, "global", needs=_FISHER_NEEDS,
    sparsity_dependent=True, stochastic=True, hyperparameters=CBSHyperparameters, masks=_cbs_select_masks,
    description="CBS's selection without the weight update; add update='cbs_u' for CBS-S+U."))
register_method(MethodSpec(
    "obs_layerwise", "Layerwise OBS (SparseGPT)", OBC_REF, _obc_scores, "uniform",
    needs=frozenset({"data", "hessian"}), sparsity_dependent=True, stochastic=True,
    hyperparameters=LayerwiseOBSHyperparameters, masks=_obc_masks,
    description="Per layer, H = 2XᵀX from calibration inputs; Cholesky-based column-by-column OBS pruning with "
                "updates of the later columns; unstructured or N:M."))
register_updater("cbs_u", cbs_u_update, needs=frozenset({"data", "gradients"}))
