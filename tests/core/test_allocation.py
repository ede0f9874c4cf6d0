import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prune_lab.core.allocation import AllocationContext, allocate, apportion, list_allocations
from prune_lab.core.ranking import Ranking
from prune_lab.core.scores import lamp_scores


def context(shapes, is_conv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = tuple(f"l{i}" for i in range(len(shapes)))
    w = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes)}
    mag = Ranking.from_scores(names, {n: v.abs() for n, v in w.items()}, w)
    lamp = Ranking.from_scores(names, lamp_scores(w), w)
    return AllocationContext(names, tuple(tuple(s) for s in shapes), tuple(is_conv or [len(s) == 4 for s in shapes]),
                             lambda: mag, lambda: lamp), w


SHAPES = [(8, 1, 3, 3), (16, 8, 3, 3), (32, 64), (10, 32)]


def test_registered_allocations():
    assert list_allocations() == ["uniform", "global", "lamp", "uniform_plus", "erk"]
    with pytest.raises(ValueError, match="Did you mean 'erk'.*Valid choices.*'uniform'"):
        allocate("erkk", 0.5, context(SHAPES)[0])


def test_uniform_rounds_each_layer():
    ctx, _ = context([(3, 3), (5, 1)])
    assert allocate("uniform", 0.5, ctx).tolist() == [5, 3]  # round(4.5) = 5, round(2.5) = 3 (halves up)


def test_global_is_one_threshold_on_magnitudes():
    ctx, w = context(SHAPES)
    counts = allocate("global", 0.7, ctx)
    n = sum(v.numel() for v in w.values())
    assert counts.sum() == round(0.7 * n)
    flat = torch.cat([v.abs().reshape(-1) for v in w.values()])
    t = torch.sort(flat).values[counts.sum() - 1]
    for (name, v), c in zip(w.items(), counts):
        assert c == int((v.abs() <= t).sum())


def test_lamp_allocation_equals_global_on_lamp_scores_and_never_empties():
    ctx, w = context(SHAPES)
    for s in (0.5, 0.9, 0.99):
        counts = allocate("lamp", s, ctx)
        assert (counts < ctx.sizes).all()  # the largest weight of every layer scores 1
        assert counts.tolist() == ctx.lamp_ranking().global_counts(round(s * ctx.sizes.sum())).tolist()


def test_uniform_plus_first_conv_dense_last_keeps_20_percent():
    ctx, _ = context(SHAPES)
    for s in (0.3, 0.8, 0.9):
        counts = allocate("uniform_plus", s, ctx)
        assert counts[0] == 0
        assert counts[-1] <= math.floor(0.8 * ctx.sizes[-1])
        assert counts.sum() == math.floor(s * ctx.sizes.sum() + 0.5)
        mids = counts[1:-1] / ctx.sizes[1:-1]
        assert np.ptp(mids) < 2 / ctx.sizes[1:-1].min()  # one common sparsity (up to rounding)


def test_uniform_plus_first_linear_is_pruned_and_infeasible_budget_is_clear():
    ctx, _ = context([(40, 20), (30, 40), (10, 30)])
    counts = allocate("uniform_plus", 0.5, ctx)
    assert counts[0] > 0
    conv_ctx, _ = context([(50, 3, 3, 3), (10, 50)])
    with pytest.raises(ValueError, match="cannot reach sparsity 0.9.*at most"):
        allocate("uniform_plus", 0.9, conv_ctx)


def test_erk_densities_follow_the_formula():
    shapes = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128), (10, 256)]
    ctx, _ = context(shapes)
    s = 0.9
    counts = allocate("erk", s, ctx)
    sizes = ctx.sizes
    assert counts.sum() == round(s * sizes.sum())
    density = 1 - counts / sizes
    raw = np.array([sum(sh) / math.prod(sh) for sh in shapes])
    free = density < 1
    ratio = density[free] / raw[free]
    assert np.allclose(ratio, ratio[0], rtol=0.02)  # density ∝ (Σ dims)/(Π dims) for the non-dense layers
    assert (density <= 1).all()


def test_erk_caps_layers_at_dense():
    ctx, _ = context([(4, 1, 3, 3), (200, 300), (10, 200)])
    counts = allocate("erk", 0.5, ctx)
    assert counts[0] == 0  # the tiny conv would exceed density 1: it stays dense
    assert counts.sum() == round(0.5 * ctx.sizes.sum())


@given(st.lists(st.integers(1, 500), min_size=1, max_size=6), st.floats(0, 0.999))
def test_every_allocation_prunes_exactly_the_budget(sizes, s):
    shapes = [(n, 1) for n in sizes]
    ctx, _ = context(shapes, is_conv=[False] * len(sizes))
    total = sum(sizes)
    for name in list_allocations():
        try:
            counts = allocate(name, s, ctx)
        except ValueError as e:
            assert name == "uniform_plus" and "cannot reach" in str(e)
            continue
        assert ((counts >= 0) & (counts <= ctx.sizes)).all()
        if name == "uniform":
            assert counts.tolist() == [math.floor(s * n + 0.5) for n in sizes]
        else:
            assert counts.sum() == math.floor(s * total + 0.5)


@given(st.lists(st.floats(0, 50), min_size=1, max_size=8), st.integers(0, 400))
def test_apportion_exact_and_within_caps(targets, extra):
    caps = [int(t) + 5 for t in targets]
    total = min(int(round(sum(targets))), sum(caps))
    c = apportion(total, targets, caps)
    assert c.sum() == total and (c >= 0).all() and (c <= np.array(caps)).all()
    assert np.all(np.abs(c - np.minimum(targets, caps)) < 1 + 1e-9 + len(targets))
