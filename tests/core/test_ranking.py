import numpy as np
import pytest
import torch
from hypothesis import given, settings
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


# ---------------------------------------------------------------------------------------------------------------
# compressed keys, block-sampled cumulative sums, memory per weight
# ---------------------------------------------------------------------------------------------------------------
from prune_lab.core import ranking as R  # noqa: E402
from prune_lab.core.ranking import SortedKeys  # noqa: E402


def _check_sorted_keys(keys: np.ndarray, queries):
    sk = SortedKeys(keys)
    assert np.array_equal(sk.array(), keys)  # lossless
    for v in queries:
        assert sk.count_le(int(v)) == int(np.searchsorted(keys, v, "right")), v
        assert sk.count_lt(int(v)) == int(np.searchsorted(keys, v, "left")), v
    for h in {int(keys[0]) >> 16, int(keys[-1]) >> 16, (int(keys[0]) >> 16) - 1, (int(keys[-1]) >> 16) + 1}:
        a, b = sk.bucket(h)
        assert a == int(np.searchsorted(keys, h << 16, "left"))
        assert b == int(np.searchsorted(keys, (h << 16) | 0xFFFF, "right"))
    return sk


@given(st.integers(0, 2**31 - 1), st.integers(1, 3000), st.integers(0, 6), st.sampled_from([0, 1, 3, 8, 13, 16]))
def test_sorted_keys_are_lossless_and_count_like_searchsorted(seed, n, span, zeros):
    """Narrow upper-half spans make the compressed form win at small sizes; ``zeros`` trailing zero bits in every
    lower half exercise the 2-byte, 1-byte and no-byte lower halves."""
    rng = np.random.default_rng(seed)
    base = int(rng.integers(-(2**31), 2**31 - (span + 1) * 65536))
    keys = base + rng.integers(0, (span + 1) * 65536, n)
    keys = np.sort(((keys >> zeros) << zeros).clip(-(2**31), 2**31 - 1)).astype(np.int32)
    queries = np.concatenate([keys[rng.integers(0, n, 20)].astype(np.int64) + rng.integers(-2, 3, 20),
                              [keys[0] - 1, keys[-1] + 1, -(2**31), 2**31 - 1, -(2**40), 2**40]])
    _check_sorted_keys(keys, queries)


def test_sorted_keys_forms_and_bytes():
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal(200_000).astype(np.float32))
    for dtype, lo_bytes in ((torch.float32, 2), (torch.float16, 1), (torch.bfloat16, 0)):
        keys = torch.sort(R.ordered_int32(w.to(dtype).abs())).values.numpy()
        sk = _check_sorted_keys(keys, keys[::997])
        assert sk.plain is None and (sk.lo is None if lo_bytes == 0 else sk.lo.itemsize == lo_bytes)
        assert sk.nbytes <= lo_bytes * keys.size + 4 * 65537
        back = SortedKeys.from_state(sk.state())
        assert np.array_equal(back.array(), keys)
    small = np.array([-7, 0, 0, 3], dtype=np.int32)  # a small layer keeps plain keys
    assert _check_sorted_keys(small, [-8, -7, 0, 1, 3, 4]).plain is not None
    assert SortedKeys(np.zeros(0, dtype=np.int32)).n == 0


@pytest.mark.parametrize("score_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_memory_per_weight(dtype, score_dtype):
    """Bytes held per weight: ≈ 6 for float32 scores, ≈ 5 for float16 scores, ≈ 4 for bfloat16 scores (was 12)."""
    g = torch.Generator().manual_seed(0)
    w = {f"l{i}": torch.randn(n, generator=g).to(dtype) for i, n in enumerate([300_000, 200_000, 1000])}
    n = sum(v.numel() for v in w.values())
    wbytes = sum(v.numel() * v.element_size() for v in w.values())
    mag = Ranking.from_scores(list(w), {k: v.abs() for k, v in w.items()}, w, score_dtype=score_dtype)
    other = Ranking.from_scores(list(w), {k: torch.rand(v.shape, generator=g) for k, v in w.items()}, w,
                                score_dtype=score_dtype)  # float32 scores
    per_mag, per_other = mag.nbytes() / n, other.nbytes() / n
    exact_16 = {torch.bfloat16: 4, torch.float16: 5}.get(dtype, 6)
    assert per_mag < (4.1 if score_dtype is not None else exact_16 + 0.1)
    assert per_other < (4.1 if score_dtype is not None else 6.1)
    assert mag.nbytes() <= 3.05 * wbytes and other.nbytes() <= 3.05 * wbytes
    if score_dtype is not None or dtype == torch.bfloat16:
        assert mag.nbytes() <= 2.05 * wbytes


def test_block_sampled_cumulative_sum_is_exact_at_every_count():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 91, generator=g)
    s = torch.rand(7, 91, generator=g)
    for block in (1, 4, 64, 1000):
        r = Ranking.from_scores(["w"], {"w": s}, {"w": w}, block=block)
        counts = list(range(0, w.numel() + 1))
        frob = np.array([r.frobenius([c])[0] for c in counts])
        order = torch.sort(s.reshape(-1), stable=True).indices
        direct = torch.cat([torch.zeros(1, dtype=torch.float64),
                            torch.cumsum(w.reshape(-1)[order].double() ** 2, 0)]).sqrt().numpy()
        assert np.allclose(frob, direct, rtol=1e-12, atol=1e-12)
        assert np.allclose(r.frobenius_curve(np.array(counts)[:, None])[:, 0], direct, rtol=1e-12, atol=1e-12)
        assert r.weight_norms()[0] == pytest.approx(float(w.double().norm()), rel=1e-12)


def test_non_contiguous_weights_and_the_device_code_path(monkeypatch):
    """Channels-last weights are read through their strides; the torch (device) path gives the host path's
    numbers."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 5, 3, 3, generator=g).to(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    r = Ranking.from_scores(["c"], {"c": w.abs()}, {"c": w})
    for c in (0, 1, 100, 255, 256, 257, 269, 270):
        m = r.masks([c])["c"]
        assert r.frobenius([c])[0] == pytest.approx(float((w.double() * ~m).norm()), rel=1e-12, abs=1e-12)
    w2 = w.contiguous()
    r2 = Ranking.from_scores(["c"], {"c": w2.abs()}, {"c": w2})
    host = r2.frobenius([100])
    monkeypatch.setattr(R.LayerRank, "_host_path", lambda self: False)
    assert np.allclose(r2.frobenius([100]), host, rtol=1e-13)


def test_numpy_and_torch_sorts_agree():
    """The CPU sort (numpy, ``key << 32 | index``) and the device sort (``torch.sort(stable=True)``) give the same
    order and keys, ties included."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(-50, 50, (100_000,), generator=g).float() / 7
    s[:10] = -0.0
    s[10:20] = 0.0
    a_order, a_keys, _ = R._sort_cpu([R.ordered_int32(s)])
    b_order, b_keys, _ = R._sort_torch([R.ordered_int32(s)])
    assert torch.equal(a_order, b_order) and a_order.dtype == torch.int32
    assert np.array_equal(a_keys.array(), b_keys.array())


def test_magnitude_scores_read_w2_from_the_sorted_keys_bit_for_bit():
    """Scores |w|: the cumulative w² comes from the sorted keys (no gather through the order) and equals the
    gathered sums exactly; other scores take the gather."""
    g = torch.Generator().manual_seed(5)
    w = {"a": torch.randn(300, 70, generator=g), "b": torch.randn(1000, generator=g)}
    w["a"][0, :5] = 0.0
    w["a"][1, :5] = -0.0
    mag = R.Ranking.from_scores(["a", "b"], {n: v.abs() for n, v in w.items()}, w, block=64)
    noisy = {n: v.abs() * (1 + 1e-7 * torch.rand(v.shape, generator=g)) for n, v in w.items()}  # not |w|: gathered
    assert not R._are_magnitudes(noisy["a"].reshape(-1), w["a"].reshape(-1))
    assert R._are_magnitudes(w["a"].abs().reshape(-1), w["a"].reshape(-1))
    for n in w:
        lr = mag.layers[n]
        want, total = R._block_sums(w[n].reshape(-1), lr.order, 64)  # the gather path
        assert torch.equal(lr.csum, want) and lr.norm2 == float(total)


@pytest.mark.parametrize("bad", [float("nan"), -float("nan")])
def test_nan_scores_are_named(bad):
    s = {"a": torch.rand(5), "b": torch.rand(4)}
    s["b"][2] = bad
    with pytest.raises(ValueError, match="scores of layer 'b' contain NaN"):
        Ranking.from_scores(["a", "b"], s, s)
    r = Ranking.from_scores(["a"], {"a": torch.rand(5)}, {"a": torch.rand(5)})
    with pytest.raises(ValueError, match="contain NaN"):
        r.with_sorted_values({"a": torch.tensor([0.0, 1.0, bad, 2.0, 3.0])})
    with pytest.raises(ValueError, match="not non-decreasing"):
        r.with_sorted_values({"a": torch.tensor([0.0, 2.0, 1.0, 2.0, 3.0])})


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 4000), min_size=1, max_size=4), st.floats(0, 1),
       st.sampled_from([None, torch.bfloat16]), st.booleans(), st.booleans())
def test_global_counts_on_compressed_keys_match_a_stable_global_sort(seed, sizes, frac, score_dtype, with_inf,
                                                                     mixed):
    """Scores in a narrow band (compressed keys even in small layers), many ties; or some -inf as well (starting
    masks; plain keys in small layers); ``mixed``: some layers' scores are bfloat16 values (no lower halves
    stored) beside float32 ones."""
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(len(sizes))]
    scores = {}
    for n, size in zip(names, sizes):
        v = 1.0 + torch.randint(0, 300, (size,), generator=g).float() * 2.0**-20
        if mixed and torch.rand(1, generator=g).item() < 0.5:
            v = (1.0 + torch.randint(0, 3, (size,), generator=g).float() * 2.0**-7).to(torch.bfloat16).float()
        if with_inf:
            v[torch.rand(size, generator=g) < 0.05] = -float("inf")
        scores[n] = v
    r = Ranking.from_scores(names, scores, scores, score_dtype=score_dtype)
    if not with_inf:
        assert all(lr.keys.plain is None for lr in r.layers.values() if lr.numel > 16)
    ref_scores = {n: v.to(score_dtype) if score_dtype is not None else v for n, v in scores.items()}
    k = int(frac * sum(sizes))
    assert r.global_counts(k).tolist() == reference_global_counts(names, ref_scores, k).tolist()
    t = min(float(v.max()) for v in ref_scores.values())
    assert r.critical_count() == sum(int((v < t).sum()) for v in ref_scores.values())


def test_ranking_build_keeps_no_int64_order_and_consumes_scores():
    w = {"a": torch.randn(3000), "b": torch.randn(50)}
    scores = {k: v.abs() for k, v in w.items()}
    r = Ranking.from_scores(["a", "b"], scores, w, consume=True)
    assert scores == {} and all(lr.order.dtype == torch.int32 for lr in r.layers.values())
    assert all(lr.weight.data_ptr() == w[n].data_ptr() for n, lr in r.layers.items())  # referenced, not copied
