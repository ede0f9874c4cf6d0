"""Answers that used to be silently wrong at the extremes: layers emptied without a word, a sparsity that rounds to
1.0, and a half-precision model given float32 data (issue 16)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.core import pai as P


class SqueezeExcite(nn.Module):
    """MobileNet-V3's squeeze-excitation: x · hardsigmoid(fc2(relu(fc1(mean(x)))))."""

    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.se1 = SqueezeExcite(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.se2 = SqueezeExcite(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.se1(torch.relu(self.stem(x)))
        x = self.se2(torch.relu(self.conv(x)))
        return self.head(x.mean((2, 3)))


SE_LAYERS = ("se2.fc1.weight", "se2.fc2.weight")


def test_synflow_empties_saturated_se_layers_and_says_so():
    """With |w| weights and an all-ones input the second SE gate's pre-activation is far above 3, where
    hardsigmoid is flat: no synaptic flow reaches its fc layers (scores exactly 0), so SynFlow prunes them first
    and empties them. The engine must name them in a warning and in ``result.empty_layers``."""
    net = SENet()
    scores = P.synflow_scores(net, (3, 8, 8))
    assert all(float(scores[n].abs().max()) == 0.0 for n in SE_LAYERS)
    assert all(float(scores[n].abs().max()) > 0.0 for n in ("stem.weight", "conv.weight", "head.weight"))
    with pytest.warns(UserWarning, match=r"'synflow' with allocation 'global' at sparsity 0\.5 empties 2 of 7 "
                                         r"layers \(every weight pruned\): 'se2\.fc1\.weight', 'se2\.fc2\.weight'"):
        res = pl.prune(net, "synflow", 0.5, input_shape=(3, 8, 8), rounds=3)
    assert res.empty_layers == SE_LAYERS
    assert all(res.layer_sparsity[n] == 1.0 for n in SE_LAYERS)


def test_any_method_that_empties_a_layer_says_so_and_others_stay_quiet():
    net = nn.Sequential(nn.Linear(20, 20, bias=False), nn.ReLU(), nn.Linear(20, 2, bias=False))
    with torch.no_grad():
        net[2].weight.mul_(1e-3)  # far below the first layer: a global magnitude threshold takes it whole
    session = pl.PruneSession(net)
    with pytest.warns(UserWarning, match=r"empties 1 of 2 layers .*'2\.weight'"):
        res = session.prune("global_magnitude", 0.2)
    assert res.empty_layers == ("2.weight",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LAMP and uniform keep every layer: no warning
        assert session.prune("lamp", 0.2).empty_layers == ()
        assert session.prune("magnitude", 0.2).empty_layers == ()


def lamp_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(),
                         nn.Linear(32, 10, bias=False))  # 2,368 weights


@pytest.mark.parametrize("method, allocation", [("lamp", None), ("magnitude", "lamp"), ("snip", "lamp")])
def test_lamp_keeps_one_weight_per_layer_at_extreme_sparsity(method, allocation):
    """round(0.9999 · 2368) = 2368: before, LAMP emptied every layer and reported sparsity 1.0 (a sparsity that
    is rejected when asked for). LAMP keeps each layer's top-scored weight, says so, and reports what it did."""
    net = lamp_net()
    assert sum(p.numel() for p in net.parameters()) == 2368
    data = (torch.randn(16, 32), torch.randint(0, 10, (16,)))
    with pytest.warns(UserWarning, match=r"keeps the highest-scored weight of every layer .*asks to prune 2368 of "
                                         r"2368 weights; 2365 are pruned \(sparsity 0\.998733\)"):
        res = pl.prune(net, method, 0.9999, allocation=allocation, data=data)
    assert res.empty_layers == () and res.n_kept == 3 and res.sparsity < 1.0
    assert all(int(m.sum()) == 1 for m in res.masks.values())
    if method != "snip":  # the kept weight is the layer's largest
        for n, m in res.masks.items():
            w = dict(net.named_parameters())[n].detach().abs()
            assert float(w[m].max()) == float(w.max())


def test_lamp_below_the_cap_is_unchanged():
    net = lamp_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = pl.prune(net, "lamp", 0.998)  # round(0.998 · 2368) = 2363 ≤ 2365: no cap
    assert sum(res.pruned) == 2363


def test_half_precision_model_runs_on_float32_data():
    """float32 data for a float16 model is cast to the model's precision (evaluation and data methods), not a raw
    dtype error; the results match the float32 model's closely."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    half = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).half()
    half.load_state_dict({k: v.half() for k, v in net.state_dict().items()})
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    full_eval, half_eval = pl.evaluate(net, (x, y)), pl.evaluate(half, (x, y))
    assert half_eval["loss"] == pytest.approx(full_eval["loss"], rel=1e-2)
    assert pl.PruneSession(half, (x, y)).evaluate()["loss"] == pytest.approx(half_eval["loss"])
    for method in ("snip", "grasp", "woodfisher", "obs_layerwise"):
        res = pl.prune(half, method, 0.5, data=(x, y))
        assert res.sparsity == pytest.approx(0.5, abs=0.02)
        assert all(m.dtype == torch.bool for m in res.masks.values())
