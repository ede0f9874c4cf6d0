"""Registry records and one contract test run over every registered method × allocation."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import prune_lab as pl
from prune_lab.methods.registry import MethodSpec, NoHyperparameters, hparam, register_method
from tests.conftest import SmallConvNet, assert_state_equal, randomize_bn, state_copy

METHODS = pl.list_methods()
ALLOCATIONS = [a for a in pl.list_allocations() if not pl.get_allocation(a).needs]  # no measured table
# Methods that need data get a small batch source; expensive ones get cheap settings (the contract is about
# shapes, counts and nesting, not about quality).
CHEAP = {"n_samples": 32, "max_swaps": 20, "trials": 2, "rounds": 5, "samples": 32}


def data_for(spec, input_shape=(1, 8, 8), num_classes=3):
    if "data" not in spec.needs:
        return None
    return pl.data.synthetic(n_train=64, n_test=16, input_shape=input_shape, num_classes=num_classes)


def fast_hp(spec, input_shape=(1, 8, 8)) -> dict:
    names = {f for f, _, _ in spec.hyperparameter_fields()}
    return {k: v for k, v in {**CHEAP, "input_shape": input_shape}.items() if k in names}


def test_expected_methods_are_registered():
    for name in ["magnitude", "global_magnitude", "lamp", "lap", "lap_forward", "lap_backward", "random"]:
        assert name in METHODS
    spec = pl.get_method("lamp")
    assert spec.default_allocation == "global" and "2010.07611" in spec.reference


def test_paper_default_allocations():
    defaults = {m: pl.get_method(m).default_allocation for m in METHODS}
    assert defaults["magnitude"] == "uniform"
    assert defaults["global_magnitude"] == "global"
    assert defaults["lap"] == "uniform"
    assert defaults["random"] == "uniform"


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec("magnitude", "x", "", lambda ctx, hp: {}, "uniform"))


def test_unknown_method_names_choices_and_suggests():
    with pytest.raises(ValueError, match=r"unknown method 'lampp'. Did you mean 'lamp'\?.*'magnitude'"):
        pl.get_method("lampp")


def test_hyperparameter_validation():
    @dataclasses.dataclass(frozen=True)
    class HP:
        rounds: int = hparam(10, low=1, high=1000, help="rounds")
        mode: str = hparam("a", choices=("a", "b"))

    spec = MethodSpec("_hp_demo", "demo", "", lambda ctx, hp: {}, "uniform", hyperparameters=HP)
    assert spec.make_hyperparameters(rounds=3).rounds == 3
    with pytest.raises(TypeError, match="unknown hyperparameter.*'round'.*rounds, mode"):
        spec.make_hyperparameters(round=3)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        spec.make_hyperparameters(rounds=0)
    with pytest.raises(ValueError, match="must be one of"):
        spec.make_hyperparameters(mode="c")
    plain = MethodSpec("_plain", "p", "", lambda ctx, hp: {}, "uniform")
    assert plain.hyperparameters is NoHyperparameters
    with pytest.raises(TypeError, match="none"):
        plain.make_hyperparameters(x=1)


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    return {"mlp": mlp, "conv": randomize_bn(SmallConvNet().eval())}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("model_name", ["mlp", "conv"])
def test_contract_every_method_and_allocation(method, allocation, model_name):
    model = models()[model_name]
    before = state_copy(model)
    spec = pl.get_method(method)
    session = pl.PruneSession(model, data_for(spec), device="cpu")
    prev = None
    for s in (0.0, 0.5, 0.8):
        res = session.prune(method, s, allocation=allocation, **fast_hp(spec))
        params = pl.prunable_parameters(model)
        assert list(res.masks) == list(params)
        for n, m in res.masks.items():
            assert m.dtype == torch.bool and m.shape == params[n].shape
            assert int((~m).sum()) == res.pruned[res.layers.index(n)]
        n_total = sum(p.numel() for p in params.values())
        if allocation != "uniform":
            assert sum(res.pruned) == int(s * n_total + 0.5)
        else:
            assert res.pruned == tuple(int(s * p.numel() + 0.5) for p in params.values())
        if prev is not None and not spec.sparsity_dependent:
            for n in res.masks:  # masks nest as sparsity grows
                assert not (res.masks[n] & ~prev.masks[n]).any()
        prev = res
    assert_state_equal(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_contract_deterministic_and_same_as_one_shot(method):
    model = models()["conv"]
    spec = pl.get_method(method)
    data = data_for(spec)
    a = pl.prune(model, method, 0.6, seed=3, device="cpu", data=data, **fast_hp(spec))
    b = pl.PruneSession(model, data, device="cpu").prune(method, 0.6, seed=3, **fast_hp(spec))
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert a.frobenius == pytest.approx(b.frobenius)


@given(st.sampled_from([m for m in METHODS if not pl.get_method(m).sparsity_dependent
                        and "data" not in pl.get_method(m).needs]),
       st.floats(0, 0.99), st.floats(0, 0.99), st.sampled_from(ALLOCATIONS[:3]))
def test_threshold_separation_and_nesting_property(method, s1, s2, allocation):
    model = models()["mlp"]
    session = pl.PruneSession(model, device="cpu")
    lo, hi = sorted((s1, s2))
    a = session.prune(method, lo, allocation=allocation, seed=1)
    b = session.prune(method, hi, allocation=allocation, seed=1)
    scores = session.scores(method, seed=1)
    for n in a.masks:
        assert not (b.masks[n] & ~a.masks[n]).any()
        kept, pruned = scores[n][b.masks[n]], scores[n][~b.masks[n]]
        if allocation == "uniform" and kept.numel() and pruned.numel():
            assert kept.min() >= pruned.max()
    if allocation == "global":
        kept = torch.cat([scores[n][b.masks[n]] for n in b.masks])
        pruned = torch.cat([scores[n][~b.masks[n]] for n in b.masks])
        if kept.numel() and pruned.numel():
            assert kept.min() >= pruned.max()


def test_unsupported_data_kinds_are_validated_and_read_back():
    from prune_lab.methods.registry import data_kind

    with pytest.raises(ValueError, match="unsupported data kinds"):
        register_method(MethodSpec("x_bad_kind", "x", "", lambda ctx, hp: {}, "uniform",
                                   unsupported=(("images", "no"),)))
    assert "x_bad_kind" not in pl.list_methods()
    tokens = pl.data.tokens(torch.ones(2, 4, dtype=torch.long))
    assert [data_kind(d) for d in (None, tokens, pl.data.token_bundle(tokens, tokens), pl.data.digits())] == \
        ["none", "tokens", "tokens", "samples"]
    for m in METHODS:  # every record reads back: a reason or "", never an error
        assert isinstance(pl.get_method(m).unavailable_reason(tokens), str)


def test_a_context_built_by_hand_keys_its_starting_masks_as_the_engine_does():
    import torch

    from prune_lab.engine.weights import masks_key
    from prune_lab.methods.registry import ScoreContext

    masks = {"b.weight": torch.rand(5, 7) > 0.5, "a.weight": torch.rand(3, 4) > 0.3}
    ctx = ScoreContext(weights={}, prunable=list(masks), graph=None, bn_scales={}, start_masks=masks)
    assert ctx.start_key == masks_key(masks)
