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


# ---------------------------------------------------------------------------------------------------- issue 16
class _EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


def test_transformer_encoder_every_linear_and_attention_weight_is_prunable():
    g = build_graph(_EncoderNet())
    per_layer = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    assert g.prunable == ["inp.weight"] + [f"enc.layers.{i}.{n}" for i in range(2) for n in per_layer] + \
        ["head.weight"]
    in_proj = g.layers["enc.layers.0.self_attn.in_proj_weight"]
    assert (in_proj.kind, in_proj.shape, in_proj.module) == ("linear", (48, 16), "enc.layers.0.self_attn")
    # found outside the traced graph: identity neighbours, and said so
    assert [l.layer for l in g.producers["enc.layers.0.linear1.weight"]] == [None]
    assert "enc.layers.0.linear1.weight" in g.unresolved


def test_vit_out_proj_and_in_proj_are_prunable():
    m = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                             hidden_dim=16, mlp_dim=32, num_classes=3)
    names = pl.prunable_parameters(m)
    for i in range(2):
        block = f"encoder.layers.encoder_layer_{i}.self_attention"
        assert f"{block}.out_proj.weight" in names and f"{block}.in_proj_weight" in names
        assert names[f"{block}.in_proj_weight"] is getattr(m.encoder.layers, f"encoder_layer_{i}").self_attention \
            .in_proj_weight
    assert len(names) == 1 + 2 * 4 + 1
    assert list(names)[-1] == "heads.head.weight"  # data-flow order: attention weights where the block runs


def test_swin_attention_qkv_and_proj_used_through_f_linear_are_prunable():
    m = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2],
                                           window_size=[2, 2], num_classes=3)
    names = list(pl.prunable_parameters(m))
    qkv = [n for n in names if n.endswith("attn.qkv.weight")]
    proj = [n for n in names if n.endswith("attn.proj.weight")]
    assert len(qkv) == len(proj) == 4
    assert names.index("features.1.0.attn.qkv.weight") < names.index("features.1.0.attn.proj.weight") < \
        names.index("features.1.0.mlp.0.weight")
    assert names[-1] == "head.weight"


def test_raw_parameters_in_f_linear_and_f_conv_are_layers_with_neighbours():
    import torch.nn.functional as F

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 6))
            self.lin = nn.Linear(8, 8)
            self.k = nn.Parameter(torch.randn(4, 8, 1))

        def forward(self, x):
            h = torch.relu(F.linear(x, self.w1))
            h = F.linear(h, self.lin.weight, self.lin.bias)
            return F.conv1d(h.unsqueeze(-1), self.k)

    g = build_graph(Functional())
    assert g.prunable == ["w1", "lin.weight", "k"]
    assert (g.layers["k"].kind, g.layers["w1"].kind) == ("conv1d", "linear")
    assert [l.layer for l in g.consumers["w1"]] == ["lin.weight"]
    assert [l.layer for l in g.producers["lin.weight"]] == ["w1"]


def test_weight_norm_and_spectral_norm_originals_are_prunable_and_the_model_is_not_mutated():
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    m = nn.Sequential(weight_norm(nn.Linear(4, 6)), nn.ReLU(), spectral_norm(nn.Linear(6, 5)), nn.ReLU(),
                      spectral_norm(nn.Conv1d(1, 2, 3))).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = build_graph(m)
    assert g.prunable == ["0.parametrizations.weight.original1", "2.parametrizations.weight.original",
                          "4.parametrizations.weight.original"]
    assert [l.layer for l in g.consumers["0.parametrizations.weight.original1"]] == \
        ["2.parametrizations.weight.original"]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # _u / _v untouched
    assert all(mod.training for mod in m.modules())


def test_lstm_matrices_are_prunable_embeddings_are_not():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lstm = nn.LSTM(4, 6, num_layers=2, proj_size=3)
            self.fc = nn.Linear(3, 2)

        def forward(self, ids):
            return self.fc(self.lstm(self.emb(ids))[0][-1])

    assert build_graph(Net()).prunable == [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_hr_l0",
        "lstm.weight_ih_l1", "lstm.weight_hh_l1", "lstm.weight_hr_l1", "fc.weight"]


def test_lap_warns_once_naming_layers_without_neighbours():
    m = _EncoderNet()
    session = pl.PruneSession(m, device="cpu")
    match = r"LAP: 10 layer\(s\) have neighbours .*'enc.layers.0.self_attn.in_proj_weight'"
    with pytest.warns(UserWarning, match=match):
        session.prune("lap", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session.prune("lap", 0.7)  # once
        pl.PruneSession(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).prune("lap", 0.5)  # all found
