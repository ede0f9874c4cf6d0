import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# One intra-op thread: the tests' models are small, and with the cores shared (pytest, notebook kernels, other
# jobs) a second OpenMP thread mostly spins and waits.
torch.set_num_threads(1)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4), torch.nn.ReLU(),
                               torch.nn.Linear(4, 3))


class SmallConvNet(torch.nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> pool -> flatten -> linear -> linear (8x8 inputs)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(4)
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.b2 = torch.nn.BatchNorm2d(6)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(6 * 4 * 4, 10)
        self.fc2 = torch.nn.Linear(10, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class TiedLinears(torch.nn.Module):
    """a -> relu -> b -> relu -> c (4 -> 4 -> 4 -> 2) where b shares a's weight (one Parameter, two modules)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return randomize_bn(SmallConvNet().eval())


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on 127.0.0.1 with 2 CPUs, started once for the tests that need it."""
    import ray  # a dev dependency: installed by `make test`

    ray.init(num_cpus=2, address="local", include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
