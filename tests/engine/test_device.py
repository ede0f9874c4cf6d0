"""The device path: results identical on every device, data kept on the session's device, and no per-layer device
synchronisation in a warm sparsity change. On a CPU-only machine the CUDA cases are skipped; the per-layer
synchronisation is then checked structurally, on the CPU, with the device code paths forced (host reads counted)."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.core import ranking as R
from prune_lab.engine import weights as W

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
METHODS = ["magnitude", "global_magnitude", "lamp", "lap", "random"]


def chain(n_layers=4, width=24, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    mods = []
    for i in range(n_layers):
        mods += [nn.Linear(width if i else 12, width if i < n_layers - 1 else 5), nn.ReLU()]
    return nn.Sequential(*mods[:-1]).to(dtype).eval()


def _same(a, b, exact_frobenius=True):
    assert a.layers == b.layers and a.pruned == b.pruned
    assert all(torch.equal(a.masks[n].cpu(), b.masks[n].cpu()) for n in a.layers)
    if exact_frobenius:
        assert a.frobenius == b.frobenius
    else:
        for n in a.layers:
            assert a.frobenius[n] == pytest.approx(b.frobenius[n], rel=1e-6, abs=1e-9)


def test_explicit_cpu_equals_the_default():
    """On this machine "auto" resolves to the CPU; an explicit device="cpu" must give identical results."""
    if torch.cuda.is_available():
        pytest.skip("'auto' is CUDA here: the parametrised comparison below covers it")
    model = chain()
    default, cpu = pl.PruneSession(model), pl.PruneSession(model, device="cpu")
    assert default.device == cpu.device == torch.device("cpu")
    for method in METHODS:
        for s in (0.3, 0.9):
            _same(default.prune(method, s), cpu.prune(method, s))
            _same(pl.prune(model, method, s), pl.prune(model, method, s, device="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_every_device_gives_the_cpu_results(device, dtype):
    """Masks and counts identical, distortion equal up to summation order; orders, cumulative sums and masks on
    the device, sorted keys on the host."""
    model = chain(dtype=dtype)
    ref = pl.PruneSession(model, device="cpu")
    dev = pl.PruneSession(model, device=device)
    for method in METHODS:
        for s, alloc in ((0.5, None), (0.9, "global"), (0.8, "erk")):
            a, b = ref.prune(method, s, allocation=alloc), dev.prune(method, s, allocation=alloc)
            _same(a, b, exact_frobenius=device == "cpu")
            assert all(m.device == p.device for m, p in zip(b.masks.values(), pl.prunable_parameters(model).values()))
        r = dev.ranking(method)
        for lr in r.layers.values():
            assert lr.order.device.type == device and lr.csum.device.type == device
            assert isinstance(lr.keys, R.SortedKeys)  # host memory: the bisection never touches the device
        assert all(m.device.type == device for m in r.masks(np.zeros(len(r.names), dtype=int)).values())
        grid = [[0] * len(r.names), list(r.sizes // 2), list(r.sizes)]
        assert np.allclose(r.frobenius_curve(grid), ref.ranking(method).frobenius_curve(grid), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_runs_on_the_session_device(device, monkeypatch):
    model = chain()
    data = pl.data.synthetic(n_train=16, n_test=32, input_shape=(12,), num_classes=5)
    seen = []
    from prune_lab.analysis import session as session_module

    original = session_module.evaluate

    def spy(*a, **k):
        seen.append(k.get("device"))
        return original(*a, **k)

    monkeypatch.setattr(session_module, "evaluate", spy)
    session = pl.PruneSession(model, data, device=device)
    res = session.prune("lamp", 0.5)
    got = session.evaluate(res)
    assert session.evaluate(res) == got  # cached by the query: evaluated once
    assert seen == [torch.device(device)]
    want = pl.evaluate(model, data, masks=res.masks, device="cpu")
    assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_no_device_synchronize_in_the_package():
    """An unconditional ``cuda.synchronize()`` stalls every caller; prune_lab has none (benchmarks time with it)."""
    pattern = re.compile(r"cuda\s*\.\s*synchronize|\.synchronize\s*\(")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "prune_lab").rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------
# host reads (each one a device synchronisation on a GPU) in a warm sparsity change: not one per layer
# ---------------------------------------------------------------------------------------------------------------
# (``numpy()`` / ``__array__`` work on host tensors only: a device tensor needs one of these first)
_READS = ("cpu", "item", "tolist", "__float__", "__int__", "__index__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts calls that copy a tensor's values to the host (a synchronisation on a GPU), with the device code
    paths forced on the CPU: numpy views of host tensors (the CPU fast paths) are switched off."""
    calls = []
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, __original=original, __name=name, **k):
            calls.append(__name)
            return __original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    monkeypatch.setattr(R.LayerRank, "_host_path", lambda self: False)
    monkeypatch.setattr(W, "_NUMPY_FLOATS", ())  # the weights' change check as for a GPU model
    return calls


@pytest.mark.parametrize("method", ["global_magnitude", "lamp", "magnitude"])
def test_warm_sparsity_change_reads_the_device_a_fixed_number_of_times(method, host_reads):
    counts = {}
    for n_layers in (2, 12):
        session = pl.PruneSession(chain(n_layers), device="cpu")
        session.prune(method, 0.5)  # cold: ranks (reads the weights for the fingerprint, the keys)
        host_reads.clear()
        for s in (0.2, 0.7, 0.95):
            res = session.prune(method, s)
        counts[n_layers] = len(host_reads) / 3
        assert not res.masks_built
    assert counts[2] == counts[12] <= 2, counts  # the change check and the distortions: one transfer each


def test_ranking_queries_read_the_device_once(host_reads):
    g = torch.Generator().manual_seed(0)
    for n_layers in (3, 30):
        w = {f"l{i}": torch.randn(500, generator=g) for i in range(n_layers)}
        r = R.Ranking.from_scores(list(w), {k: v.abs() for k, v in w.items()}, w)
        host_reads.clear()
        counts = r.global_counts(r.total // 3)
        assert host_reads == []  # host keys: the bisection reads nothing from the device
        r.frobenius(counts)
        assert len(host_reads) == 1
        host_reads.clear()
        r.frobenius_curve([counts, counts // 2])
        r.weight_norms()
        assert len(host_reads) == 1
        host_reads.clear()
        r.masks(counts)
        assert host_reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (verified on a GPU machine only)")
def test_cuda_warm_change_synchronises_at_most_twice():
    """With torch's sync debug mode every synchronising call warns: a warm change makes two (the weights' change
    check and one transfer of all distortions), whatever the number of layers."""
    import warnings

    for n_layers in (2, 12):
        session = pl.PruneSession(chain(n_layers).cuda(), device="cuda")
        session.prune("global_magnitude", 0.5)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                session.prune("global_magnitude", 0.8)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert len([w for w in caught if "synchroniz" in str(w.message)]) <= 2
