import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prune_lab.core.allocation import (AllocationContext, SensitivityTable, allocate, apportion, equalise_counts,
                                       get_allocation, list_allocations)
from prune_lab.core.ranking import Ranking
from prune_lab.core.scores import lamp_scores


def context(shapes, is_conv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = tuple(f"l{i}" for i in range(len(shapes)))
    w = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes)}
    mag = Ranking.from_scores(names, {n: v.abs() for n, v in w.items()}, w)
    lamp = Ranking.from_scores(names, lamp_scores(w), w)
    return AllocationContext(names, tuple(tuple(s) for s in shapes), tuple(is_conv or [len(s) == 4 for s in shapes]),
                             mag, lamp), w


SHAPES = [(8, 1, 3, 3), (16, 8, 3, 3), (32, 64), (10, 32)]


def test_registered_allocations():
    assert list_allocations() == ["uniform", "global", "lamp", "uniform_plus", "erk", "sensitivity"]
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
        assert counts.tolist() == ctx.lamp_ranking.global_counts(round(s * ctx.sizes.sum())).tolist()


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
        if get_allocation(name).needs:  # a measured table: tested on its own below
            continue
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


# ----------------------------------------------------------------------------------------------------------------
# sensitivity: equalise the per-layer harm
# ----------------------------------------------------------------------------------------------------------------
def test_equalise_counts_small_cases_by_hand():
    # harm x and 2x: equal harm λ at x₁ = λ, x₂ = λ/2; 100λ + 100λ/2 = 90 → λ = 0.6
    assert equalise_counts([([0, 1], [0, 1]), ([0, 1], [0, 2])], [100, 100], 90).tolist() == [60, 30]
    # different sizes: harm x on 10 weights and x on 30 weights → same sparsity 0.5 each
    assert equalise_counts([([0, 1], [0, 1]), ([0, 1], [0, 1])], [10, 30], 20).tolist() == [5, 15]
    # a layer whose harm jumps at 0.5: it stops at 0.5 while the other goes on
    jump = ([0, 0.5, 0.6, 0.99], [0, 0.01, 5.0, 9.0])
    lin = ([0, 0.99], [0, 1.0])
    c = equalise_counts([jump, lin], [100, 100], 100)
    assert c.tolist() == [50, 50]  # λ ≈ 0.5: the linear layer reaches 0.5 when the jump layer stands at 0.5
    c = equalise_counts([jump, lin], [100, 100], 140)
    assert c[0] <= 51 and c.sum() == 140  # the fragile layer stays near 0.5; the other takes the rest
    assert equalise_counts([lin, lin], [7, 9], 0).tolist() == [0, 0]


def test_equalise_counts_flat_curves_share_evenly_and_ties_go_to_earlier_layers():
    flat = ([0.0, 0.5, 0.9], [0.0, 0.0, 0.0])
    assert equalise_counts([flat, flat], [100, 100], 100).tolist() == [50, 50]  # one common sparsity
    assert equalise_counts([flat, flat], [10, 10], 1).tolist() == [1, 0]  # a tie: the earlier layer first
    assert equalise_counts([flat, flat], [10, 10], 3).tolist() == [2, 1]


def test_equalise_counts_refuses_what_the_grid_cannot_reach():
    with pytest.raises(ValueError, match="reach at most 180 of 200.*grid that goes higher"):
        equalise_counts([([0, 0.9], [0, 1]), ([0, 0.9], [0, 1])], [100, 100], 181)


def _random_curves(seed, n_layers):
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_layers):
        k = int(rng.integers(1, 6))
        x = np.concatenate([[0.0], np.sort(rng.uniform(0.05, 0.99, k))])
        y = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0, k) * (rng.uniform(size=k) > 0.3))])
        curves.append((x, y))
    return curves


@given(st.integers(0, 10_000), st.lists(st.integers(1, 300), min_size=1, max_size=6), st.floats(0, 1))
def test_equalise_counts_exact_nested_deterministic_and_equal_harm(seed, sizes, frac):
    curves = _random_curves(seed, len(sizes))
    sizes = np.asarray(sizes)
    caps = np.asarray([int(np.floor(n * x[-1] + 1e-9)) for (x, _), n in zip(curves, sizes)])
    total = int(frac * caps.sum())
    c = equalise_counts(curves, sizes, total)
    assert c.sum() == total and (c >= 0).all() and (c <= caps).all()
    assert c.tolist() == equalise_counts(curves, sizes, total).tolist()  # deterministic
    if total < caps.sum():  # nested: one more weight never takes one away from a layer
        assert (equalise_counts(curves, sizes, total + 1) >= c).all()
    # the definition: the last removal of any layer costs no more than the next removal of any other layer
    scale = max(y[-1] for _, y in curves) or 1.0
    eps = 1e-6 * scale
    harm = [lambda s, x=x, y=y: float(np.interp(s, x, y)) + eps * s for x, y in curves]
    for i in range(len(sizes)):
        for j in range(len(sizes)):
            if i != j and c[i] > 0 and c[j] < caps[j]:
                assert harm[i](c[i] / sizes[i]) <= harm[j]((c[j] + 1) / sizes[j]) + 1e-9 * scale


def test_sensitivity_table_curve_is_clipped_merged_and_monotone():
    t = SensitivityTable.make(["a"], [[0.5, 0.5, 0.8, 0.9]], [[-0.2, 0.1, 0.05, 0.3]], metric="loss")
    x, y = t.curve("a")
    assert x.tolist() == [0.0, 0.5, 0.8, 0.9]
    assert y.tolist() == [0.0, 0.1, 0.1, 0.3]  # negatives → 0, repeated sparsity → its max, running maximum
    assert t.key == SensitivityTable.make(["a"], [[0.5, 0.5, 0.8, 0.9]], [[-0.2, 0.1, 0.05, 0.3]]).key
    assert t.key != SensitivityTable.make(["a"], [[0.5, 0.5, 0.8, 0.9]], [[-0.2, 0.1, 0.05, 0.4]]).key
    with pytest.raises(ValueError, match="no layer 'b'.*measure every layer"):
        t.curve("b")
    with pytest.raises(ValueError, match="sparsities of layer 'a' must lie in"):
        SensitivityTable.make(["a"], [[1.0]], [[0.0]])


def test_sensitivity_allocation_uses_the_context_table_and_needs_one():
    ctx, _ = context([(10, 10), (10, 10)])
    table = SensitivityTable.make(["l0", "l1"], [[0.5, 0.9], [0.5, 0.9]], [[1.0, 2.0], [0.1, 0.2]])
    x0, y0 = table.curve("l0")
    x1, y1 = table.curve("l1")
    expected = equalise_counts([(x0, y0), (x1, y1)], [100, 100], 100)
    assert expected.tolist()[1] > expected.tolist()[0]  # the insensitive layer takes more
    explicit = AllocationContext(ctx.names, ctx.shapes, ctx.is_conv, ctx.ranking, ctx.lamp_ranking, table)
    assert allocate("sensitivity", 0.5, explicit).tolist() == expected.tolist()
    assert get_allocation("sensitivity").needs == {"sensitivity"} and not get_allocation("erk").needs
    with pytest.raises(ValueError, match="needs a measured sensitivity table.*session.sensitivity"):
        allocate("sensitivity", 0.5, ctx)  # no silent stand-in


def test_sensitivity_allocation_is_monotone_in_sparsity():
    plain, _ = context(SHAPES, seed=1)
    g = np.random.default_rng(1)
    grid = np.linspace(0.1, 0.995, 12)
    table = SensitivityTable.make(plain.names, [grid] * len(SHAPES),
                                  [np.cumsum(g.uniform(0, 1, grid.size)) for _ in SHAPES])
    ctx = AllocationContext(plain.names, plain.shapes, plain.is_conv, plain.ranking, plain.lamp_ranking, table)
    prev = np.zeros(len(SHAPES), dtype=np.int64)
    for s in np.linspace(0, 0.99, 23):
        c = allocate("sensitivity", float(s), ctx)
        assert (c >= prev).all() and c.sum() == round(s * ctx.sizes.sum())
        prev = c


def test_allocations_declare_the_rankings_they_read():
    """The context carries data, not callbacks: each allocation says which ranking it reads, and gets only that."""
    assert get_allocation("global").needs == {"ranking"} and get_allocation("lamp").needs == {"lamp_ranking"}
    full, _ = context(SHAPES)
    bare = AllocationContext(full.names, full.shapes, full.is_conv)
    for name in ("uniform", "uniform_plus", "erk"):
        assert allocate(name, 0.6, bare).tolist() == allocate(name, 0.6, full).tolist()
    for name, need in (("global", "ranking"), ("lamp", "lamp_ranking")):
        with pytest.raises(ValueError, match=f"needs the context's '{need}'"):
            allocate(name, 0.6, bare)
    sub = full.subset(["l1", "l3"])
    assert sub.sizes.tolist() == [full.sizes[1], full.sizes[3]]
    assert allocate("global", 0.5, sub).tolist() == full.ranking.subset(["l1", "l3"]).global_counts(
        round(0.5 * sub.sizes.sum())).tolist()
