"""The cached lookahead distortion (Gram factors + references) equals the direct three-layer product."""
import pytest
import torch
from torch import nn

from prune_lab.core.distortion import lookahead_distortion
from prune_lab.core.graph import build_graph
from prune_lab.core.neighbours import bn_scales
from prune_lab.core.lookahead import SPARSE_FRACTION, LookaheadCache


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5, bias=False)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.dw(torch.relu(self.a(h)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 4), 1))


def _chain(*sizes):
    """A bias-free Linear/ReLU chain of the given widths, its graph and its weights (seed 0)."""
    torch.manual_seed(0)
    layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b, bias=False), nn.ReLU())][:-1]
    model = nn.Sequential(*layers)
    return build_graph(model), {n: p.detach() for n, p in model.named_parameters()}


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, 4))
    res = _Residual()
    with torch.no_grad():
        res.bn.running_var.uniform_(0.5, 2.0)
        res.bn.weight.uniform_(0.5, 1.5)
    return {"mlp": mlp, "residual": res}


@pytest.mark.parametrize("name", ["mlp", "residual"])
def test_every_path_equals_the_direct_product(name):
    model = _models()[name]
    graph = build_graph(model)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in graph.layers}
    scales = bn_scales(model, {m: dict(model.named_modules())[m] for m in graph.bn_modules})
    cache = LookaheadCache(graph, weights, scales)
    gen = torch.Generator().manual_seed(1)
    # far from both ends (dense), near each end (sparse from "nothing" / "everything" removed), and a small move
    # away from a dense point (sparse from a reference)
    for frac in (0.5, 0.04, 0.97, 0.52, 0.3):
        for n in graph.prunable:
            w = weights[n]
            order = torch.randperm(w.numel(), generator=gen)
            mask = torch.ones(w.numel(), dtype=torch.bool)
            mask[order[: int(round(frac * w.numel()))]] = False
            mask = mask.reshape(w.shape)
            want = lookahead_distortion(graph, weights, n, w * mask, scales)
            assert cache.distortion(n, mask) == pytest.approx(want, rel=1e-5, abs=1e-6)
    paths = {k: sum(layer.paths[k] for layer in cache.layers.values()) for k in ("dense", "sparse")}
    assert paths["dense"] > 0 and paths["sparse"] > 0
    for n in graph.prunable:
        assert cache.full(n) == pytest.approx(
            lookahead_distortion(graph, weights, n, torch.zeros_like(weights[n]), scales), rel=1e-5)


def test_a_small_move_reuses_the_last_dense_point():
    graph, weights = _chain(64, 64, 64, 8)
    cache = LookaheadCache(graph, weights)
    n = "2.weight"
    order = weights[n].abs().reshape(-1).argsort()
    def mask(k):
        m = torch.ones(weights[n].numel(), dtype=torch.bool)
        m[order[:k]] = False
        return m.reshape(weights[n].shape)
    cache.distortion(n, mask(2048))  # half: a dense product, kept as a reference
    before = dict(cache.layer(n).paths)
    k = 2048 + int(0.5 * SPARSE_FRACTION * 4096)
    got = cache.distortion(n, mask(k))
    assert cache.layer(n).paths["sparse"] == before["sparse"] + 1
    assert cache.layer(n).paths["dense"] == before["dense"]
    assert got == pytest.approx(lookahead_distortion(graph, weights, n, weights[n] * mask(k)), rel=1e-5)


def test_updated_weights_are_measured_as_they_are():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    graph = build_graph(model)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in graph.layers}
    cache = LookaheadCache(graph, weights)
    new = weights["0.weight"] * 0.5
    assert cache.distortion("0.weight", weight=new) == pytest.approx(
        lookahead_distortion(graph, weights, "0.weight", new), rel=1e-6)


def test_thin_neighbours_use_their_factors_and_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32, bias=False), nn.GELU(), nn.Linear(32, 8, bias=False), nn.GELU(),
                          nn.Linear(8, 32, bias=False))
    graph = build_graph(model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    cache = LookaheadCache(graph, weights)
    assert cache.layer("0.weight").left is not None  # its consumer (8 × 32) is thinner than its 32 outputs
    assert cache.layer("2.weight").right is not None  # its producer (32 × 8) is thinner than its 32 inputs
    gen = torch.Generator().manual_seed(3)
    for n in graph.prunable:
        mask = torch.rand(weights[n].shape, generator=gen) > 0.5
        assert cache.distortion(n, mask) == pytest.approx(
            lookahead_distortion(graph, weights, n, weights[n] * mask), rel=1e-5)


def test_a_pruning_order_gives_the_same_values_without_masks():
    torch.manual_seed(0)
    model = _Residual()
    graph = build_graph(model)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in graph.layers}
    by_order, by_mask = LookaheadCache(graph, weights), LookaheadCache(graph, weights)
    for n in graph.prunable:
        order = weights[n].abs().reshape(-1).argsort(stable=True).to(torch.int32)
        numel = weights[n].numel()
        for frac in (0.5, 0.52, 0.6, 0.49, 0.02, 0.97, 0.5):
            k = int(round(frac * numel))
            mask = torch.ones(numel, dtype=torch.bool)
            mask[order[:k].long()] = False
            mask = mask.reshape(weights[n].shape)
            want = lookahead_distortion(graph, weights, n, weights[n] * mask)
            assert by_order.distortion(n, None, n_removed=k, order=order) == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert by_mask.distortion(n, mask, n_removed=k) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert sum(layer.paths["sparse"] for layer in by_order.layers.values()) > 0


def test_a_dense_product_stops_between_slices_and_leaves_no_reference():
    import threading

    from prune_lab.core.lookahead import Interrupted

    graph, weights = _chain(256, 512, 256, 10)
    cache = LookaheadCache(graph, weights)
    n = "2.weight"
    mask = torch.rand(weights[n].shape) > 0.5
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        cache.distortion(n, mask, stop=stop)
    assert cache.layer(n).references == []  # nothing half-made is kept
    stop.clear()
    want = lookahead_distortion(graph, weights, n, weights[n] * mask)
    assert cache.distortion(n, mask, stop=stop) == pytest.approx(want, rel=1e-5)  # sliced: the same value


@pytest.mark.parametrize("left_diag, right_diag", [(False, False), (True, False), (False, True)])
def test_the_sparse_form_equals_its_formula_on_either_side(left_diag, right_diag):
    """``Σ_t tr(L X_t R X_tᵀ)`` of a sparse ``X`` (what :meth:`LayerLookahead.quadratic_sparse` computes on ``Δ``
    or, for a layer with more inputs than outputs, on ``Δᵀ``), against dense products."""
    from prune_lab.core.lookahead import _sparse_form

    gen = torch.Generator().manual_seed(0)
    taps, n_r, n_c = 3, 7, 11

    def sym(n, diag):
        if diag:
            return torch.rand(n, generator=gen) + 0.1
        m = torch.randn(n, n, generator=gen)
        return m @ m.T

    left, right = sym(n_r, left_diag), sym(n_c, right_diag)
    x = torch.randn(taps, n_r, n_c, generator=gen) * (torch.rand(taps, n_r, n_c, generator=gen) < 0.3)
    t, r, c = x.nonzero(as_tuple=True)
    lm = torch.diag(left) if left_diag else left
    rm = torch.diag(right) if right_diag else right
    want = sum(float(torch.trace(lm @ x[k] @ rm @ x[k].T)) for k in range(taps))
    assert _sparse_form(t, r, c, x[t, r, c], taps, n_r, n_c, left, right) == pytest.approx(want, rel=1e-5)
    # the same form on the transposes, with the factors swapped: what a wide layer computes
    assert _sparse_form(t, c, r, x[t, r, c], taps, n_c, n_r, right, left) == pytest.approx(want, rel=1e-5)


def test_an_ordered_step_starts_from_the_nearest_reference_or_end(monkeypatch):
    from prune_lab.core.lookahead import LayerLookahead

    graph, weights = _chain(64, 48, 96, 8)
    changed = []  # the size of each sparse step's change
    step = LayerLookahead._step
    monkeypatch.setattr(LayerLookahead, "_step", lambda self, idx, *a: changed.append(len(idx)) or step(self, idx, *a))
    for n in ("2.weight", "0.weight"):  # 96 × 48, and a layer with more inputs than outputs (48 × 64)
        cache = LookaheadCache(graph, weights)
        w = weights[n]
        numel = w.numel()
        order = w.abs().reshape(-1).argsort().to(torch.int32)
        layer = cache.layer(n)
        ref = numel - int(1.5 * SPARSE_FRACTION * numel)  # a dense reference just out of the end's reach
        # (removed, path, entries changed from the nearest of: nothing, everything, the references so far)
        near_end = numel - int(0.9 * SPARSE_FRACTION * numel)  # within reach of both: the reference is nearer
        steps = [(ref, "dense", None), (ref + 4, "sparse", 4), (near_end, "sparse", near_end - ref),
                 (numel - 5, "sparse", 5), (numel // 2, "dense", None), (numel // 2 - 7, "sparse", 7)]
        for k, path, size in steps:
            before, changed[:] = dict(layer.paths), []
            mask = torch.ones(numel, dtype=torch.bool)
            mask[order[:k].long()] = False
            want = lookahead_distortion(graph, weights, n, w * mask.reshape(w.shape))
            assert cache.distortion(n, None, n_removed=k, order=order) == pytest.approx(want, rel=1e-5)
            assert layer.paths[path] == before[path] + 1, (n, k, path)
            assert changed == ([size] if size else []), (n, k)


def test_a_first_visit_stopped_keeps_the_layers_factors(monkeypatch):
    import threading

    from prune_lab.core import lookahead
    from prune_lab.core.lookahead import Interrupted

    graph, weights = _chain(256, 512, 256, 10)
    calls = []
    factors = lookahead.layer_factors
    monkeypatch.setattr(lookahead, "layer_factors", lambda *a, **k: calls.append(a[2]) or factors(*a, **k))
    cache = LookaheadCache(graph, weights)
    n, mask = "2.weight", torch.rand(weights["2.weight"].shape) > 0.5
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):  # stopped while making Y_W, the layer's first dense product
        cache.distortion(n, mask, stop=stop)
    assert n not in cache.layers
    stop.clear()
    want = lookahead_distortion(graph, weights, n, weights[n] * mask)
    assert cache.distortion(n, mask, stop=stop) == pytest.approx(want, rel=1e-5)
    assert calls == [n]  # the Gram factors were made once
