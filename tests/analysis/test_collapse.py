"""Critical sparsity, layer collapse and effective sparsity on hand-made cases and as properties."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prune_lab as pl
from prune_lab.analysis.collapse import critical_sparsity, effective_masks, effective_sparsity, layer_collapse


def test_critical_sparsity_hand_made():
    # t* = min(3, 1.5) = 1.5; scores below: 1.0 (a), 0.5 (b) → 2 of 5
    assert critical_sparsity({"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 1.5])}) == 0.4
    # ties at t* are not below it
    assert critical_sparsity({"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([[0.2, 1.0]])}) == 0.2
    # already pruned (-inf) weights count as below
    assert critical_sparsity({"a": torch.tensor([-float("inf"), 2.0]), "b": torch.tensor([3.0, 4.0])}) == 0.25
    # one layer: everything below its maximum
    assert critical_sparsity({"a": torch.arange(10.0)}) == 0.9
    with pytest.raises(ValueError, match="non-empty dict"):
        critical_sparsity({})
    with pytest.raises(ValueError, match="scores\\['a'\\] contains NaN"):
        critical_sparsity({"a": torch.tensor([float("nan")])})


@settings(max_examples=30)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=5), st.integers(0, 10_000))
def test_critical_sparsity_is_where_global_pruning_starts_to_empty_a_layer(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.rand(n, generator=g) * (i + 1) for i, n in enumerate(sizes)}
    total = sum(sizes)
    s_cr = critical_sparsity(scores)
    k = round(s_cr * total)
    allv = torch.cat(list(scores.values()))
    order = torch.sort(allv, stable=True).indices
    def emptied(k):
        m = torch.ones(total, dtype=torch.bool)
        m[order[:k]] = False
        masks, start = {}, 0
        for n, v in scores.items():
            masks[n] = m[start:start + v.numel()]
            start += v.numel()
        return layer_collapse(masks)
    assert emptied(k) == []
    assert emptied(k + 1) != []  # continuous scores: no ties at t*


def test_layer_collapse_from_masks_and_results():
    masks = {"a": torch.tensor([[True, False]]), "b": torch.zeros(2, 2, dtype=torch.bool),
             "c": torch.tensor([False, True])}
    assert layer_collapse(masks) == ["b"]
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    res = pl.prune(net, "random", 0.0)
    assert layer_collapse(res) == []
    with pytest.raises(TypeError, match="bool tensor"):
        layer_collapse({"a": torch.ones(2)})


def chain():
    return nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))


def test_effective_masks_hand_made_chain():
    T, F_ = True, False
    m = {
        "0.weight": torch.tensor([[T, F_, F_], [F_, F_, F_], [F_, T, F_]]),  # unit 1 gets nothing: dead forward
        "2.weight": torch.tensor([[T, T, F_], [F_, F_, T], [T, F_, F_]]),  # row 2 feeds nobody downstream
        "4.weight": torch.tensor([[T, T, F_], [F_, F_, F_]]),
    }
    eff = effective_masks(chain(), m)
    assert eff["0.weight"].tolist() == [[T, F_, F_], [F_, F_, F_], [F_, T, F_]]
    # 2.weight: [0,1] reads dead unit 1; row 2 is not read by 4.weight
    assert eff["2.weight"].tolist() == [[T, F_, F_], [F_, F_, T], [F_, F_, F_]]
    assert eff["4.weight"].tolist() == [[T, T, F_], [F_, F_, F_]]
    nominal = 1 - sum(int(v.sum()) for v in m.values()) / 24
    assert effective_sparsity(chain(), m) == pytest.approx(1 - 6 / 24) and nominal == pytest.approx(1 - 8 / 24)


def test_a_collapsed_layer_disconnects_everything():
    net = chain()
    m = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in net.named_parameters() if n.endswith("weight")}
    assert effective_sparsity(net, m) == 0.0
    m["2.weight"][:] = False
    assert effective_sparsity(net, m) == 1.0 and layer_collapse(m) == ["2.weight"]


def brute_force_effective(masks):
    """Chain of Linear masks: path counts by matrix products (independent of the graph walk)."""
    names = list(masks)
    mats = [masks[n].double() for n in names]
    out = {}
    for i, n in enumerate(names):
        fwd = torch.ones(mats[0].shape[1], dtype=torch.float64)
        for a in mats[:i]:
            fwd = a @ fwd
        bwd = torch.ones(mats[-1].shape[0], dtype=torch.float64)
        for a in reversed(mats[i + 1:]):
            bwd = a.T @ bwd
        out[n] = masks[n] & (bwd > 0).unsqueeze(1) & (fwd > 0).unsqueeze(0)
    return out


@settings(max_examples=30)
@given(st.integers(0, 10_000), st.floats(0.3, 0.95))
def test_effective_masks_match_path_counting(seed, density):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 6), nn.ReLU(),
                        nn.Linear(6, 3))
    masks = {n: torch.rand(p.shape, generator=g) < (1 - density) for n, p in net.named_parameters()
             if n.endswith("weight")}
    eff = effective_masks(net, masks)
    want = brute_force_effective(masks)
    assert all(torch.equal(eff[n], want[n]) for n in masks)
    assert all(not (eff[n] & ~masks[n]).any() for n in masks)
    again = effective_masks(net, eff)
    assert all(torch.equal(again[n], eff[n]) for n in eff)  # idempotent


def test_effective_masks_conv_flatten_linear():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    m = {"0.weight": torch.ones(2, 1, 3, 3, dtype=torch.bool), "3.weight": torch.zeros(3, 32, dtype=torch.bool)}
    m["3.weight"][0, 20] = True  # reads channel 1 (features 16..31) only
    eff = effective_masks(net, m)
    assert eff["0.weight"][1].all() and not eff["0.weight"][0].any()
    assert torch.equal(eff["3.weight"], m["3.weight"])
    m["0.weight"][1] = False  # channel 1 is dead now: the linear weight reading it is disconnected
    assert effective_sparsity(net, m) == 1.0


def test_effective_masks_see_residual_shortcuts():
    from prune_lab.models import stable  # noqa: F401  (registers the models)

    net = pl.models.create("stable_resnet", depth=8, width=2, in_channels=1, seed=0)
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in pl.prunable_parameters(net).items()}
    assert effective_sparsity(net, masks) == 0.0
    # emptying one residual branch's first conv cuts that branch, but the shortcut keeps the rest connected
    masks["layer1.0.conv1.weight"][:] = False
    eff = effective_masks(net, masks)
    assert not eff["layer1.0.conv2.weight"].any()
    assert eff["layer2.0.conv1.weight"].all() and eff["fc.weight"].all()
