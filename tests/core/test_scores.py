import math

import pytest
import torch
from torch import nn

from prune_lab.core import scores as S
from prune_lab.core.graph import build_graph
from prune_lab.core.neighbours import bn_scales
from tests.conftest import SmallConvNet, randomize_bn


def weights_of(model):
    g = build_graph(model)
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in g.layers}, g


def test_magnitude_is_abs():
    w = torch.tensor([[-3.0, 0.5], [0.0, 2.0]])
    assert torch.equal(S.magnitude_scores({"w": w})["w"], w.abs())


def test_lamp_test_vector_from_methods_md():
    out = S.lamp_scores({"w": torch.tensor([0.1, -0.5, 0.3, -0.2, 0.4])})["w"]
    expected = torch.tensor([0.018182, 1.0, 0.18, 0.074074, 0.390244])
    assert torch.allclose(out, expected, atol=1e-6)


def test_lamp_formula_on_random_layer_and_max_is_one():
    torch.manual_seed(1)
    w = torch.randn(7, 5)
    out = S.lamp_scores({"w": w})["w"].reshape(-1).double()
    flat = w.reshape(-1).double()
    for u in range(flat.numel()):
        denom = (flat.pow(2) * (flat.abs() >= flat[u].abs())).sum()
        assert out[u].item() == pytest.approx((flat[u] ** 2 / denom).item(), rel=1e-6)
    assert out.max().item() == pytest.approx(1.0)


def test_random_scores_seeded_and_distinct():
    w = {"a": torch.zeros(4, 4), "b": torch.zeros(3)}
    a, b, c = S.random_scores(w, 3), S.random_scores(w, 3), S.random_scores(w, 4)
    assert all(torch.equal(a[k], b[k]) for k in w)
    assert not torch.equal(a["a"], c["a"])


# ---------------------------------------------------------------------------------------------------------------
# LAP
# ---------------------------------------------------------------------------------------------------------------
def three_linear():
    m = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False), nn.ReLU(),
                      nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 3.0], [1.0, -1.0]]))
        m[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 2.0]]))
        m[4].weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    return m


def test_lap_three_layer_by_hand():
    m = three_linear()
    w, g = weights_of(m)
    s = S.lap_scores(w, g)
    # middle layer, weight W2[0, 1] = -2: |−2| · ‖W1[1,:]‖ = 3 · ‖W3[:,0]‖ = √5
    assert s["2.weight"][0, 1].item() == pytest.approx(2 * 3 * math.sqrt(5), rel=1e-6)
    # W2[1, 2] = 2: ‖W1[2,:]‖ = √2, ‖W3[:,1]‖ = 1
    assert s["2.weight"][1, 2].item() == pytest.approx(2 * math.sqrt(2) * 1, rel=1e-6)
    # first layer: no previous layer (factor 1); W1[1, 1] = 3, next factor ‖W2[:,1]‖ = √5
    assert s["0.weight"][1, 1].item() == pytest.approx(3 * math.sqrt(5), rel=1e-6)
    # last layer: no next layer; W3[0, 0] = 2, previous factor ‖W2[0,:]‖ = √(1+4+0.25)
    assert s["4.weight"][0, 0].item() == pytest.approx(2 * math.sqrt(5.25), rel=1e-6)


def test_lap_equals_three_layer_product_distortion():
    """LAP's score of a weight is the Frobenius change of W3·W2·W1 when that weight alone is removed."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    w, g = weights_of(m)
    s = S.lap_scores(w, g)["2.weight"]
    W1, W2, W3 = w["0.weight"], w["2.weight"], w["4.weight"]
    full = W3 @ W2 @ W1
    for j in range(W2.shape[0]):
        for k in range(W2.shape[1]):
            W2p = W2.clone()
            W2p[j, k] = 0
            assert s[j, k].item() == pytest.approx((full - W3 @ W2p @ W1).norm().item(), rel=1e-5)


def test_lap_bn_factors_equal_product_with_diagonal():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 6), nn.BatchNorm1d(6),
                      nn.Linear(6, 3)).eval()
    randomize_bn(m)
    w, g = weights_of(m)
    sc = bn_scales(m, g.bn_modules)
    s = S.lap_scores(w, g, sc)["3.weight"]
    d1, d2 = torch.diag(sc["1"]), torch.diag(sc["4"])
    W1, W2, W3 = w["0.weight"], w["3.weight"], w["5.weight"]
    full = W3 @ d2 @ W2 @ d1 @ W1
    for j, k in [(0, 0), (2, 3), (5, 4)]:
        W2p = W2.clone()
        W2p[j, k] = 0
        assert s[j, k].item() == pytest.approx((full - W3 @ d2 @ W2p @ d1 @ W1).norm().item(), rel=1e-5)


def test_lap_conv_to_conv_and_conv_to_linear_after_flatten():
    torch.manual_seed(0)
    m = randomize_bn(SmallConvNet().eval())
    w, g = weights_of(m)
    sc = bn_scales(m, g.bn_modules)
    s = S.lap_scores(w, g, sc)
    c1, c2, fc1 = w["c1.weight"], w["c2.weight"], w["fc1.weight"]
    a1, a2 = sc["b1"], sc["b2"]
    # conv c2 weight [o, c, i, j]: |w| · (a1[c]·‖c1[c]‖) · (a2[o]·‖fc1[:, o·16:(o+1)·16]‖)
    for o, c, i, j in [(0, 0, 0, 0), (5, 3, 2, 1), (2, 1, 1, 2)]:
        prev = a1[c] * c1[c].norm()
        nxt = a2[o] * fc1[:, o * 16:(o + 1) * 16].norm()
        assert s["c2.weight"][o, c, i, j].item() == pytest.approx((c2[o, c, i, j].abs() * prev * nxt).item(),
                                                                  rel=1e-5)
    # linear fc1 weight [j, f]: input feature f belongs to channel f // 16 of c2 (after BN b2)
    for j, f in [(0, 0), (3, 17), (9, 95)]:
        prev = a2[f // 16] * c2[f // 16].norm()
        nxt = w["fc2.weight"][:, j].norm()
        assert s["fc1.weight"][j, f].item() == pytest.approx((fc1[j, f].abs() * prev * nxt).item(), rel=1e-5)
    # first conv: previous factor 1 (model input)
    o, c = 3, 0
    nxt = a1[o] * c2[:, o].norm()
    assert s["c1.weight"][o, c, 1, 1].item() == pytest.approx((c1[o, c, 1, 1].abs() * nxt).item(), rel=1e-5)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Conv2d(4, 3, 1, bias=False)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.a(x)) + x  # the stem feeds `a` and, through the join, `b`
        return self.head(torch.relu(self.b(y)) + y)


def test_lap_residual_join_sums_squared_factors():
    torch.manual_seed(0)
    m = Residual()
    w, g = weights_of(m)
    assert {l.layer for l in g.producers["b.weight"]} == {"a.weight", "stem.weight"}
    assert {l.layer for l in g.consumers["stem.weight"]} == {"a.weight", "b.weight", "head.weight"}
    s = S.lap_scores(w, g)
    o, c = 1, 2
    prev = math.sqrt(w["a.weight"][c].norm() ** 2 + w["stem.weight"][c].norm() ** 2)
    nxt = w["head.weight"][:, o].norm()
    assert s["b.weight"][o, c, 0, 0].item() == pytest.approx((w["b.weight"][o, c, 0, 0].abs() * prev * nxt).item(),
                                                             rel=1e-5)
    nxt_stem = math.sqrt(sum(w[k][:, o].norm() ** 2 for k in ("a.weight", "b.weight", "head.weight")))
    assert s["stem.weight"][o, 1, 2, 2].item() == pytest.approx(
        (w["stem.weight"][o, 1, 2, 2].abs() * nxt_stem).item(), rel=1e-5)


def test_lap_grouped_conv():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.Conv2d(4, 4, 3, groups=4, bias=False),
                      nn.Conv2d(4, 2, 1, bias=False))
    w, g = weights_of(m)
    s = S.lap_scores(w, g)
    # depthwise weight [o, 0]: reads channel o
    for o in range(4):
        expected = w["1.weight"][o, 0, 1, 1].abs() * w["0.weight"][o].norm() * w["2.weight"][:, o].norm()
        assert s["1.weight"][o, 0, 1, 1].item() == pytest.approx(expected.item(), rel=1e-5)
    # the consumer of the first conv is depthwise: channel j is read by filter j only
    j = 2
    assert s["0.weight"][j, 1, 0, 0].item() == pytest.approx(
        (w["0.weight"][j, 1].abs().sum() * w["1.weight"][j].norm()).item(), rel=1e-5)


def test_lap_sequential_forward_uses_pruned_predecessor():
    m = three_linear()
    w, g = weights_of(m)
    counts = {"0.weight": 3, "2.weight": 3, "4.weight": 2}
    masks = S.lap_sequential_masks(w, g, counts, direction="forward")
    assert {n: int((~mk).sum()) for n, mk in masks.items()} == counts
    # the second layer is scored against the already-pruned first layer
    w1p = w["0.weight"] * masks["0.weight"]
    prev = w1p.norm(dim=1)
    nxt = w["4.weight"].norm(dim=0)
    s2 = w["2.weight"].abs() * nxt[:, None] * prev[None, :]
    pruned = torch.sort(s2.reshape(-1), stable=True).indices[:3]
    expected = torch.ones(6, dtype=torch.bool)
    expected[pruned] = False
    assert torch.equal(masks["2.weight"].reshape(-1), expected)
    back = S.lap_sequential_masks(w, g, counts, direction="backward")
    assert {n: int((~mk).sum()) for n, mk in back.items()} == counts
    with pytest.raises(ValueError, match="forward"):
        S.lap_sequential_masks(w, g, counts, direction="sideways")
