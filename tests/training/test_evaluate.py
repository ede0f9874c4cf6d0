"""evaluate() and recalibrate_bn(): correct numbers, and the model is left bit-for-bit as it was."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune_lab import data, models
from prune_lab.training import evaluate, recalibrate_bn, train


@pytest.fixture(scope="module")
def bundle():
    return data.synthetic(n_train=96, n_test=40, input_shape=(3, 8, 8), num_classes=4, seed=0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_matches_a_manual_computation(bundle):
    net = models.create("mlpnet", in_features=3 * 64, num_classes=4, seed=0)
    train(net, bundle, epochs=3, progress=False)
    x, y = bundle.test.images, bundle.test.labels
    with torch.no_grad():
        out = net(x)
    expected_acc = (out.argmax(1) == y).sum().item() / len(y)
    expected_loss = F.cross_entropy(out, y).item()
    for source in (bundle, bundle.test, (x, y), torch.utils.data.DataLoader(bundle.test, batch_size=7)):
        got = evaluate(net, source, batch_size=16)
        assert got["accuracy"] == pytest.approx(expected_acc, abs=1e-12)
        assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_evaluate_with_masks_equals_a_masked_copy(bundle):
    net = models.create("resnet20_cifar", in_channels=3, num_classes=4, seed=0)
    train(net, bundle, steps=2, batch_size=32, progress=False)  # non-trivial BN statistics
    g = torch.Generator().manual_seed(7)
    masks = {n: torch.rand(p.shape, generator=g) < 0.6 for n, p in net.named_parameters() if p.dim() == 4}
    copy_ = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in copy_.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    want = evaluate(copy_, bundle)
    got = evaluate(net, bundle, masks=masks)
    assert got["accuracy"] == pytest.approx(want["accuracy"]) and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["loss"] != pytest.approx(evaluate(net, bundle)["loss"], rel=1e-3)  # the masks did matter


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_evaluate_leaves_the_model_unchanged(bundle, mode):
    net = models.create("resnet20_cifar", in_channels=3, num_classes=4, seed=0)
    net.train(mode != "eval")
    if mode == "mixed":
        net.layer2.eval()
    modes = {name: m.training for name, m in net.named_modules()}
    before = _snapshot(net)
    masks = {"conv1.weight": torch.zeros_like(net.conv1.weight, dtype=torch.bool)}
    evaluate(net, bundle)
    evaluate(net, bundle, masks=masks)
    assert _same(before, _snapshot(net))  # BN running stats included: eval mode was used
    assert modes == {name: m.training for name, m in net.named_modules()}
    assert net.conv1.weight.abs().sum() > 0


def test_evaluate_on_another_device_string_does_not_move_the_model(bundle):
    net = models.create("mlpnet", in_features=3 * 64, num_classes=4, seed=0)
    ref = evaluate(net, bundle)
    got = evaluate(net, bundle, device="cpu")
    assert got == ref and next(net.parameters()).device.type == "cpu"


def test_evaluate_restores_modes_after_an_error():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).train()
    with pytest.raises(ValueError, match=r"data: the model could not run on inputs of shape \(2, 5\)"):
        evaluate(net, (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)))  # wrong input width
    assert net.training and net[1].training


def _conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 64, 4))


def test_recalibrate_bn_estimates_the_data_statistics(bundle):
    net = _conv_bn()
    before = _snapshot(net)
    fresh = recalibrate_bn(net, bundle, batches=6, batch_size=16)  # 6 x 16 = the whole train split
    assert fresh is not net and _same(before, _snapshot(net))
    with torch.no_grad():
        z = net[0](bundle.train.images)
    assert torch.allclose(fresh[1].running_mean, z.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(fresh[1].running_var, z.var(dim=(0, 2, 3), unbiased=True), rtol=0.05)
    assert fresh[1].momentum == net[1].momentum == 0.1 and fresh.training == net.training
    for k in before:  # weights untouched
        if k.endswith("weight") or k.endswith("bias"):
            assert torch.equal(before[k], fresh.state_dict()[k])


def test_recalibrate_bn_applies_masks_and_inplace(bundle):
    net = _conv_bn()
    mask = torch.ones_like(net[0].weight, dtype=torch.bool)
    mask[2] = False  # prune the whole filter 2: its output is just the bias
    out = recalibrate_bn(net, bundle, masks={"0.weight": mask}, batches=3, inplace=True)
    assert out is net
    assert net[1].running_mean[2].item() == pytest.approx(net[0].bias[2].item(), abs=1e-6)
    assert net[1].running_var[2].item() == pytest.approx(0.0, abs=1e-10)
    assert net[0].weight[2].abs().sum() > 0  # the weights were not zeroed


def test_evaluate_with_updated_weights_equals_a_modified_copy():
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    mask = {"1.weight": torch.rand(3, 4) > 0.5}
    new = {"1.weight": torch.randn(3, 4)}
    copy_ = copy.deepcopy(net)
    with torch.no_grad():
        copy_[1].weight.copy_(new["1.weight"] * mask["1.weight"])
    assert evaluate(net, data, masks=mask, weights=new) == evaluate(copy_, data)
    assert evaluate(net, data) != evaluate(copy_, data)
