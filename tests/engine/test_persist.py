"""Session caches on disk, cache invalidation when the weights change, order independence, the LRU bound."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prune_lab as pl
from prune_lab.core.ranking import SortedKeys
from prune_lab.engine import persist
from tests.conftest import SmallConvNet, randomize_bn


def _same_result(a, b):
    assert a.pruned == b.pruned and a.frobenius == b.frobenius and a.layers == b.layers
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.layers)


def test_saved_cache_reopens_without_scoring(convnet, tmp_path, count_sorts):
    s1 = pl.PruneSession(convnet, device="cpu")
    want = {(m, x): s1.prune(m, x) for m in ("lap", "lamp", "random") for x in (0.3, 0.9)}
    assert s1.save_cache(tmp_path / "c.pt") == len(s1.cache.rankings) == 4  # lap, magnitude, lamp, random
    n_sorts = len(count_sorts)
    s2 = pl.PruneSession(convnet, device="cpu")
    assert s2.load_cache(tmp_path / "c.pt") == 4
    for (m, x), res in want.items():
        _same_result(s2.prune(m, x), res)
    assert len(count_sorts) == n_sorts  # nothing was scored or sorted again
    # LAMP's ranking shares magnitude's order after the reload, as before
    lamp = next(r for k, r in s2.cache.rankings.items() if k.scores == "lamp")
    mag = next(r for k, r in s2.cache.rankings.items() if k.scores == "magnitude")
    assert lamp.layers["c1.weight"].order.data_ptr() == mag.layers["c1.weight"].order.data_ptr()


def test_stale_cache_is_not_trusted(tmp_path, count_sorts):
    torch.manual_seed(0)
    model = randomize_bn(SmallConvNet().eval())
    s1 = pl.PruneSession(model, device="cpu")
    s1.prune("lap", 0.5)
    persist.save_cache(s1, tmp_path / "c.pt")
    with torch.no_grad():
        model.b1.weight.mul_(3.0)  # LAP depends on BatchNorm factors: the fingerprint covers them
    s2 = pl.PruneSession(model, device="cpu")
    assert persist.load_cache(s2, tmp_path / "c.pt") == 0
    _same_result(s2.prune("lap", 0.5), pl.prune(model, "lap", 0.5, device="cpu"))
    # another prunable set (exclude) does not take the entries either
    s3 = pl.PruneSession(model, device="cpu", exclude="fc2")
    persist.save_cache(s2, tmp_path / "c2.pt")
    assert persist.load_cache(s3, tmp_path / "c2.pt") == 0


def test_bad_cache_file(tmp_path, mlp):
    s = pl.PruneSession(mlp, device="cpu")
    (tmp_path / "x").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="is not a saved session cache"):
        s.load_cache(tmp_path / "x")
    torch.save({"format": "something else"}, tmp_path / "y")
    with pytest.raises(ValueError, match="is not a saved session cache"):
        s.load_cache(tmp_path / "y")


# ---------------------------------------------------------------------------------------------------------------
# weights changed under a session: never stale masks
# ---------------------------------------------------------------------------------------------------------------
def _change_in_place(model):
    with torch.no_grad():
        model[0].weight.mul_(-torch.arange(30.0).reshape(5, 6))


def _change_data(model):
    model[0].weight.data = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))


def _change_through_data_in_place(model):  # skips the version counter
    model[2].weight.data.mul_(-torch.arange(20.0).reshape(4, 5))


def _change_through_data_copy(model):  # skips the version counter
    model[0].weight.data.copy_(torch.randn(5, 6, generator=torch.Generator().manual_seed(9)))


def _change_state_dict(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["2.weight"] = torch.randn(4, 5, generator=torch.Generator().manual_seed(8))
    model.load_state_dict(sd)


@pytest.mark.parametrize("change", [_change_in_place, _change_data, _change_through_data_in_place,
                                    _change_through_data_copy, _change_state_dict])
@pytest.mark.parametrize("method", ["magnitude", "lamp", "lap", "lap_forward"])
def test_weight_change_invalidates_caches(mlp, change, method):
    session = pl.PruneSession(mlp, device="cpu")
    old = session.prune(method, 0.5)
    _ = old.masks
    fp = session.fingerprint
    change(mlp)
    new = session.prune(method, 0.5)
    assert session.fingerprint != fp
    assert new.model_fingerprint == session.fingerprint != old.model_fingerprint
    _same_result(new, pl.prune(mlp, method, 0.5, device="cpu"))


def test_channels_last_weights_changed_through_data(convnet):
    model = convnet.to(memory_format=torch.channels_last)
    assert not model.c2.weight.is_contiguous()
    session = pl.PruneSession(model, device="cpu")
    old = session.prune("lap", 0.5)
    fp = session.fingerprint
    model.c2.weight.data.mul_(torch.rand(model.c2.weight.shape, generator=torch.Generator().manual_seed(0)))
    new = session.prune("lap", 0.5)
    assert session.fingerprint != fp and new.model_fingerprint != old.model_fingerprint
    _same_result(new, pl.prune(model, "lap", 0.5, device="cpu"))


def test_clear_cache_takes_a_new_fingerprint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 3))
    session = pl.PruneSession(model, device="cpu")
    session.prune("magnitude", 0.5)
    fp = session.fingerprint
    model[0].weight.data.view(-1)[1] += 100.0  # one entry through .data, outside the fixed sample (every 78th)
    assert session.fingerprint == fp  # the documented limit of the cheap per-call check
    session.clear_cache()
    assert session.fingerprint != fp
    _same_result(session.prune("magnitude", 0.5), pl.prune(model, "magnitude", 0.5, device="cpu"))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["lamp", "lap", "magnitude", "random", "lap_backward"]),
                          # 0.97, not 0.99: round(0.99·n) = n in each of these small layers, and a budget of every
                          # weight (sparsity 1.0) is refused (tests/test_bad_input.py)
                          st.sampled_from([0.0, 0.2, 0.5, 0.77, 0.9, 0.97]),
                          st.sampled_from([None, "global", "erk"])), min_size=2, max_size=8))
def test_slider_moves_in_any_order_give_identical_results(moves):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    session = pl.PruneSession(model, device="cpu")
    session.max_cached = 2  # evictions in between must not change anything either
    first = {}
    for method, s, alloc in moves + moves[::-1]:
        res = session.prune(method, s, allocation=alloc)
        key = (method, s, alloc)
        if key in first:
            _same_result(res, first[key])
        else:
            first[key] = res
            _same_result(res, pl.prune(model, method, s, allocation=alloc, device="cpu"))


def test_cache_is_bounded_lru(mlp, count_sorts):
    session = pl.PruneSession(mlp, device="cpu")
    session.max_cached = 3
    one = None
    for seed in range(10):
        session.prune("random", 0.5, seed=seed)
        one = one or session.cache_nbytes()
        assert len(session.cache.rankings) <= 3
    assert session.cache_nbytes() <= 3 * one
    assert len(count_sorts) == 10
    session.prune("random", 0.5, seed=9)  # most recent: kept
    session.prune("random", 0.5, seed=7)
    assert len(count_sorts) == 10
    session.prune("random", 0.5, seed=0)  # least recent: evicted long ago
    assert len(count_sorts) == 11
    for seed in range(10):  # sparsity-dependent mask sets are bounded as well
        session.prune("lap_forward", 0.1 * (seed % 9))
        assert len(session.cache.mask_sets) <= 3


def test_format_1_files_are_read_and_converted(convnet, tmp_path):
    s1 = pl.PruneSession(convnet, device="cpu")
    want = {(m, x): s1.prune(m, x) for m in ("lamp", "lap") for x in (0.3, 0.9)}
    s1.save_cache(tmp_path / "v2.pt")
    payload = torch.load(tmp_path / "v2.pt", weights_only=True)
    payload["format_version"] = 1
    weights = pl.prunable_parameters(convnet)
    for e in payload["entries"]:
        e.pop("score_dtype")
        for n, d in e["layers"].items():
            w2 = weights[n].detach().reshape(-1)[d["order"].long()].double() ** 2
            csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w2, 0)]).float()
            keys = torch.from_numpy(SortedKeys.from_state(d["keys"]).array())
            e["layers"][n] = {"order": d["order"], "csum": csum, "keys": keys, "shape": d["shape"]}
    torch.save(payload, tmp_path / "v1.pt")
    s2 = pl.PruneSession(convnet, device="cpu")
    assert s2.load_cache(tmp_path / "v1.pt") == len(payload["entries"])
    for (m, x), res in want.items():
        got = s2.prune(m, x)
        assert got.pruned == res.pruned and all(torch.equal(got.masks[n], res.masks[n]) for n in res.layers)
        assert got.frobenius == pytest.approx(res.frobenius, rel=1e-5)


def test_cache_of_another_score_dtype_is_skipped(convnet, tmp_path):
    s1 = pl.PruneSession(convnet, device="cpu", score_dtype="bfloat16")
    s1.prune("lap", 0.5)
    s1.save_cache(tmp_path / "c.pt")
    assert pl.PruneSession(convnet, device="cpu").load_cache(tmp_path / "c.pt") == 0
    s3 = pl.PruneSession(convnet, device="cpu", score_dtype="bfloat16")
    assert s3.load_cache(tmp_path / "c.pt") == 1
    _same_result(s3.prune("lap", 0.5), s1.prune("lap", 0.5))


def test_saved_hyperparameters_match_in_any_order(mlp, tmp_path, count_sorts):
    """Ranking keys hold the hyperparameters sorted by name, whatever order a file (or a query) lists them in."""
    data = pl.data.synthetic(n_train=16, n_test=8, input_shape=(6,), num_classes=3)
    s1 = pl.PruneSession(mlp, data, device="cpu")
    want = s1.prune("grasp", 0.6, samples=8)
    s1.save_cache(tmp_path / "c.pt")
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    for e in payload["entries"]:
        assert e["hyperparameters"] == sorted(e["hyperparameters"]) and len(e["hyperparameters"]) > 1
        e["hyperparameters"] = e["hyperparameters"][::-1]
    torch.save(payload, tmp_path / "reversed.pt")
    s2 = pl.PruneSession(mlp, data, device="cpu")
    n = len(count_sorts)
    assert s2.load_cache(tmp_path / "reversed.pt") == 1
    _same_result(s2.prune("grasp", 0.6, samples=8), want)
    assert len(count_sorts) == n
