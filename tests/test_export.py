import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import prune as torch_prune

import prune_lab as pl
from prune_lab import export
from tests.conftest import TiedLinears, assert_state_equal, state_copy


def _masked_forward(model, masks, x, weights=None):
    params = dict(model.named_parameters())
    over = {n: (weights[n] if weights else params[n]) * m for n, m in masks.items()}
    with torch.no_grad():
        return functional_call(model, over, (x,))


def test_round_trip_and_forward_equal_and_model_untouched(convnet):
    before = state_copy(convnet)
    res = pl.prune(convnet, "lamp", 0.7, device="cpu")
    tp = export.to_torch_prune(convnet, res)
    # the original is untouched: same tensors, no reparametrisation, no hooks
    assert_state_equal(convnet, before)
    assert not torch_prune.is_pruned(convnet)
    assert all(not m._forward_pre_hooks for m in convnet.modules())
    # torch.nn.utils.prune form
    assert torch_prune.is_pruned(tp)
    assert {n for n, _ in tp.named_buffers() if n.endswith("_mask")} == {f"{n}_mask" for n in res.masks}
    assert {n for n, _ in tp.named_parameters() if n.endswith("_orig")} == {f"{n}_orig" for n in res.masks}
    back = export.from_torch_prune(tp)
    assert list(back) == list(res.masks)
    for n in res.masks:
        assert torch.equal(back[n], res.masks[n])
    x = torch.randn(5, 1, 8, 8)
    want = _masked_forward(convnet, res.masks, x)
    with torch.no_grad():
        assert torch.equal(tp(x), want)
        assert torch.equal(export.apply(convnet, res)(x), want)
    assert_state_equal(convnet, before)


def test_apply_writes_exact_zeros_copy_or_inplace(mlp):
    before = state_copy(mlp)
    res = pl.prune(mlp, "magnitude", 0.6)
    out = export.apply(mlp, res)
    assert out is not mlp
    assert_state_equal(mlp, before)
    params = dict(out.named_parameters())
    for n, m in res.masks.items():
        assert torch.all(params[n][~m] == 0) and torch.equal(params[n][m], before[n][m])
        assert not (params[n][~m].signbit().any())  # +0.0, not -0.0 leftovers of a multiply
    assert "0.weight_mask" not in dict(out.named_buffers())
    same = export.apply(mlp, res, inplace=True)
    assert same is mlp
    assert torch.equal(mlp[0].weight, params["0.weight"])


def test_updated_weights_are_exported(mlp):
    res = pl.prune(mlp, "magnitude", 0.5)
    new = {n: torch.full_like(p, 0.25) for n, p in pl.prunable_parameters(mlp).items()}
    upd = dataclasses.replace(res, weights=new, _masks=res.masks, _mask_builder=None)
    tp = export.to_torch_prune(mlp, upd)
    assert torch.equal(tp[0].weight_orig, new["0.weight"])
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(tp(x), _masked_forward(mlp, res.masks, x, new))
        ap = export.apply(mlp, upd)
    assert torch.equal(ap[0].weight, 0.25 * res.masks["0.weight"])
    assert not torch.equal(mlp[0].weight, ap[0].weight)


def test_masks_from_state_dict_zeros_and_mask_entries(convnet):
    res = pl.prune(convnet, "lap", 0.8, device="cpu")
    zeros = export.apply(convnet, res).state_dict()
    got = export.masks_from_state_dict(zeros)
    assert set(got) == set(res.masks)  # BatchNorm weights (1-D) and biases are not masks
    assert all(torch.equal(got[n], res.masks[n]) for n in res.masks)
    sd = export.to_torch_prune(convnet, res).state_dict()
    got2 = export.masks_from_state_dict(sd, model=convnet)
    assert all(torch.equal(got2[n], res.masks[n]) for n in res.masks)
    got3 = export.masks_from_state_dict(zeros, model=convnet)
    assert list(got3) == list(res.masks)
    before = {k: v.clone() for k, v in zeros.items()}
    assert all(torch.equal(before[k], zeros[k]) for k in zeros)


def test_masks_from_another_model_rejected_naming_first_mismatch(mlp, convnet):
    res = pl.prune(convnet, "magnitude", 0.5, device="cpu")
    with pytest.raises(ValueError, match=r"has no parameter 'c1.weight'"):
        export.to_torch_prune(mlp, res)
    with pytest.raises(ValueError, match=r"has no parameter 'c1.weight'"):
        export.apply(mlp, res.masks)
    other = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3))
    masks = pl.prune(other, "magnitude", 0.5).masks
    with pytest.raises(ValueError, match=r"mask of '0.weight' has shape \(7, 6\), the parameter \(5, 6\)"):
        export.apply(mlp, masks)
    with pytest.raises(ValueError, match=r"'0.weight'.*\(7, 6\).*\(5, 6\)"):
        export.masks_from_state_dict(export.apply(other, masks).state_dict(), model=mlp)
    with pytest.raises(ValueError, match=r"Did you mean '0.weight'"):
        export.apply(mlp, {"0.weigth": torch.ones(5, 6, dtype=torch.bool)})


@pytest.mark.parametrize("bad, exc, msg", [
    ({"0.weight": torch.full((5, 6), 0.5)}, ValueError, "values other than 0 and 1"),
    ({"0.weight": [[True] * 6] * 5}, TypeError, "must be a torch.Tensor"),
    ([torch.ones(5, 6, dtype=torch.bool)], TypeError, "PruneResult or a dict"),
])
def test_malformed_masks(mlp, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        export.to_torch_prune(mlp, bad)


def test_zero_one_float_masks_accepted(mlp):
    m = (torch.rand(5, 6) > 0.5).float()
    out = export.apply(mlp, {"0.weight": m})
    assert torch.equal(out[0].weight == 0, m == 0)


def test_tied_weights_masked_on_every_module():
    torch.manual_seed(0)
    model = TiedLinears()
    with pytest.warns(UserWarning, match="tied"):
        res = pl.prune(model, "magnitude", 0.5)
    tp = export.to_torch_prune(model, res)
    assert torch.equal(tp.a.weight_mask, tp.b.weight_mask)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(tp(x), _masked_forward(model, res.masks, x))
    assert export.from_torch_prune(tp).keys() >= {"a.weight", "c.weight"}


def test_import_masks_pruned_by_torch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    theirs = torch_prune.global_unstructured([(net[0], "weight"), (net[2], "weight")],
                                             pruning_method=torch_prune.L1Unstructured, amount=0.5)
    assert theirs is None
    masks = export.from_torch_prune(net)
    assert set(masks) == {"0.weight", "2.weight"}
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * 45)
    torch_prune.remove(net[0], "weight")
    torch_prune.remove(net[2], "weight")
    # the imported masks start a prune_lab session; the new masks nest inside them
    res = pl.prune(net, "magnitude", 0.8, allocation="global", masks=masks)
    assert all(torch.all(res.masks[n] <= masks[n]) for n in masks)


def test_updated_weights_of_another_model_are_refused(mlp):
    """Issue 16: apply() / to_torch_prune() wrote weights updated on model a into model b without a check."""
    res = pl.prune(mlp, "magnitude", 0.5)
    new = {n: torch.full_like(p, 0.25) for n, p in pl.prunable_parameters(mlp).items()}
    upd = dataclasses.replace(res, weights=new, _masks=res.masks, _mask_builder=None)
    torch.manual_seed(1)
    other = type(mlp)(*[copy_module(m) for m in mlp])  # same architecture, other weights
    before = state_copy(other)
    for fn, what in ((export.apply, "apply"), (export.to_torch_prune, "to_torch_prune")):
        with pytest.raises(ValueError, match=rf"{what}: this result carries updated weights .* other weights"):
            fn(other, upd)
    assert_state_equal(other, before)
    # the masks alone still apply to any model of that shape, and the right model takes the weights
    assert torch.equal(export.apply(other, upd.masks)[0].weight, other[0].weight * upd.masks["0.weight"])
    assert torch.equal(export.apply(mlp, upd)[0].weight, 0.25 * res.masks["0.weight"])
    # a result without updated weights is not fingerprint-checked (masks may be reused on a retrained twin)
    export.apply(other, res)


def copy_module(m):
    import copy

    m = copy.deepcopy(m)
    for p in m.parameters():
        with torch.no_grad():
            p.normal_()
    return m
