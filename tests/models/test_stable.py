"""Stable ResNet and its plain counterpart: registration, shapes, 1/√L branch scaling, fx tracing, depth stability."""
import math

import pytest
import torch

import prune_lab as pl
from prune_lab.models import stable  # noqa: F401  (registers stable_resnet and plain_resnet)
from prune_lab.models.stable import StableResNet


def test_registered_and_shapes():
    assert {"stable_resnet", "plain_resnet"} <= set(pl.models.list_models())
    net = pl.models.create("stable_resnet", depth=14, width=4, in_channels=1, num_classes=7, seed=0)
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 7)
    assert net.num_blocks == 6 and net.branch_scale == pytest.approx(1 / math.sqrt(6))
    assert all(b.scale == net.branch_scale for s in (net.layer1, net.layer2, net.layer3) for b in s)


def test_plain_counterpart_is_the_same_network_but_the_scale():
    s = pl.models.create("stable_resnet", depth=8, width=4, seed=3)
    p = pl.models.create("plain_resnet", depth=8, width=4, seed=3)
    assert p.branch_scale == 1.0
    sd_s, sd_p = s.state_dict(), p.state_dict()
    assert list(sd_s) == list(sd_p) and all(torch.equal(sd_s[k], sd_p[k]) for k in sd_s)
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(s.eval()(x), p.eval()(x))


def test_forward_is_shortcut_plus_scaled_branch():
    net = StableResNet(depth=8, width=2, in_channels=1).eval()
    block = net.layer1[0]
    x = torch.randn(2, 2, 4, 4)
    branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), x + branch / math.sqrt(3))


def test_fx_traceable_graph_sees_residual_joins():
    net = pl.models.create("stable_resnet", depth=8, width=2, in_channels=1, seed=0)
    g = pl.build_graph(net)
    assert g.exact and len(g.prunable) == 1 + 2 * 3 + 2 + 1  # stem, 2 convs × 3 blocks, 2 projections, fc
    consumers = {l.layer for l in g.consumers["conv1.weight"]}
    assert {"layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer2.0.shortcut.0.weight"} <= consumers
    torch.fx.symbolic_trace(net)


def test_branch_scaling_keeps_deep_nets_stable_without_batchnorm():
    def out_var(depth, stable_):
        net = StableResNet(depth=depth, width=8, in_channels=1, stable=stable_, batchnorm=False)
        torch.manual_seed(0)
        with torch.no_grad():
            return float(net.layer3(net.layer2(net.layer1(torch.randn(16, 8, 8, 8)))).pow(2).mean())

    plain = out_var(56, False) / out_var(8, False)
    stab = out_var(56, True) / out_var(8, True)
    assert plain > 1e4  # each unscaled block roughly doubles the second moment
    assert stab < 30


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2.*21"):
        pl.models.create("stable_resnet", depth=21)
    with pytest.raises(ValueError, match="width must be a positive int.*0"):
        StableResNet(width=0)
