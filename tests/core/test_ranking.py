import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from prune_lab.core.ranking import Ranking, ordered_int32


def reference_global_counts(names, scores, k):
    """A stable sort of all scores concatenated in layer order; count each layer among the k lowest."""
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    layer_of = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    order = torch.sort(flat, stable=True).indices[:k]
    return np.bincount(layer_of[order].numpy(), minlength=len(names))


layer_sizes = st.lists(st.integers(1, 40), min_size=1, max_size=5)


@given(layer_sizes, st.integers(0, 2**31 - 1), st.booleans(), st.floats(0, 1))
def test_global_counts_match_a_stable_global_sort(sizes, seed, ties, frac):
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(len(sizes))]
    if ties:  # few distinct values: many ties within and across layers, negative values too
        scores = {n: torch.randint(-3, 4, (s,), generator=g).float() for n, s in zip(names, sizes)}
    else:
        scores = {n: torch.randn(s, generator=g) for n, s in zip(names, sizes)}
    r = Ranking.from_scores(names, scores, scores)
    k = int(frac * sum(sizes))
    counts = r.global_counts(k)
    assert counts.sum() == k
    assert counts.tolist() == reference_global_counts(names, scores, k).tolist()
    # threshold separation: every kept score >= every pruned score, across all layers
    masks = r.masks(counts)
    kept = torch.cat([scores[n][masks[n]] for n in names])
    pruned = torch.cat([scores[n][~masks[n]] for n in names])
    if kept.numel() and pruned.numel():
        assert kept.min() >= pruned.max()


@given(st.integers(1, 60), st.integers(0, 1000))
def test_frobenius_from_cumulative_sums(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    s = torch.rand(n, generator=g)
    r = Ranking.from_scores(["w"], {"w": s}, {"w": w})
    for k in {0, n // 3, n // 2, n}:
        m = r.masks([k])["w"]
        assert int((~m).sum()) == k
        direct = (w * (~m)).norm().item()
        assert abs(r.frobenius([k])[0] - direct) <= 1e-5 * max(1.0, direct)
    curve = r.frobenius_curve([[0], [n // 2], [n]])
    assert np.allclose(curve[:, 0], [r.frobenius([c])[0] for c in (0, n // 2, n)])


def test_ordered_int32_preserves_order_and_merges_signed_zero():
    v = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    k = ordered_int32(v)
    assert (k[1:] >= k[:-1]).all()
    assert k[3] == k[4]
    assert (k.diff() > 0).sum() == len(v) - 2


def test_masks_nested_as_k_grows():
    torch.manual_seed(0)
    s = {"a": torch.randn(50), "b": torch.randn(30)}
    r = Ranking.from_scores(["a", "b"], s, s)
    prev = None
    for k in range(0, 81, 7):
        m = r.masks(r.global_counts(k))
        if prev is not None:
            for n in s:
                assert not (m[n] & ~prev[n]).any()  # nothing revived
        prev = m


def test_critical_count_by_hand():
    s = {"a": torch.tensor([0.1, 0.5, 0.9]), "b": torch.tensor([0.2, 0.3, 0.4, 0.05])}
    r = Ranking.from_scores(["a", "b"], s, s)
    # t* = min(0.9, 0.4) = 0.4; scores below it: 0.1, 0.2, 0.3, 0.05 -> 4 of 7
    assert r.critical_count() == 4
    counts = r.global_counts(5)  # one more than critical: layer b loses its last weight
    assert counts.tolist() == [1, 4]
