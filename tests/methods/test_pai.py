"""SNIP, GraSP and SynFlow through the registry and the engine: data forms, needs, exact budgets, determinism, and
that the user's model is never changed."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import prune_lab as pl
from prune_lab.core import pai
from prune_lab.data import calibration_batch
from prune_lab.methods.registry import ScoreContext
from tests.conftest import SmallConvNet, assert_state_equal, randomize_bn, state_copy

PAI = ["snip", "grasp", "synflow"]


@pytest.fixture(scope="module")
def bundle():
    return pl.data.synthetic(n_train=96, n_test=32, input_shape=(1, 8, 8), num_classes=3, seed=0)


def conv():
    torch.manual_seed(0)
    return randomize_bn(SmallConvNet())  # train mode: BN statistics would move if the model were run in place


def test_registry_records():
    snip, grasp, syn = (pl.get_method(m) for m in PAI)
    assert snip.needs == {"data", "gradients"} and grasp.needs == {"data", "hessian"} and "data" not in syn.needs
    assert {s.default_allocation for s in (snip, grasp, syn)} == {"global"}
    assert syn.sparsity_dependent and syn.masks is not None and not snip.sparsity_dependent
    fields = {f[0]: f for f in syn.hyperparameter_fields()}
    assert fields["rounds"][1] == 100 and fields["rounds"][2]["low"] == 1 and fields["rounds"][2]["high"] >= 100
    assert "2006.05467" in syn.reference and "1810.02340" in snip.reference


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_methods_needing_data_raise_the_engines_clear_error(method):
    with pytest.raises(ValueError, match=f"method '{method}' needs data"):
        pl.prune(conv(), method, 0.5)


def test_synflow_needs_an_input_shape_without_data(bundle):
    with pytest.raises(ValueError, match="input_shape=\\(C, H, W\\)"):
        pl.prune(conv(), "synflow", 0.5)
    a = pl.prune(conv(), "synflow", 0.5, input_shape=[1, 8, 8], rounds=5)
    b = pl.prune(conv(), "synflow", 0.5, data=bundle, rounds=5)  # shape taken from the data
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    with pytest.raises(ValueError, match="rounds.*\\[1, 1000\\].*0"):
        pl.prune(conv(), "synflow", 0.5, input_shape=(1, 8, 8), rounds=0)


def test_data_forms_batch_used_as_given_bundle_and_loader_sampled(bundle):
    net = conv()
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    got = pl.score(net, "snip", data=(x, y), device="cpu")
    want = pai.snip_scores(net, x, y)
    assert all(torch.equal(got[n], want[n]) for n in want)
    xb, yb = calibration_batch(bundle, n=40, split="train", seed=0)
    got = pl.score(net, "snip", data=bundle, samples=40, device="cpu")
    want = pai.snip_scores(net, xb, yb)
    assert all(torch.equal(got[n], want[n]) for n in want)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    got = pl.score(net, "grasp", data=loader, device="cpu")
    xs, ys = calibration_batch(loader, n=256)
    want = pai.grasp_scores(net, xs, ys)
    assert all(torch.allclose(got[n], want[n]) for n in want)


@pytest.mark.parametrize("method", PAI)
@pytest.mark.parametrize("allocation", ["global", "uniform", "erk"])
def test_exact_counts_model_unchanged_deterministic(method, allocation, bundle):
    net = conv()
    before = state_copy(net)
    session = pl.PruneSession(net, bundle, device="cpu")
    params = pl.prunable_parameters(net)
    total = sum(p.numel() for p in params.values())
    for s in (0.3, 0.9):
        hp = {"rounds": 4} if method == "synflow" else {"samples": 24}
        res = session.prune(method, s, allocation=allocation, **hp)
        for n, m in res.masks.items():
            assert int((~m).sum()) == res.pruned[res.layers.index(n)]
        if allocation == "uniform":
            assert res.pruned == tuple(int(s * p.numel() + 0.5) for p in params.values())
        else:
            assert sum(res.pruned) == int(s * total + 0.5)
        again = pl.prune(net, method, s, allocation=allocation, data=bundle, device="cpu", **hp)
        assert all(torch.equal(res.masks[n], again.masks[n]) for n in res.masks)
    assert_state_equal(net, before)
    assert all(m.training for m in net.modules())


def test_snip_global_masks_keep_the_highest_scores(bundle):
    net = conv()
    session = pl.PruneSession(net, bundle, device="cpu")
    res = session.prune("snip", 0.8)
    scores = session.scores("snip")
    kept = torch.cat([scores[n][res.masks[n]] for n in res.masks])
    pruned = torch.cat([scores[n][~res.masks[n]] for n in res.masks])
    assert kept.min() >= pruned.max()


def test_synflow_masks_follow_the_global_scope_when_the_engine_says_so(bundle):
    """Under the global allocation the engine tells SynFlow so: iterative global pruning (the paper's procedure),
    not the one-shot scores' per-layer counts; the result's counts are those of the masks."""
    net = conv()
    session = pl.PruneSession(net, bundle, device="cpu")
    res = session.prune("synflow", 0.9, rounds=3)  # default allocation: global
    spec = pl.get_method("synflow")
    hp = spec.make_hyperparameters(rounds=3)
    counts = dict(zip(res.layers, res.pruned))
    assert {n: int((~m).sum()) for n, m in res.masks.items()} == counts
    weights = {n: p.detach() for n, p in net.named_parameters() if n in session.graph.layers}
    ctx = ScoreContext(weights=weights, prunable=list(res.layers), graph=session.graph, bn_scales={}, model=net,
                       data=bundle)
    want = pai.synflow_masks(net, (1, 8, 8), counts, rounds=3, scope="global")
    assert all(torch.equal(res.masks[n], want[n]) for n in want)
    layerwise = spec.masks(ctx, counts, hp)  # no allocation in the context: per-layer counts
    assert {n: int((~m).sum()) for n, m in layerwise.items()} == counts
    uniform = session.prune("synflow", 0.9, rounds=3, allocation="uniform")
    assert list(uniform.pruned) == [int(0.9 * k + 0.5) for k in uniform.numel]
    assert {n: int((~m).sum()) for n, m in uniform.masks.items()} == dict(zip(uniform.layers, uniform.pruned))