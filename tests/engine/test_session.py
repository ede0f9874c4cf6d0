import math

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import prune_lab as pl
from tests.conftest import assert_state_equal, state_copy
from tests.methods.test_registry import fast_hp  # at import: a @given module imported inside @given is an error


def test_warm_sparsity_change_is_a_lookup(convnet, count_sorts):
    session = pl.PruneSession(convnet, device="cpu")
    calls = count_sorts
    first = session.prune("global_magnitude", 0.5)
    assert len(calls) == 1
    for s in (0.1, 0.7, 0.95):
        res = session.prune("global_magnitude", s)
        assert not res.masks_built  # layer sparsity and distortion without masks
        assert sum(res.pruned) == math.floor(s * sum(res.numel) + 0.5)
        assert set(res.frobenius) == set(res.layers)
    session.prune("magnitude", 0.3)  # same scores as global_magnitude: the ranking is shared
    session.prune("lamp", 0.3)  # LAMP ranks in magnitude order: reuses that sort
    assert len(calls) == 1
    assert first.masks_built is False and first.masks is not None and first.masks_built


def test_distortion_equals_direct_computation(convnet):
    session = pl.PruneSession(convnet, device="cpu")
    params = pl.prunable_parameters(convnet)
    for method in ("lamp", "lap", "random", "lap_forward"):
        res = session.prune(method, 0.6)
        for n, m in res.masks.items():
            w = params[n].detach()
            assert res.frobenius[n] == pytest.approx((w * ~m).norm().item(), rel=1e-5, abs=1e-6)
            assert res.relative_frobenius[n] == pytest.approx((w * ~m).norm().item() / w.norm().item(), rel=1e-5)
            assert res.layer_sparsity[n] == pytest.approx(int((~m).sum()) / m.numel())


def test_session_notices_changed_weights(mlp):
    session = pl.PruneSession(mlp, device="cpu")
    a = session.prune("magnitude", 0.5)
    fp = session.fingerprint
    with torch.no_grad():
        mlp[0].weight.mul_(-torch.arange(30.0).reshape(5, 6))
    b = session.prune("magnitude", 0.5)
    assert session.fingerprint != fp
    assert not torch.equal(a.masks["0.weight"], b.masks["0.weight"])
    assert torch.equal(b.masks["0.weight"], pl.prune(mlp, "magnitude", 0.5).masks["0.weight"])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_sparsity_out_of_range(mlp, bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        pl.prune(mlp, "magnitude", bad)


@pytest.mark.parametrize("bad", ["0.5", None, True, [0.5]])
def test_sparsity_not_a_number(mlp, bad):
    with pytest.raises(TypeError, match="sparsity must be a real number"):
        pl.prune(mlp, "magnitude", bad)


def test_sparsity_as_tensor_or_numpy(mlp):
    import numpy as np

    assert pl.prune(mlp, "magnitude", torch.tensor(0.5)).sparsity == pl.prune(mlp, "magnitude",
                                                                              np.float32(0.5)).sparsity


def test_unknown_method_and_allocation(mlp):
    with pytest.raises(ValueError, match=r"unknown method 'magnitud'. Did you mean 'magnitude'.*'lamp'"):
        pl.prune(mlp, "magnitud", 0.5)
    with pytest.raises(ValueError, match=r"unknown allocation 'globl'. Did you mean 'global'.*'erk'"):
        pl.prune(mlp, "magnitude", 0.5, allocation="globl")
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        pl.prune(mlp, "magnitude", 0.5, temperature=3)


def test_nan_weights_are_named(mlp):
    with torch.no_grad():
        mlp[2].weight[0, 0] = float("nan")
    before = state_copy(mlp)
    with pytest.raises(ValueError, match=r"weight '2.weight' contains NaN"):
        pl.prune(mlp, "magnitude", 0.5)
    for k, v in before.items():  # nothing lost
        assert torch.equal(torch.nan_to_num(mlp.state_dict()[k]), torch.nan_to_num(v))


def test_not_a_model_and_bad_device(mlp):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pl.PruneSession({"w": torch.ones(3)})
    with pytest.raises(ValueError, match="device"):
        pl.PruneSession(mlp, device="tpu")


def test_starting_masks_nest_and_validate(mlp):
    session = pl.PruneSession(mlp, device="cpu")
    start = session.prune("random", 0.5, allocation="global", seed=1).masks
    for method in ("magnitude", "lamp", "lap", "lap_backward"):
        res = session.prune(method, 0.7, allocation="global", masks=start)
        for n in start:
            assert not (res.masks[n] & ~start[n]).any()
        assert sum(res.pruned) == math.floor(0.7 * sum(res.numel) + 0.5)
    with pytest.raises(ValueError, match="already prune"):
        session.prune("magnitude", 0.2, masks=start)
    other = {"fc.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"masks do not fit this model: 'fc.weight'"):
        session.prune("magnitude", 0.5, masks=other)
    wrong = dict(start)
    wrong["0.weight"] = torch.ones(6, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask of '0.weight' has shape \(6, 5\), the weight \(5, 6\)"):
        session.prune("magnitude", 0.5, masks=wrong)


@given(st.sampled_from(pl.list_methods()), st.floats(0, 0.95), st.sampled_from(pl.list_allocations()[:3]))
def test_model_unchanged_bit_for_bit(method, s, allocation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model.train()
    before = state_copy(model)
    spec = pl.get_method(method)
    data = pl.data.synthetic(n_train=32, n_test=8, input_shape=(6,), num_classes=3) if "data" in spec.needs else None
    res = pl.prune(model, method, s, allocation=allocation, device="cpu", data=data, **fast_hp(spec, (6,)))
    _ = res.masks
    assert_state_equal(model, before)
    assert model.training


def test_masks_on_the_models_device_and_scores_api(mlp):
    res = pl.prune(mlp, "lap", 0.5, device="cpu")
    assert all(m.device == mlp[0].weight.device for m in res.masks.values())
    s = pl.score(mlp, "lap")
    assert set(s) == set(res.masks) and s["0.weight"].shape == (5, 6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_every_method_and_allocation(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    before = state_copy(model)
    session = pl.PruneSession(model, device="cpu")
    assert session.graph.exact
    # data-free methods: a full empirical Fisher of ResNet-18 would not fit in memory (second-order methods are
    # tested on small models; obs_layerwise is the variant for big ones)
    for method in [m for m in pl.list_methods() if "data" not in pl.get_method(m).needs]:
        for allocation in [a for a in pl.list_allocations() if not pl.get_allocation(a).needs]:
            hp = {"rounds": 3, "input_shape": (3, 64, 64)} if method == "synflow" else {}
            res = session.prune(method, 0.7, allocation=allocation, **hp)
            assert sum(res.pruned) > 0
            assert abs(res.sparsity - 0.7) < 0.01
        assert len(res.masks) == len(session.layer_names)
    assert_state_equal(model, before)


def test_weight_update_plumbing(mlp):
    """A registered update receives the selected masks; the result carries updated weights (zeros where pruned)."""
    from prune_lab.methods import registry

    seen = {}

    def double_kept(ctx, masks):
        seen["masks"] = masks
        return {n: ctx.weights[n] * 2 for n in ctx.prunable}

    registry._UPDATERS["_double"] = (double_kept, frozenset())
    try:
        session = pl.PruneSession(mlp, device="cpu")
        plain = session.prune("magnitude", 0.5)
        res = session.prune("magnitude", 0.5, update="_double")
        assert all(torch.equal(res.masks[n], plain.masks[n]) for n in res.masks)
        w = mlp[0].weight.detach()
        assert torch.equal(res.weights["0.weight"], w * 2 * res.masks["0.weight"])
        # distortion measured against the updated weights: ‖W − 2·M⊙W‖
        assert res.frobenius["0.weight"] == pytest.approx((w - 2 * w * res.masks["0.weight"]).norm().item(), rel=1e-5)
        assert res.hyperparameters["update"] == "_double" and plain.weights is None
        with pytest.raises(ValueError, match="unknown update"):
            session.prune("magnitude", 0.5, update="nope")
    finally:
        del registry._UPDATERS["_double"]


def test_sequential_variants_never_share_cached_masks(convnet):
    """lap, lap_forward and lap_backward share one score function (and ranking) but not their masks."""
    session = pl.PruneSession(convnet, device="cpu")
    fwd = session.prune("lap_forward", 0.8)
    bwd = session.prune("lap_backward", 0.8)
    fresh = pl.PruneSession(convnet, device="cpu").prune("lap_backward", 0.8)
    assert all(torch.equal(bwd.masks[n], fresh.masks[n]) for n in bwd.masks)
    assert any(not torch.equal(fwd.masks[n], bwd.masks[n]) for n in fwd.masks)


def test_overrides_lock_and_exclude_layers(convnet):
    session = pl.PruneSession(convnet, device="cpu")
    sizes = dict(zip(session.layer_names, session.prune("magnitude", 0.0).numel))
    total = sum(sizes.values())
    for alloc in ("global", "lamp", "erk"):
        res = session.prune("magnitude", 0.8, allocation=alloc, overrides={"c1.weight": 0.0, "fc2.weight": 0.5})
        assert res.layer_sparsity["c1.weight"] == 0.0  # excluded: dense
        assert res.pruned[res.layers.index("fc2.weight")] == round(0.5 * sizes["fc2.weight"])
        assert sum(res.pruned) == math.floor(0.8 * total + 0.5)  # the model's budget is still met
        assert int((~res.masks["c1.weight"]).sum()) == 0
        assert res.hyperparameters["overrides"] == {"c1.weight": 0.0, "fc2.weight": 0.5}
    glob = session.prune("magnitude", 0.8, allocation="global", overrides={"c1.weight": 0.0})
    free = [n for n in glob.layers if n != "c1.weight"]
    params = pl.prunable_parameters(convnet)
    kept = torch.cat([params[n].detach().abs()[glob.masks[n]] for n in free])
    pruned = torch.cat([params[n].detach().abs()[~glob.masks[n]] for n in free])
    assert kept.min() >= pruned.max()  # one global threshold over the unlocked layers
    uni = session.prune("lap", 0.7, allocation="uniform", overrides={"fc1.weight": 0.9})
    assert uni.layer_sparsity["fc1.weight"] == pytest.approx(0.9, abs=1e-3)
    assert uni.layer_sparsity["c2.weight"] == pytest.approx(0.7, abs=0.01)
    with pytest.raises(ValueError, match=r"overrides: 'nope' is not a prunable layer.*'c1.weight'"):
        session.prune("magnitude", 0.5, overrides={"nope": 0.1})
    with pytest.raises(ValueError, match=r"overrides\['fc1.weight'\] must be in \[0, 1\)"):
        session.prune("magnitude", 0.5, overrides={"fc1.weight": 1.2})
    with pytest.raises(ValueError, match="cannot be met with these locked layers"):
        session.prune("magnitude", 0.95, allocation="global",
                      overrides={n: 0.0 for n in session.layer_names if n != "fc2.weight"})


# ---------------------------------------------------------------------------------------------------------------
# memory: bytes held per weight, 16-bit weights and scores
# ---------------------------------------------------------------------------------------------------------------
def _wide_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_weight(dtype):
    model = _wide_mlp(dtype)
    session = pl.PruneSession(model, device="cpu")
    params = pl.prunable_parameters(model)
    n = sum(p.numel() for p in params.values())
    wbytes = sum(p.numel() * p.element_size() for p in params.values())
    session.prune("magnitude", 0.5)
    mag = session.cache_nbytes()
    # was 12 bytes per weight; the rest: count tables (4 bytes per distinct upper key half in a layer) and a
    # small last layer's plain keys, both negligible in big layers
    assert mag <= (6.2 if dtype == torch.float32 else 4.2) * n
    assert mag <= 2.1 * wbytes
    session.prune("lamp", 0.5)  # shares magnitude's order and cumulative sums: adds its keys only
    assert session.cache_nbytes() - mag <= 2.3 * n
    session.prune("lap", 0.5)  # float32 scores: order, cumulative sums and 2-byte keys
    assert session.ranking("lap").nbytes() <= 6.2 * n
    assert session.ranking("lap").nbytes() <= 3.1 * wbytes


def test_bfloat16_weights_rank_like_their_float32_values():
    model = _wide_mlp(torch.bfloat16)
    as_float = _wide_mlp(torch.bfloat16).float()
    a, b = pl.PruneSession(model, device="cpu"), pl.PruneSession(as_float, device="cpu")
    for method, alloc in (("magnitude", None), ("global_magnitude", None), ("lamp", None), ("lap", "global")):
        ra, rb = a.prune(method, 0.8, allocation=alloc), b.prune(method, 0.8, allocation=alloc)
        assert ra.pruned == rb.pruned
        assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.layers)
        assert ra.frobenius == pytest.approx(rb.frobenius, rel=1e-6)


def test_score_dtype_bfloat16_ranks_the_rounded_scores(mlp):
    from tests.core.test_ranking import reference_global_counts

    session = pl.PruneSession(mlp, device="cpu", score_dtype="bfloat16")
    assert session.score_dtype == torch.bfloat16
    full = pl.PruneSession(mlp, device="cpu")
    names = session.layer_names
    scores = {n: v.to(torch.bfloat16) for n, v in full.scores("lap").items()}
    for s in (0.3, 0.75):
        res = session.prune("lap", s, allocation="global")
        k = sum(res.pruned)
        assert list(res.pruned) == reference_global_counts(names, scores, k).tolist()
    wide = _wide_mlp()
    n = sum(p.numel() for p in pl.prunable_parameters(wide).values())
    small = pl.PruneSession(wide, device="cpu", score_dtype=torch.bfloat16).ranking("lap").nbytes()
    assert small <= 4.2 * n < pl.PruneSession(wide, device="cpu").ranking("lap").nbytes()
    with pytest.raises(ValueError, match="score_dtype must be None, 'float32' or 'bfloat16'"):
        pl.PruneSession(mlp, score_dtype="int8")


def test_inf_weights_are_named(mlp):
    with torch.no_grad():
        mlp[0].weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"weight '0.weight' contains Inf"):
        pl.prune(mlp, "magnitude", 0.5)


# ---------------------------------------------------------------------------------------------------- issue 16
def test_spectral_norm_model_in_train_mode_is_not_mutated():
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(0)
    m = nn.Sequential(spectral_norm(nn.Conv2d(1, 3, 3)), nn.ReLU(), nn.Flatten(),
                      weight_norm(nn.Linear(3 * 4 * 4, 8)), nn.ReLU(), spectral_norm(nn.Linear(8, 3))).train()
    before = state_copy(m)
    session = pl.PruneSession(m, device="cpu")
    for method in ("magnitude", "lamp", "lap", "random"):
        res = session.prune(method, 0.5)
        assert set(res.masks) == {"0.parametrizations.weight.original", "3.parametrizations.weight.original1",
                                  "5.parametrizations.weight.original"}
    session.prune("synflow", 0.5, input_shape=(1, 6, 6), rounds=2)
    x, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 3
    pl.evaluate(m, (x, y), masks=res.masks, device="cpu")
    assert_state_equal(m, before)  # bit for bit, buffers (_u, _v) included
    assert all(mod.training for mod in m.modules())


def test_session_sees_parameters_replaced_by_load_state_dict_assign(mlp):
    session = pl.PruneSession(mlp, device="cpu")
    old = session.prune("magnitude", 0.5)
    fp = session.fingerprint
    torch.manual_seed(5)
    sd = {k: torch.randn_like(v) for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(sd, assign=True)  # new Parameter objects: the old ones are not touched
    new = session.prune("magnitude", 0.5)
    assert session.fingerprint != fp
    fresh = pl.PruneSession(mlp, device="cpu").prune("magnitude", 0.5)
    assert all(torch.equal(new.masks[n], fresh.masks[n]) for n in fresh.layers)
    assert any(not torch.equal(new.masks[n], old.masks[n]) for n in fresh.layers)
    assert new.model_fingerprint == fresh.model_fingerprint


def test_session_sees_a_swapped_head(convnet):
    session = pl.PruneSession(convnet, device="cpu")
    session.prune("lamp", 0.5)
    torch.manual_seed(3)
    convnet.fc2 = nn.Linear(10, 3)  # same shape, new module: the old one is not touched
    res = session.prune("lamp", 0.5)
    fresh = pl.PruneSession(convnet, device="cpu").prune("lamp", 0.5)
    assert res.model_fingerprint == fresh.model_fingerprint
    assert all(torch.equal(res.masks[n], fresh.masks[n]) for n in fresh.layers)
    # a head of another structure: the graph and the prunable layers are read again
    convnet.fc2 = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    res = session.prune("lamp", 0.5)
    assert res.layers[-2:] == ("fc2.0.weight", "fc2.2.weight") and session.layer_names == list(res.layers)
    assert [l.layer for l in session.graph.consumers["fc1.weight"]] == ["fc2.0.weight"]
    fresh = pl.PruneSession(convnet, device="cpu").prune("lamp", 0.5)
    assert all(torch.equal(res.masks[n], fresh.masks[n]) for n in fresh.layers)


def test_session_sees_a_parametrization_added_later():
    from torch.nn.utils.parametrizations import weight_norm

    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    session = pl.PruneSession(m, device="cpu")
    assert session.prune("magnitude", 0.5).layers == ("0.weight", "2.weight")
    weight_norm(m[2])
    assert session.prune("magnitude", 0.5).layers == ("0.weight", "2.parametrizations.weight.original1")
