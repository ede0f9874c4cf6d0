"""From a query to masks: the pruning path, as functions of the session's parts, and the one-call entry points.

:func:`prune_query` is what ``session.prune`` runs (and ``pl.prune``, on parts of its own):

1. ``snapshot.current()`` — the weights now (a cheap change check; a new fingerprint only when they changed);
2. :func:`ranking_for` — the method's :class:`~prune_lab.core.ranking.Ranking`, from the cache or scored and sorted
   once;
3. :func:`~prune_lab.core.allocation.allocate` — per-layer pruned counts, from an
   :class:`~prune_lab.core.allocation.AllocationContext` holding the rankings the allocation declares it needs;
4. a :class:`~prune_lab.engine.result.PruneResult` with counts and Frobenius distortions from the ranking's
   cumulative sums; its masks are ``ranking.masks(counts)``, built when first read. Sparsity-dependent methods and
   weight updates build their masks here instead, cached per (query, counts).
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import nn

from ..core.allocation import AllocationContext, allocate, get_allocation
from ..core.device import resolve_device
from ..core.ranking import Ranking
from ..core.validation import round_half_up
from ..methods.registry import MethodSpec, ScoreContext, get_method, get_updater
from .cache import MaskSet, RankingCache, RankingKey
from .query import Query
from .result import PruneResult
from .weights import Weights, WeightSnapshot, host_cat, masks_key, pruned_counts

__all__ = ["prune", "prune_query", "ranking_for", "score", "score_context", "scores_for"]


# ----------------------------------------------------------------------------------------------------------------
# scores and rankings
# ----------------------------------------------------------------------------------------------------------------
def check_needs(spec: MethodSpec, data) -> None:
    """``ValueError`` when ``spec`` needs data and there is none."""
    if "data" in spec.needs and data is None:
        raise ValueError(f"method {spec.name!r} needs data (a batch, a DataLoader or a prune_lab dataset); "
                         f"pass data=... to the session or to prune().")


def score_context(snapshot: WeightSnapshot, cache: RankingCache, weights: Weights, *, seed: int = 0, start=None,
                  start_key: str = "", data=None) -> ScoreContext:
    """What a method's score function sees (:class:`~prune_lab.methods.registry.ScoreContext`): the weights (times
    the starting masks), the layer graph, BatchNorm factors, model, data, and the cache's scratch for these
    weights. ``start_key``: the content key of ``start`` (a query's ``start``; computed from ``start`` when empty)."""
    w = dict(weights.weights)
    if start is not None:
        for n, m in start.items():
            w[n] = w[n] * m
    return ScoreContext(weights=w, prunable=list(snapshot.layer_names), graph=snapshot.graph,
                        bn_scales=weights.scales, seed=int(seed), model=snapshot.model, data=data,
                        device=snapshot.device, start_masks=start, fingerprint=weights.fingerprint,
                        cache=cache.scratch(weights.fingerprint),
                        start_key=start_key if start is not None else "")


def scores_for(spec: MethodSpec, hp, snapshot: WeightSnapshot, cache: RankingCache, weights: Weights, *,
               seed: int = 0, start=None, start_key: str = "", data=None) -> dict:
    """Raw scores ``{name: Tensor}`` of ``spec`` with hyperparameters ``hp`` (its dataclass); already-pruned
    weights (``start``) score ``-inf``, so new masks nest inside the old ones."""
    check_needs(spec, data)
    scores = spec.scores(score_context(snapshot, cache, weights, seed=seed, start=start, start_key=start_key,
                                       data=data), hp)
    if start is not None:
        scores = {n: torch.where(start[n], s.float(), torch.full_like(s, float("-inf"), dtype=torch.float32))
                  for n, s in scores.items()}
    return scores


def ranking_for(query: Query, snapshot: WeightSnapshot, cache: RankingCache, weights: Weights, *, start=None,
                data=None) -> Ranking:
    """The ranking ``query`` thresholds: from ``cache`` (keyed by :class:`~prune_lab.engine.cache.RankingKey`), or
    scored and sorted once and cached. ``start``: the starting masks whose key is ``query.start``."""
    key = RankingKey.of(query, weights.fingerprint)
    hit = cache.rankings.get(key)
    if hit is not None:
        return hit
    spec = get_method(query.method)
    hp = spec.make_hyperparameters(**query.hp)
    seed = query.seed or 0
    if spec.order_of is not None:  # ranks weights as another method does: reuse that sort
        base = ranking_for(Query.make(spec.order_of, 0.0, seed=seed, start=query.start), snapshot, cache, weights,
                           start=start, data=data)
        names = snapshot.layer_names
        orders = {n: base.layers[n].order for n in names}
        values = spec.sorted_values(score_context(snapshot, cache, weights, seed=seed, start=start,
                                                  start_key=query.start, data=data),
                                    hp, orders)
        if start is not None:  # already-pruned weights lead the base order: keep them first
            for n, c in zip(names, pruned_counts(start, names)):
                values[n][: int(c)] = float("-inf")
        ranking = base.with_sorted_values(values, score_dtype=cache.score_dtype, consume=True)
    else:
        scores = scores_for(spec, hp, snapshot, cache, weights, seed=seed, start=start, start_key=query.start,
                            data=data)
        # consume: each layer's scores are dropped once ranked, so scores and ranking are never both whole
        ranking = Ranking.from_scores(snapshot.layer_names, scores, weights.weights, score_dtype=cache.score_dtype,
                                      consume=True)
    cache.rankings.put(key, ranking)
    return ranking


# ----------------------------------------------------------------------------------------------------------------
# counts
# ----------------------------------------------------------------------------------------------------------------
def allocation_context(query: Query, snapshot: WeightSnapshot, ranking: Ranking, lamp: Ranking | None,
                       sensitivity=None) -> AllocationContext:
    """The data the query's allocation declares it needs (see :class:`~prune_lab.core.allocation.AllocationContext`)."""
    needs = get_allocation(query.allocation).needs
    return AllocationContext(names=tuple(snapshot.layer_names), shapes=snapshot.shapes, is_conv=snapshot.is_conv,
                             ranking=ranking, lamp_ranking=lamp,
                             sensitivity=sensitivity if "sensitivity" in needs else None)


def counts_for(query: Query, ctx: AllocationContext) -> np.ndarray:
    """Per-layer pruned counts of ``query``; with overrides, locked layers first and the allocation over the rest."""
    names, s = ctx.names, query.sparsity
    if not query.overrides:
        return allocate(query.allocation, s, ctx)
    overrides = dict(query.overrides)
    for n in overrides:
        if n not in names:
            raise ValueError(f"overrides: {n!r} is not a prunable layer of this model; valid layers: "
                             f"{', '.join(map(repr, names[:8]))}{', …' if len(names) > 8 else ''}.")
    sizes = ctx.sizes
    counts = np.zeros(len(names), dtype=np.int64)
    free = [i for i, n in enumerate(names) if n not in overrides]
    for i, n in enumerate(names):
        if n in overrides:
            counts[i] = round_half_up(overrides[n] * sizes[i])
    if not free:
        return counts
    if query.allocation == "uniform":
        budget_s = s
    else:
        left = round_half_up(s * int(sizes.sum())) - int(counts.sum())
        n_free = int(sizes[free].sum())
        if left < 0 or left >= n_free:
            raise ValueError(
                f"overrides leave {left} of the budget's weights to prune in layers holding {n_free}: "
                f"sparsity {s:g} cannot be met with these locked layers; change the sparsity or the overrides.")
        budget_s = left / n_free
    counts[free] = allocate(query.allocation, budget_s, ctx.subset([names[i] for i in free]))
    return counts


def keep_or_refuse(query: Query, spec: MethodSpec, sizes: np.ndarray, names, counts: np.ndarray) -> np.ndarray:
    """The budget at extreme sparsity. LAMP (the ``lamp`` allocation, or a global threshold on a method whose
    scores keep every layer, ``spec.keeps_every_layer``) keeps each layer's highest-scored weight: its count is
    capped at ``n − 1`` (a warning says so when that lowers the total). Otherwise counts that prune every weight
    of the model (``round(s·n) = n``: a sparsity that rounds to 1.0, which is not allowed) are refused."""
    alloc, s = query.allocation, query.sparsity
    overrides = dict(query.overrides)
    locked = np.asarray([n in overrides for n in names], dtype=bool)
    if alloc == "lamp" or (alloc == "global" and spec.keeps_every_layer):
        cap = np.where(locked | (sizes == 0), sizes, sizes - 1)
        if (counts > cap).any():
            asked = int(counts.sum())
            counts = np.minimum(counts, cap)
            total = int(sizes.sum())
            warnings.warn(
                f"{spec.name!r} with allocation {alloc!r} keeps the highest-scored weight of every layer (LAMP "
                f"scores it 1, so no layer is emptied): sparsity {s:g} asks to prune {asked} of {total} weights; "
                f"{int(counts.sum())} are pruned (sparsity {int(counts.sum()) / total:.6g}), one weight left in "
                f"each layer.", UserWarning, stacklevel=4)
        return counts
    total = int(sizes.sum())
    if total and int(counts.sum()) >= total:
        bound = max((n - 0.5) / n for n in sizes if n) if alloc == "uniform" else (total - 0.5) / total
        raise ValueError(
            f"sparsity {s:g} with allocation {alloc!r} prunes every one of the model's {total} weights (the "
            f"budget round(s·n) rounds up to n): that is sparsity 1.0, which is not allowed. Ask for a sparsity "
            f"below {bound:.6g}, or use allocation 'lamp', which keeps one weight in every layer.")
    return counts


def _say_empty(res: PruneResult) -> PruneResult:
    """Warn (``UserWarning``) when ``res`` prunes every weight of some layer, naming them (``res.empty_layers``):
    an emptied layer cuts the network there (or leaves only its bias)."""
    empty = res.empty_layers
    if empty:
        names = ", ".join(map(repr, empty[:8])) + (f", … ({len(empty) - 8} more)" if len(empty) > 8 else "")
        warnings.warn(f"{res.method!r} with allocation {res.allocation!r} at sparsity {res.target_sparsity:g} empties "
                      f"{len(empty)} of {len(res.layers)} layers (every weight pruned): {names}. The network is cut "
                      f"there; see result.empty_layers.", UserWarning, stacklevel=4)
    return res


# ----------------------------------------------------------------------------------------------------------------
# the path
# ----------------------------------------------------------------------------------------------------------------
def prune_query(query: Query, snapshot: WeightSnapshot, cache: RankingCache, *, data=None, start=None,
                sensitivity=None, update_given=None) -> PruneResult:
    """Prune as ``query`` asks (see the module docstring). ``start``: the checked starting masks whose content key is
    ``query.start``; ``sensitivity``: the measured table allocation ``sensitivity`` uses; ``update_given``: the
    ``update`` argument as the caller wrote it (recorded in ``result.hyperparameters``)."""
    spec = get_method(query.method)
    check_needs(spec, data)
    updater = None
    if query.update is not None:
        updater, needs = get_updater(query.update)
        if "data" in needs and data is None:
            shown = query.update if update_given is None else update_given
            raise ValueError(f"update {shown!r} needs data; pass data=... to the session or to prune().")
    weights = snapshot.current()  # once per call: the version check is the warm path's largest fixed cost
    names = snapshot.layer_names
    ranking = ranking_for(query, snapshot, cache, weights, start=start, data=data)
    lamp = None
    if "lamp_ranking" in get_allocation(query.allocation).needs:
        lamp = ranking_for(Query.make("lamp", 0.0, start=query.start), snapshot, cache, weights, start=start,
                           data=data)
    ctx = allocation_context(query, snapshot, ranking, lamp, sensitivity)
    counts = keep_or_refuse(query, spec, ctx.sizes, names, counts_for(query, ctx))
    if start is not None:
        already = pruned_counts(start, names)
        short = np.nonzero(counts < already)[0]
        if short.size:
            raise ValueError(
                f"sparsity {query.sparsity:g} with allocation {query.allocation!r} would prune {counts[short[0]]} "
                f"weights of {names[short[0]]!r}, but the starting masks already prune {already[short[0]]} there; "
                f"ask for a higher sparsity.")
    hyperparameters = dict(query.hyperparameters)
    if query.update is not None:
        hyperparameters["update"] = query.update if update_given is None else update_given
    if query.overrides:
        hyperparameters["overrides"] = dict(query.overrides)
    common = dict(method=spec.name, allocation=query.allocation, target_sparsity=query.sparsity,
                  hyperparameters=hyperparameters, seed=query.seed if spec.stochastic else None, layers=tuple(names),
                  numel=tuple(int(x) for x in ranking.sizes), pruned=tuple(int(c) for c in counts),
                  model_fingerprint=weights.fingerprint, query=query)
    norms = dict(zip(names, ranking.weight_norms().tolist()))
    devices = {n: snapshot.params[n].device for n in names}  # masks go where each weight lives
    if not (spec.sparsity_dependent or updater is not None):
        frob = dict(zip(names, ranking.frobenius(counts).tolist()))
        return _say_empty(PruneResult(**common, frobenius=frob, weight_norms=norms,
                                      _mask_builder=lambda: {n: m.to(devices[n])
                                                             for n, m in ranking.masks(counts).items()},
                                      orders={n: ranking.layers[n].order for n in names}))
    built = _mask_set(query, spec, updater, counts, snapshot, cache, weights, ranking, start, data)
    kept, new_weights = built.masks, built.weights
    # what the masks really prune, and the distortion: computed on the device, one transfer for all layers
    parts = []
    for n in names:
        w = weights.weights[n].float()
        after = (new_weights[n].to(w.device).float() if new_weights is not None else w) * kept[n]
        parts.append(torch.stack([(~kept[n]).sum().to(torch.float64),
                                  (w - after).pow(2).sum().sqrt().to(torch.float64)]))
    host = host_cat(parts).reshape(-1, 2)
    common["pruned"] = tuple(int(c) for c in host[:, 0])
    frob = dict(zip(names, host[:, 1].tolist()))
    return _say_empty(PruneResult(**common, frobenius=frob, weight_norms=norms, info=dict(built.info),
                                  _masks={n: m.to(devices[n]) for n, m in kept.items()},
                                  weights=None if new_weights is None else
                                  {n: (new_weights[n] * kept[n]).to(devices[n]) for n in names}))


def _mask_set(query, spec, updater, counts, snapshot, cache, weights, ranking, start, data) -> MaskSet:
    """Masks of a sparsity-dependent method or an updated selection, cached per (query but its sparsity, weights,
    counts): methods sharing a score function share a ranking, never their masks."""
    key = (dataclasses.replace(query, sparsity=0.0), weights.fingerprint, tuple(int(c) for c in counts))
    hit = cache.mask_sets.get(key)
    if hit is not None:
        return hit
    ctx = score_context(snapshot, cache, weights, seed=query.seed or 0, start=start, start_key=query.start, data=data)
    ctx.allocation = query.allocation if not query.overrides else None  # locked layers: follow the counts
    if spec.sparsity_dependent:
        built = spec.masks(ctx, dict(zip(snapshot.layer_names, counts.tolist())),
                           spec.make_hyperparameters(**query.hp))
    else:
        built = ranking.masks(counts)
    new_weights = None
    if isinstance(built, tuple):
        built, new_weights = built
    if updater is not None:
        new_weights = updater(ctx, built)
    hit = MaskSet(built, new_weights, dict(ctx.info))  # info: what the method reports (CBS: objectives, losses)
    cache.mask_sets.put(key, hit)
    return hit


# ----------------------------------------------------------------------------------------------------------------
# one call
# ----------------------------------------------------------------------------------------------------------------
def prune(model: nn.Module, method: str, sparsity: float, *, allocation: str | None = None, data=None, seed: int = 0,
          masks=None, device="auto", include=None, exclude=None, **hp) -> PruneResult:
    """Prune ``model``'s Linear/Conv weights to ``sparsity`` (fraction removed) with ``method``.

    The model is not changed; the result holds the masks (``{name: BoolTensor}``, True = kept). The same path as
    ``PruneSession.prune`` on parts of its own (use a session to prune the same model many times).

    >>> import torch, prune_lab as pl
    >>> m = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    >>> res = pl.prune(m, "global_magnitude", 0.8)
    >>> round(res.sparsity, 2), res.masks["0.weight"].shape
    (0.8, torch.Size([10, 10]))
    """
    snapshot, cache = _parts(model, device, include, exclude)
    query = Query.make(method, sparsity, allocation=allocation, seed=seed, **hp)  # errors before any reading
    start = snapshot.check_masks(masks)
    if start is not None:
        query = query.replace(start=masks_key(start))
    return prune_query(query, snapshot, cache, data=data, start=start)


def score(model: nn.Module, method: str, *, data=None, seed: int = 0, device="auto", include=None, exclude=None,
          **hp) -> dict:
    """Raw per-weight scores ``{name: Tensor}`` of ``method`` (higher = keep), in the weights' shapes.

    >>> import torch, prune_lab as pl
    >>> s = pl.score(torch.nn.Sequential(torch.nn.Linear(3, 2)), "magnitude")
    >>> s["0.weight"].shape
    torch.Size([2, 3])
    """
    snapshot, cache = _parts(model, device, include, exclude)
    spec = get_method(method)
    return scores_for(spec, spec.make_hyperparameters(**hp), snapshot, cache, snapshot.current(), seed=seed,
                      data=data)


def _parts(model, device, include, exclude):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    return WeightSnapshot(model, resolve_device(device), include=include, exclude=exclude), RankingCache()
