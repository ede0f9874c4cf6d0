"""The one query key: normalisation, what it keys (rankings, mask sets, evaluations, sweep points), and the path
from a query to masks checked bit for bit against a stable sort and the budget formulas."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prune_lab as pl
from prune_lab.core.validation import round_half_up
from prune_lab.engine import Query, RankingKey, prune_query
from prune_lab.engine.cache import RankingCache
from prune_lab.engine.weights import WeightSnapshot
from tests.conftest import SmallConvNet, randomize_bn


def test_query_normalises_what_does_not_change_the_masks():
    q = Query.make("lamp", 0.9000000000000001)
    assert q == Query.make("lamp", 0.9, allocation="global", seed=7)  # lamp ignores the seed; its default alloc
    assert q.sparsity == 0.9 and q.allocation == "global" and q.seed is None
    assert hash(q) == hash(Query.make("lamp", 0.9))
    assert Query.make("random", 0.5, seed=1) != Query.make("random", 0.5, seed=2)  # the seed matters there
    assert Query.make("magnitude", 0.5).hyperparameters == ()
    lap = Query.make("lap", 0.5)
    assert lap.hp == dataclasses.asdict(pl.get_method("lap").make_hyperparameters())  # defaults spelled out
    assert Query.make("magnitude", 0.5, overrides={"b": 0.25, "a": 0.0}).overrides == (("a", 0.0), ("b", 0.25))
    assert Query.make("magnitude", 0.5, allocation="uniform").key == Query.make("magnitude", 0.5).key
    assert len(q.key) == 32 and q.key != Query.make("lamp", 0.8).key
    assert q.at(0.5) == Query.make("lamp", 0.5) and q.replace(sparsity=0.1 + 0.2).sparsity == 0.3
    assert pl.Query is Query


def test_query_refuses_what_prune_refuses():
    with pytest.raises(ValueError, match="unknown method"):
        Query.make("magnitud", 0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        Query.make("magnitude", 1.0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        Query.make("magnitude", 0.9999999999999)  # rounds to 1.0 at the query's precision
    with pytest.raises(ValueError, match="unknown allocation"):
        Query.make("magnitude", 0.5, allocation="globl")
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        Query.make("magnitude", 0.5, lam=1.0)
    with pytest.raises(TypeError, match="overrides must be a dict"):
        Query.make("magnitude", 0.5, overrides=[("a", 0.5)])


def test_result_carries_its_query_and_the_session_builds_the_same(convnet):
    s = pl.PruneSession(convnet, device="cpu")
    res = s.prune("lap", 0.7, allocation="lamp")
    assert res.query == s.query("lap", 0.7, allocation="lamp") == Query.make("lap", 0.7, allocation="lamp")
    again = s.prune_query(res.query)
    assert again.pruned == res.pruned and all(torch.equal(again.masks[n], res.masks[n]) for n in res.layers)
    masks = s.prune("magnitude", 0.5).masks
    q = s.query("lamp", 0.8, masks=masks)
    assert q.start and q.start == pl.engine.weights.masks_key(s.snapshot.check_masks(masks))
    with pytest.raises(ValueError, match="starting-masks key"):
        s.prune_query(q)  # the query needs the masks it was made with
    assert s.prune_query(q, masks=masks).pruned == s.prune("lamp", 0.8, masks=masks).pruned


def _net_and_data():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    return net, pl.data.synthetic(n_train=16, n_test=32, input_shape=(12,), num_classes=5)


def test_equal_queries_share_one_ranking_and_one_evaluation(count_sorts, monkeypatch):
    s = pl.PruneSession(*_net_and_data(), device="cpu")
    s.prune("magnitude", 0.5)
    n = len(count_sorts)
    s.prune("global_magnitude", 0.9)  # same score function: the same ranking
    s.prune("magnitude", 0.9000000000000001, seed=3)
    assert len(count_sorts) == n
    assert [k.scores for k in s.cache.rankings.keys()] == ["magnitude"]
    from prune_lab.analysis import session as S

    calls = []
    original = S.evaluate
    monkeypatch.setattr(S, "evaluate", lambda *a, **k: calls.append(1) or original(*a, **k))
    a = s.evaluate(s.prune("lamp", 0.8))
    b = s.evaluate(s.prune("lamp", 0.8000000000000002, allocation="global", seed=5))
    assert a == b and calls == [1]
    assert s.cached_evaluation(s.prune("lamp", 0.8)) == a


def test_sweep_point_key_is_the_querys():
    from prune_lab.analysis.sweeps import SweepPoint

    a = SweepPoint.make("lamp", None, 0.5, 0)
    assert a.query == Query.make("lamp", 0.5) and not a.seeded
    assert a.key("f", "d") == SweepPoint.make("lamp", "global", 0.5, 9).key("f", "d")  # nothing depends on the seed
    assert a.key("f", "d") != SweepPoint.make("lamp", None, 0.5, 0, finetune={"epochs": 1}).key("f", "d")
    r0, r1 = SweepPoint.make("random", None, 0.5, 0), SweepPoint.make("random", None, 0.5, 1)
    assert r0.seeded and r0.key("f", "d") != r1.key("f", "d")


def test_ranking_key_is_the_scores_part_of_the_query():
    fp = "f" * 32
    assert RankingKey.of(Query.make("global_magnitude", 0.3), fp) == RankingKey.of(Query.make("magnitude", 0.9), fp)
    assert RankingKey.of(Query.make("lap", 0.3), fp) != RankingKey.of(Query.make("lap", 0.3, start="x"), fp)
    assert RankingKey.of(Query.make("lamp", 0.5, seed=3), fp).scores == "lamp"


# ----------------------------------------------------------------------------------------------------------------
# bit for bit: the lookups against a stable sort and the budget formulas
# ----------------------------------------------------------------------------------------------------------------
def _stable_global_masks(scores: dict, k: int) -> dict:
    """Prune the k lowest scores of all layers concatenated in layer order (ties: earlier layer, earlier position)."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    order = torch.sort(flat, stable=True).indices[:k]
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order] = False
    out, a = {}, 0
    for n in names:
        out[n] = keep[a:a + scores[n].numel()].reshape(scores[n].shape)
        a += scores[n].numel()
    return out


@given(s=st.floats(0.0, 0.95), seed=st.integers(0, 3), method=st.sampled_from(["magnitude", "lap", "random"]))
@settings(deadline=None)
def test_masks_equal_a_stable_sort_and_the_formulas(s, seed, method):
    """The budgets are the formulas of METHODS.md on the query's sparsity (``s`` rounded to 12 decimals: float noise
    such as 0.9499999999999998 counts as 0.95, and the masks are a function of the query)."""
    s = Query.make(method, s).sparsity
    torch.manual_seed(seed)
    model = randomize_bn(SmallConvNet().eval())
    session = pl.PruneSession(model, device="cpu")
    scores = pl.score(model, method, seed=seed)
    names = list(scores)
    total = sum(v.numel() for v in scores.values())
    g = session.prune(method, s, allocation="global", seed=seed)
    want = _stable_global_masks(scores, round_half_up(s * total))
    assert all(torch.equal(g.masks[n], want[n]) for n in names)
    u = session.prune(method, s, allocation="uniform", seed=seed)
    for n in names:
        k = round_half_up(s * scores[n].numel())
        assert torch.equal(u.masks[n], _stable_global_masks({n: scores[n]}, k)[n])
        w = dict(model.named_parameters())[n].detach().double()
        frob = math.sqrt(float((w * ~u.masks[n]).pow(2).sum()))
        assert u.frobenius[n] == pytest.approx(frob, rel=1e-6, abs=1e-9)
    # the lamp allocation takes its counts from LAMP's global threshold, the masks from the method's scores
    lamp_scores = pl.score(model, "lamp")
    counts = [int((~m).sum()) for m in _stable_global_masks(lamp_scores, round_half_up(s * total)).values()]
    sizes = [v.numel() for v in scores.values()]
    counts = [min(c, n - 1) for c, n in zip(counts, sizes)]
    la = session.prune(method, s, allocation="lamp", seed=seed)
    assert list(la.pruned) == counts
    for n, c in zip(names, counts):
        assert torch.equal(la.masks[n], _stable_global_masks({n: scores[n]}, c)[n])


def test_the_path_runs_on_parts_without_a_session(convnet):
    """``pl.prune`` and the session run one function on the same parts: the same masks from fresh parts."""
    snap = WeightSnapshot(convnet, torch.device("cpu"))
    cache = RankingCache()
    q = Query.make("lap", 0.8, allocation="erk")
    a = prune_query(q, snap, cache)
    b = pl.PruneSession(convnet, device="cpu").prune("lap", 0.8, allocation="erk")
    assert a.pruned == b.pruned and all(torch.equal(a.masks[n], b.masks[n]) for n in a.layers)
    fresh = prune_query(q.at(0.5), snap, cache)
    assert len(cache.rankings) == 1 and not fresh.masks_built  # a lookup: no masks until they are read
    assert sum(fresh.pruned) == round_half_up(0.5 * sum(fresh.numel))


def test_float_noise_in_the_sparsity_is_not_a_new_query(mlp):
    """0.9499999999999998 (e.g. from a linspace) and 0.95 are one query: the same key, the same counts."""
    session = pl.PruneSession(mlp, device="cpu")
    a, b = session.prune("magnitude", 0.95), session.prune("magnitude", 0.9499999999999998)
    assert a.query == b.query and a.pruned == b.pruned and a.target_sparsity == b.target_sparsity == 0.95
    assert a.pruned[0] == round_half_up(0.95 * 30) == 29  # 28.5 rounds up; 0.9499999999999998 · 30 would give 28
