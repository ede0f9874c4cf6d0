import warnings

import pytest
import torch
import torchvision
from torch import nn

import prune_lab as pl
from prune_lab.core.graph import build_graph


class Reordered(nn.Module):
    """Modules registered in an order that differs from the data flow."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.body = nn.Linear(6, 8)
        self.stem = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))


def test_data_flow_order_not_registration_order():
    m = Reordered()
    assert [n for n, _ in m.named_parameters() if n.endswith("weight")] == ["head.weight", "body.weight",
                                                                          "stem.weight"]
    assert list(pl.prunable_parameters(m)) == ["stem.weight", "body.weight", "head.weight"]
    g = build_graph(m)
    assert [l.layer for l in g.producers["body.weight"]] == ["stem.weight"]
    assert [l.layer for l in g.consumers["body.weight"]] == ["head.weight"]
    assert [l.layer for l in g.producers["stem.weight"]] == [None]  # the model input
    assert [l.layer for l in g.consumers["head.weight"]] == [None]  # the model output


def test_include_exclude_patterns_and_parameters_identity():
    m = Reordered()
    assert list(pl.prunable_parameters(m, exclude="head*")) == ["stem.weight", "body.weight"]
    assert list(pl.prunable_parameters(m, include=["body", "stem.weight"])) == ["stem.weight", "body.weight"]
    params = pl.prunable_parameters(m)
    assert params["body.weight"] is m.body.weight
    # excluded layers still count as neighbours
    g = build_graph(m, exclude="head*")
    assert [l.layer for l in g.consumers["body.weight"]] == ["head.weight"]


def test_tied_weights_appear_once():
    a = nn.Linear(4, 4)
    m = nn.Sequential(a, nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    m[4].weight = a.weight
    assert list(pl.prunable_parameters(m)) == ["0.weight", "2.weight"]


def test_bn_and_flatten_on_the_path():
    from tests.conftest import SmallConvNet

    g = build_graph(SmallConvNet())
    (link,) = g.consumers["c2.weight"]
    assert link.layer == "fc1.weight" and link.flatten and link.near_bn == ("b2",)
    (link,) = g.producers["fc1.weight"]
    assert link.layer == "c2.weight" and link.flatten and link.far_bn == ("b2",)
    (link,) = g.producers["c2.weight"]
    assert link.layer == "c1.weight" and not link.flatten and link.near_bn == ("b1",)


def test_resnet18_graph_follows_residuals():
    m = torchvision.models.resnet18()
    g = build_graph(m)
    assert g.exact and len(g.prunable) == 21
    assert g.prunable[0] == "conv1.weight" and g.prunable[-1] == "fc.weight"
    prod = {l.layer: l for l in g.producers["layer1.1.conv1.weight"]}
    # the residual stream before layer1.1 carries layer1.0.conv2 (through bn2) and the stem conv (through bn1)
    assert set(prod) == {"layer1.0.conv2.weight", "conv1.weight"}
    assert prod["conv1.weight"].near_bn == ("bn1",)
    cons = {l.layer for l in g.consumers["layer4.1.conv2.weight"]}
    assert cons == {"fc.weight"}
    assert all(l.flatten for l in g.consumers["layer4.1.conv2.weight"])


def test_untraceable_model_falls_back_with_a_note():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = torch.relu(x)
            return self.b(self.a(x))

    with pytest.warns(UserWarning, match="could not trace"):
        g = build_graph(Dynamic())
    assert not g.exact and g.prunable == ["a.weight", "b.weight"]
    assert [l.layer for l in g.consumers["a.weight"]] == ["b.weight"]


def test_unknown_op_counts_as_identity_and_is_noted():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.cat([y, x], dim=1))

    g = build_graph(Cat())
    assert [l.layer for l in g.consumers["a.weight"]] == [None]
    assert any("cat" in note for note in g.notes)


def test_nothing_prunable():
    m = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    assert pl.prunable_parameters(m) == {}
    with pytest.raises(ValueError, match="nothing to prune"):
        pl.PruneSession(m)
