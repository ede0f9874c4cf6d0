"""Layerwise allocations: how many weights each layer loses at a model sparsity s.

Every allocation is a function ``allocate(sparsity, ctx) -> counts`` (an int64 array: weights pruned per layer,
in the layer order of ``ctx``) registered under a name. Budgets follow METHODS.md: a unit holding n weights loses
``round(s·n)`` of them (the whole model for global-type allocations, each layer for ``uniform``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .validation import check_choice, round_half_up


@dataclass(frozen=True)
class AllocationContext:
    """What an allocation may look at.

    ``shapes``: weight shapes in data-flow order; ``is_conv``: per layer; ``ranking()``: the method's
    :class:`~prune_lab.core.ranking.Ranking` (for a global threshold on its scores); ``lamp_ranking()``: the Ranking
    of LAMP scores of the same weights.
    """

    names: tuple
    shapes: tuple
    is_conv: tuple
    ranking: Callable
    lamp_ranking: Callable

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray([math.prod(s) for s in self.shapes], dtype=np.int64)


@dataclass(frozen=True)
class AllocationSpec:
    name: str
    label: str
    reference: str
    fn: Callable
    description: str = ""


_ALLOCATIONS: dict = {}


def register_allocation(name: str, label: str, reference: str = "", description: str = ""):
    """Decorator registering ``fn(sparsity, ctx) -> counts`` under ``name`` (a name can be registered once)."""

    def deco(fn):
        if name in _ALLOCATIONS:
            raise ValueError(f"allocation {name!r} is already registered.")
        _ALLOCATIONS[name] = AllocationSpec(name, label, reference, fn, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def list_allocations() -> list:
    """Names of the registered allocations.

    >>> list_allocations()[:2]
    ['uniform', 'global']
    """
    return list(_ALLOCATIONS)


def get_allocation(name: str) -> AllocationSpec:
    return _ALLOCATIONS[check_choice(name, _ALLOCATIONS, what="allocation")]


def allocate(name: str, sparsity: float, ctx: AllocationContext) -> np.ndarray:
    """Counts of pruned weights per layer for allocation ``name`` at ``sparsity``."""
    counts = np.asarray(get_allocation(name).fn(sparsity, ctx), dtype=np.int64)
    assert counts.shape == (len(ctx.names),) and (counts >= 0).all() and (counts <= ctx.sizes).all()
    return counts


def apportion(total: int, targets, caps) -> np.ndarray:
    """Integers ``c`` with ``Σc = total`` and ``0 ≤ c ≤ caps``, rounded from the real ``targets`` by the
    largest-remainder rule (ties: earlier layer first).

    >>> apportion(5, [1.5, 1.5, 2.0], [3, 3, 3]).tolist()
    [2, 1, 2]
    """
    caps = np.asarray(caps, dtype=np.int64)
    targets = np.clip(np.asarray(targets, dtype=np.float64), 0, caps)
    counts = np.floor(targets + 1e-9).astype(np.int64)
    left = int(total) - int(counts.sum())
    step = 1 if left > 0 else -1
    by_remainder = np.argsort(-(targets - counts) * step, kind="stable")
    for i in by_remainder:  # one each, largest remainder first (smallest first when taking away)
        if left == 0:
            break
        if 0 <= counts[i] + step <= caps[i]:
            counts[i] += step
            left -= step
    for i in range(len(counts)):  # whatever is left: in layer order, as far as each layer allows
        if left == 0:
            break
        move = min(int(caps[i] - counts[i]), left) if step > 0 else max(-int(counts[i]), left)
        counts[i] += move
        left -= move
    if left != 0:
        raise ValueError(f"cannot place {total} weights within the layer sizes {caps.tolist()}.")
    return counts


@register_allocation("uniform", "Uniform", "", "every layer loses round(s·n) of its n weights")
def uniform(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    return np.asarray([round_half_up(sparsity * n) for n in ctx.sizes], dtype=np.int64)


@register_allocation("global", "Global", "", "one threshold on the method's scores across all layers")
def global_(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    return ctx.ranking().global_counts(round_half_up(sparsity * int(ctx.sizes.sum())))


@register_allocation("lamp", "LAMP", "Lee et al., ICLR 2021 (arXiv 2010.07611)",
                     "the per-layer counts that global LAMP pruning produces, applied to any score")
def lamp(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    return ctx.lamp_ranking().global_counts(round_half_up(sparsity * int(ctx.sizes.sum())))


@register_allocation("uniform_plus", "Uniform+", "Gale et al. 2019, as used by LAMP",
                     "first conv layer dense, last layer keeps ≥ 20 %, the rest share one sparsity")
def uniform_plus(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    sizes = ctx.sizes
    n_layers = len(sizes)
    total = round_half_up(sparsity * int(sizes.sum()))
    caps = sizes.copy()
    dense = np.zeros(n_layers, dtype=bool)
    if ctx.is_conv[0]:
        dense[0] = True
    last = n_layers - 1
    if not dense[last]:
        caps[last] = int(math.floor(0.8 * sizes[last] + 1e-9))
    caps[dense] = 0
    reachable = int(caps.sum())
    if total > reachable:
        raise ValueError(
            f"allocation 'uniform_plus' cannot reach sparsity {sparsity:g}: keeping the first convolution dense "
            f"and at least 20 % of the last layer allows at most {reachable / sizes.sum():.4f} "
            f"({reachable} of {int(sizes.sum())} weights). Use a lower sparsity or another allocation "
            f"({', '.join(repr(a) for a in list_allocations() if a != 'uniform_plus')})."
        )
    free = ~dense
    free_last = free.copy()
    free_last[last] = False
    f_size = float(sizes[free_last].sum())
    last_size = float(sizes[last]) if free[last] else 0.0
    # total(s') = s'·F + min(s', 0.8)·n_last, piecewise linear: solve for the common sparsity s'.
    if f_size + last_size == 0:
        common = 0.0
    elif total <= 0.8 * (f_size + last_size):
        common = total / (f_size + last_size)
    else:
        common = (total - 0.8 * last_size) / f_size
    targets = np.where(free_last, common * sizes, 0.0)
    if free[last]:
        targets[last] = min(common, 0.8) * sizes[last]
    return apportion(total, targets, caps)


@register_allocation("erk", "ERK", "Evci et al., ICML 2020 (RigL)",
                     "Erdős–Rényi-kernel: density ∝ (sum of the weight's dimensions) / (their product)")
def erk(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    sizes = ctx.sizes.astype(np.float64)
    keep_total = int(sizes.sum()) - round_half_up(sparsity * int(sizes.sum()))
    raw = np.asarray([sum(s) / math.prod(s) for s in ctx.shapes], dtype=np.float64)
    dense = np.zeros(len(sizes), dtype=bool)
    while True:
        rest = keep_total - sizes[dense].sum()
        denom = (raw * sizes)[~dense].sum()
        eps = rest / denom if denom > 0 else 0.0
        density = np.where(dense, 1.0, eps * raw)
        over = (~dense) & (density > 1.0)
        if not over.any():
            break
        dense |= over
    kept = apportion(keep_total, density * sizes, ctx.sizes)
    return ctx.sizes - kept
