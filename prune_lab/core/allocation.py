"""Layerwise allocations: how many weights each layer loses at a model sparsity s.

Every allocation is a function ``allocate(sparsity, ctx) -> counts`` (an int64 array: weights pruned per layer,
in the layer order of ``ctx``) registered under a name. Budgets follow METHODS.md: a unit holding n weights loses
``round(s·n)`` of them (the whole model for global-type allocations, each layer for ``uniform``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .ranking import Ranking
from .validation import check_choice, round_half_up


@dataclass(frozen=True, eq=False)
class SensitivityTable:
    """Measured per-layer sensitivity curves, for the ``sensitivity`` allocation.

    ``names``: layer names; ``sparsities[i]``, ``increases[i]``: 1-d float arrays of equal length, layer i pruned
    alone to each sparsity (the rest dense) and the resulting increase of the loss (or of any harm: accuracy drop,
    output distortion) over the dense model. ``metric``: what the increase measures; ``fingerprint``: the weights
    it was measured on (``""`` when unknown). ``key``: a content hash (names, curves, metric, fingerprint), for
    cache keys.

    >>> t = SensitivityTable.make(["a", "b"], [[0.5, 0.9], [0.5, 0.9]], [[0.0, 0.2], [0.1, 0.4]], metric="loss")
    >>> t.curve("a")
    (array([0. , 0.5, 0.9]), array([0. , 0. , 0.2]))
    """

    names: tuple
    sparsities: tuple
    increases: tuple
    metric: str = "loss"
    fingerprint: str = ""
    key: str = ""

    @classmethod
    def make(cls, names, sparsities, increases, *, metric: str = "loss", fingerprint: str = "") -> "SensitivityTable":
        names = tuple(str(n) for n in names)
        if len(set(names)) != len(names):
            raise ValueError("SensitivityTable: layer names must be unique.")
        if not (len(names) == len(sparsities) == len(increases)):
            raise ValueError(f"SensitivityTable: {len(names)} names, {len(sparsities)} sparsity arrays and "
                             f"{len(increases)} increase arrays; give one of each per layer.")
        xs, ys = [], []
        for n, x, y in zip(names, sparsities, increases):
            x = np.asarray(x, dtype=np.float64).reshape(-1)
            y = np.asarray(y, dtype=np.float64).reshape(-1)
            if x.shape != y.shape or x.size == 0:
                raise ValueError(f"SensitivityTable: layer {n!r} needs as many increases as sparsities (at least "
                                 f"one), got {x.size} and {y.size}.")
            if not (np.isfinite(x).all() and ((x >= 0) & (x < 1)).all()):
                raise ValueError(f"SensitivityTable: the sparsities of layer {n!r} must lie in [0, 1).")
            if np.isnan(y).any():
                raise ValueError(f"SensitivityTable: the increases of layer {n!r} contain NaN.")
            xs.append(x)
            ys.append(y)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{metric}|{fingerprint}|".encode())
        for n, x, y in zip(names, xs, ys):
            h.update(n.encode())
            h.update(x.tobytes())
            h.update(y.tobytes())
        return cls(names, tuple(xs), tuple(ys), str(metric), str(fingerprint), h.hexdigest())

    def curve(self, name: str) -> tuple:
        """``(sparsity, harm)`` of layer ``name`` as used by the allocation: sorted by sparsity, a ``(0, 0)`` point
        first (the dense layer), negative increases as 0, repeated sparsities merged (the largest increase), and the
        running maximum taken (pruning more never counts as harming less)."""
        if name not in self.names:
            raise ValueError(f"the sensitivity table has no layer {name!r} (it has {len(self.names)} layers: "
                             f"{', '.join(map(repr, self.names[:5]))}{', …' if len(self.names) > 5 else ''}); "
                             f"measure every layer the allocation is asked to place.")
        i = self.names.index(name)
        x = np.concatenate([[0.0], self.sparsities[i]])
        y = np.concatenate([[0.0], np.maximum(self.increases[i], 0.0)])
        y = np.where(np.isinf(y), np.finfo(np.float64).max / 4, y)
        ux = np.unique(x)
        uy = np.asarray([y[x == v].max() for v in ux])
        return ux, np.maximum.accumulate(uy)


@dataclass(frozen=True)
class AllocationContext:
    """What an allocation may look at: plain data, no callbacks.

    ``names``, ``shapes``, ``is_conv``: the layers in data-flow order; ``ranking``: the method's
    :class:`~prune_lab.core.ranking.Ranking` (a global threshold on its scores); ``lamp_ranking``: the Ranking of
    LAMP scores of the same weights; ``sensitivity``: the measured :class:`SensitivityTable` of these weights. An
    allocation declares what it reads in its ``needs`` (``{"ranking"}``, ``{"lamp_ranking"}``, ``{"sensitivity"}``);
    the caller fills those fields (the others may stay ``None``), so nothing is built that the allocation does not
    read and an allocation never calls back into the engine.
    """

    names: tuple
    shapes: tuple
    is_conv: tuple
    ranking: Ranking | None = None
    lamp_ranking: Ranking | None = None
    sensitivity: SensitivityTable | None = None

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray([math.prod(s) for s in self.shapes], dtype=np.int64)

    def subset(self, names) -> "AllocationContext":
        """The context of some layers only (rankings restricted to them): an allocation over the other layers when
        some are locked.

        >>> ctx = AllocationContext(("a", "b"), ((2, 2), (3,)), (False, False))
        >>> ctx.subset(["b"]).sizes.tolist()
        [3]
        """
        idx = [self.names.index(n) for n in names]
        return AllocationContext(
            tuple(names), tuple(self.shapes[i] for i in idx), tuple(self.is_conv[i] for i in idx),
            None if self.ranking is None else self.ranking.subset(names),
            None if self.lamp_ranking is None else self.lamp_ranking.subset(names), self.sensitivity)


@dataclass(frozen=True)
class AllocationSpec:
    name: str
    label: str
    reference: str
    fn: Callable
    description: str = ""
    needs: frozenset = field(default_factory=frozenset)  # the AllocationContext fields it reads: {"ranking"}, …


_ALLOCATIONS: dict = {}


def register_allocation(name: str, label: str, reference: str = "", description: str = "", needs=()):
    """Decorator registering ``fn(sparsity, ctx) -> counts`` under ``name`` (a name can be registered once);
    ``needs``: the :class:`AllocationContext` fields it reads beyond the layers' names and shapes: ``"ranking"``
    (the method's scores), ``"lamp_ranking"`` (LAMP scores), ``"sensitivity"`` (a measured table)."""

    def deco(fn):
        if name in _ALLOCATIONS:
            raise ValueError(f"allocation {name!r} is already registered.")
        _ALLOCATIONS[name] = AllocationSpec(name, label, reference, fn, description or (fn.__doc__ or "").strip(),
                                            frozenset(needs))
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
    """Counts of pruned weights per layer for allocation ``name`` at ``sparsity``. A ranking the allocation needs
    (its ``needs``) and the context lacks is a ``ValueError``; a missing sensitivity table is the allocation's own
    error (it says how to measure one)."""
    spec = get_allocation(name)
    for need in ("ranking", "lamp_ranking"):
        if need in spec.needs and getattr(ctx, need) is None:
            raise ValueError(f"allocation {name!r} needs the context's {need!r}; pass that Ranking.")
    counts = np.asarray(spec.fn(sparsity, ctx), dtype=np.int64)
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


@register_allocation("global", "Global", "", "one threshold on the method's scores across all layers",
                     needs=("ranking",))
def global_(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    return ctx.ranking.global_counts(round_half_up(sparsity * int(ctx.sizes.sum())))


@register_allocation("lamp", "LAMP", "Lee et al., ICLR 2021 (arXiv 2010.07611)",
                     "the per-layer counts that global LAMP pruning produces, applied to any score",
                     needs=("lamp_ranking",))
def lamp(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    return ctx.lamp_ranking.global_counts(round_half_up(sparsity * int(ctx.sizes.sum())))


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


# ----------------------------------------------------------------------------------------------------------------
# sensitivity: equalise the per-layer harm
# ----------------------------------------------------------------------------------------------------------------


def _as_ordered(v: float) -> int:
    """A non-negative float64 as an int64 of the same order (adjacent floats are adjacent integers)."""
    return int(np.float64(v).view(np.int64))


def _as_float(i: int) -> float:
    return float(np.int64(i).view(np.float64))


def equalise_counts(curves, sizes, total: int) -> np.ndarray:
    """Pruned counts per layer that give every layer the same harm, meeting ``total`` exactly.

    ``curves[l] = (x, y)``: layer l's harm ``y`` (≥ 0, non-decreasing) at sparsities ``x`` (increasing, from 0 with
    ``y = 0``), read between points by linear interpolation; ``sizes[l]``: its weight count. A tiny slope
    ``ε·x`` (ε = 10⁻⁶ of the largest harm) is added so that every curve strictly increases: layers on a flat
    stretch then share that stretch at one common sparsity. For a common level λ, layer l prunes
    ``c_l(λ) = ⌊n_l · x_l(λ)⌋`` weights, ``x_l(λ)`` the sparsity where its curve reaches λ (capped at its last
    point). λ is bisected over the float64 values themselves (as ordered integers: at most 64 steps) to the
    smallest level whose total reaches ``total``; weights whose level ties there go to earlier layers first. The
    counts are those of the ``total`` cheapest removals in one fixed order (level, layer), so they grow with
    ``total`` layer by layer (nested masks), and the result is deterministic.

    >>> equalise_counts([([0, 1], [0, 1]), ([0, 1], [0, 2])], [100, 100], 90).tolist()   # x₁ = 2·x₂
    [60, 30]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(total)
    curves = [(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)) for x, y in curves]
    caps = np.asarray([int(math.floor(n * x[-1] + 1e-9)) for (x, _), n in zip(curves, sizes)], dtype=np.int64)
    if total < 0 or total > int(sizes.sum()):
        raise ValueError(f"cannot prune {total} weights of a model holding {int(sizes.sum())}.")
    if total > int(caps.sum()):
        raise ValueError(f"the sensitivity curves reach at most {int(caps.sum())} of {int(sizes.sum())} weights "
                         f"(sparsity {caps.sum() / max(sizes.sum(), 1):.4f}: each layer is measured up to the "
                         f"largest sparsity of its grid); asked to prune {total}. Measure a grid that goes higher or "
                         f"ask for a lower sparsity.")
    if total == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    scale = max((float(y[-1]) for _, y in curves), default=0.0)
    eps = 1e-6 * (scale if scale > 0 else 1.0)
    # padded to one (layers, points) array: the last point repeated (the cap)
    width = max(len(x) for x, _ in curves)
    xs = np.stack([np.concatenate([x, np.full(width - len(x), x[-1])]) for x, _ in curves])
    fs = np.stack([np.concatenate([y + eps * x, np.full(width - len(x), y[-1] + eps * x[-1])]) for x, y in curves])
    rows = np.arange(len(curves))
    nf = sizes.astype(np.float64)

    def counts_at(lam: float) -> np.ndarray:
        j = np.minimum((fs < lam).sum(axis=1), width - 1)  # first point at or above lam
        i = np.maximum(j - 1, 0)
        f0, f1, x0, x1 = fs[rows, i], fs[rows, j], xs[rows, i], xs[rows, j]
        t = np.where(f1 > f0, (lam - f0) / np.where(f1 > f0, f1 - f0, 1.0), 1.0)
        x = np.where(lam >= fs[:, -1], xs[:, -1], x0 + np.clip(t, 0.0, 1.0) * (x1 - x0))
        x = np.where(lam <= 0, 0.0, x)
        return np.minimum(np.floor(nf * x + 1e-9).astype(np.int64), caps)

    lo, hi = 0, _as_ordered(float(fs[:, -1].max()))
    while counts_at(_as_float(hi)).sum() < total:  # float round-off at the top: step up
        hi += 1
    # invariant: total(lo) < total ≤ total(hi); total(0) = 0 < total
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if counts_at(_as_float(mid)).sum() >= total:
            hi = mid
        else:
            lo = mid
    below, at = counts_at(_as_float(lo)), counts_at(_as_float(hi))
    left = total - int(below.sum())
    out = below.copy()
    for i in range(len(out)):  # the removals tied at level hi: earlier layers first
        take = min(int(at[i] - below[i]), left)
        out[i] += take
        left -= take
    assert left == 0 and out.sum() == total
    return out


@register_allocation("sensitivity", "Sensitivity", "layer sensitivity analysis",
                     "per-layer sparsities that give every layer the same measured loss increase (needs a table "
                     "from session.sensitivity(...))", needs=("sensitivity",))
def sensitivity(sparsity: float, ctx: AllocationContext) -> np.ndarray:
    """Equalise each layer's measured harm at the budget (see :func:`equalise_counts`): the increase of
    ``ctx.sensitivity`` (each layer pruned alone over a sparsity grid). Without a table: a ``ValueError`` saying how
    to measure one."""
    table = ctx.sensitivity
    if table is None:
        raise ValueError("allocation 'sensitivity' needs a measured sensitivity table of these weights: run "
                         "session.sensitivity(...) first (or session.use_sensitivity(df) with an earlier one); "
                         f"other allocations: {', '.join(a for a in list_allocations() if a != 'sensitivity')}.")
    sizes = ctx.sizes
    total = round_half_up(sparsity * int(sizes.sum()))
    return equalise_counts([table.curve(n) for n in ctx.names], sizes, total)
