"""The model zoo: every registered model builds, runs at its documented input shape and traces with torch.fx."""
import math

import pytest
import torch
import torch.fx
from torch import nn

from prune_lab import models
from prune_lab.models import registry

REQUIRED = {"mlpnet", "fcn", "lenet_300_100", "conv6", "vgg16_cifar", "resnet20_cifar", "resnet18_cifar", "ffnn"}


def test_required_models_are_registered():
    names = models.list_models()
    assert REQUIRED <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", models.list_models())
def test_model_builds_runs_and_traces(name):
    info = models.model_info(name)
    assert info.description and info.paper
    net = models.create(name, seed=0).eval()
    x = torch.randn(2, *info.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
        traced = torch.fx.symbolic_trace(net)
        out_traced = traced(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert torch.equal(out, out_traced)
    # the traced graph calls the real submodules, so the engine can map nodes to parameter names
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    prunable = {n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert prunable <= called


@pytest.mark.parametrize("name", sorted(REQUIRED - {"vgg16_cifar", "resnet18_cifar"}))  # the big two: too slow x3
def test_num_classes_and_seed(name):
    a = models.create(name, num_classes=7, seed=3)
    b = models.create(name, num_classes=7, seed=3)
    c = models.create(name, num_classes=7, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    last = [m for m in a.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 7


def test_seed_leaves_global_rng_alone():
    state = torch.get_rng_state()
    models.create("conv6", seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_parameter_counts_match_the_papers():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(models.create("mlpnet")) == 784 * 40 + 40 * 20 + 20 * 10
    assert count(models.create("fcn")) == (784 * 500 + 500) + 3 * (500 * 500 + 500) + (500 * 10 + 10)
    assert count(models.create("lenet_300_100")) == (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    # Conv-6 ~2.26M (Frankle & Carbin, Fig. 2); ResNet-20 0.27M (He et al. Table 6); VGG-16 ~14.7M; ResNet-18 ~11.2M
    assert round(count(models.create("conv6")) / 1e4) == 226
    assert round(count(models.create("resnet20_cifar", shortcut="pad")) / 1e4) == 27
    assert round(count(models.create("vgg16_cifar")) / 1e5) == 147
    assert round(count(models.create("resnet18_cifar")) / 1e5) == 112


def test_readable_parameter_names():
    assert [n for n, _ in models.create("mlpnet").named_parameters()] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    conv6 = dict(models.create("conv6").named_parameters())
    assert "features.0.weight" in conv6 and "classifier.4.weight" in conv6
    vgg = dict(models.create("vgg16_cifar").named_parameters())
    assert "features.0.weight" in vgg and "classifier.weight" in vgg
    assert vgg["classifier.weight"].shape == (10, 512)
    r20 = dict(models.create("resnet20_cifar").named_parameters())
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight", "fc.weight"} <= set(r20)


def test_mlps_accept_flat_and_image_batches():
    net = models.create("mlpnet", in_features=64, seed=0)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(net(x), net(x.reshape(3, 64)))
    assert isinstance(net[0], nn.Flatten)
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Linear))


def test_conv6_input_sizes():
    for size, channels in ((8, 1), (28, 1), (32, 3)):
        net = models.create("conv6", in_channels=channels, input_size=size)
        assert net(torch.zeros(2, channels, size, size)).shape == (2, 10)
        assert net.classifier[0].in_features == 256 * (size // 8) ** 2
    with pytest.raises(ValueError, match="input_size"):
        models.create("conv6", input_size=4)


def test_vgg16_structure():
    net = models.create("vgg16_cifar", in_channels=1)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and convs[0].in_channels == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 13
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 1


def test_resnet_shortcuts():
    conv = models.create("resnet20_cifar")
    pad = models.create("resnet20_cifar", shortcut="pad")
    assert len([m for m in conv.modules() if isinstance(m, nn.Conv2d)]) == 19 + 2  # 19 (He et al.) + 2 projections
    assert len([m for m in pad.modules() if isinstance(m, nn.Conv2d)]) == 19
    x = torch.randn(2, 3, 32, 32)
    assert torch.fx.symbolic_trace(pad.eval())(x).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut"):
        models.create("resnet20_cifar", shortcut="bogus")
    r18 = models.create("resnet18_cifar")
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())


def test_ffnn_depth_width_activation_and_eoc_init():
    net = models.create("ffnn", depth=5, width=256, in_features=64, activation="tanh", sigma_w=2.0, seed=0)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 and all(m.out_features == 256 for m in linears[:-1])
    assert any(isinstance(m, nn.Tanh) for m in net.modules()) and not any(isinstance(m, nn.ReLU) for m in net.modules())
    for m in linears[1:-1]:  # W ~ N(0, sigma_w^2 / fan_in): 65,536 samples, std within 2 %
        assert m.weight.std().item() == pytest.approx(2.0 / math.sqrt(256), rel=0.02)
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    nobias = models.create("ffnn", depth=2, width=8, bias=False)
    assert all(m.bias is None for m in nobias.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="activation"):
        models.create("ffnn", activation="gelu")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError) as err:
        models.create("resnet20")
    msg = str(err.value)
    assert "Did you mean 'resnet20_cifar'" in msg and "mlpnet" in msg and "vgg16_cifar" in msg


def test_unknown_argument_lists_accepted_ones():
    with pytest.raises(TypeError, match="in_features, num_classes"):
        models.create("mlpnet", in_channel=3)


def test_registering_twice_raises():
    @models.register_model("tmp_test_model", description="d", paper="p", input_shape=(1, 2, 2))
    def build(num_classes=2):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))

    try:
        assert models.create("tmp_test_model")(torch.zeros(1, 1, 2, 2)).shape == (1, 2)
        with pytest.raises(ValueError, match="already registered"):
            models.register_model("tmp_test_model", description="d", paper="p", input_shape=(1, 2, 2))(build)
    finally:
        registry._REGISTRY.pop("tmp_test_model", None)


def test_create_for_infers_shapes():
    assert models.shape_kwargs("resnet20_cifar", (1, 8, 8), 5) == {"in_channels": 1, "num_classes": 5}
    net = models.create_for("fcn", (1, 8, 8), 4, hidden=16)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 4) and net.fc1.out_features == 16
    with pytest.raises(ValueError, match="square"):
        models.shape_kwargs("conv6", (3, 8, 16), 10)
