import math

import numpy as np
import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.core.distortion import lookahead_distortion
from prune_lab.core.scores import lap_scores
from tests.conftest import SmallConvNet, randomize_bn


@pytest.fixture(scope="module")
def digits():
    return pl.data.digits()


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = pl.models.create("mlpnet", in_features=64, seed=0)
    return pl.train(model, digits, epochs=15, progress=False).eval()


def test_lookahead_equals_three_layer_product_on_a_chain():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    s = pl.PruneSession(m)
    res = s.prune("magnitude", 0.6)
    df = s.distortion(res).set_index("layer")
    W1, W2, W3 = (m[i].weight.detach() for i in (0, 2, 4))
    M1, M2, M3 = (res.masks[f"{i}.weight"] for i in (0, 2, 4))
    assert df.loc["2.weight", "lookahead"] == pytest.approx((W3 @ (W2 - W2 * M2) @ W1).norm().item(), rel=1e-5)
    assert df.loc["0.weight", "lookahead"] == pytest.approx((W2 @ (W1 - W1 * M1)).norm().item(), rel=1e-5)
    assert df.loc["4.weight", "lookahead"] == pytest.approx(((W3 - W3 * M3) @ W2).norm().item(), rel=1e-5)
    assert df.loc["2.weight", "frobenius"] == pytest.approx((W2 - W2 * M2).norm().item(), rel=1e-5)
    assert df.loc["2.weight", "relative_frobenius"] == pytest.approx(
        ((W2 - W2 * M2).norm() / W2.norm()).item(), rel=1e-5)
    model_row = df.loc["(model)"]
    assert model_row["n_weights"] == 30 + 42 + 21
    assert model_row["frobenius"] == pytest.approx(math.sqrt((df["frobenius"].iloc[:3] ** 2).sum()))


def test_lookahead_of_one_removed_weight_is_its_lap_score_conv_bn_flatten():
    torch.manual_seed(0)
    m = randomize_bn(SmallConvNet().eval())
    s = pl.PruneSession(m)
    state = s.snapshot.current()
    scores = lap_scores(state.weights, s.graph, state.scales)
    for name, idx in [("c2.weight", (3, 1, 0, 2)), ("fc1.weight", (4, 50)), ("c1.weight", (2, 0, 1, 1))]:
        w = state.weights[name].clone()
        w[idx] = 0
        d = lookahead_distortion(s.graph, state.weights, name, w, state.scales)
        assert d == pytest.approx(scores[name][idx].item(), rel=1e-5)


def test_output_distortion_and_loss_change(trained, digits):
    s = pl.PruneSession(trained, digits)
    dense = s.prune("magnitude", 0.0)
    row = s.distortion(dense).iloc[-1]
    assert row["layer"] == "(model)" and row["output_distortion"] == 0.0 and row["loss_change"] == 0.0
    res = s.prune("lamp", 0.8)
    row = s.distortion(res).iloc[-1]
    x, y = pl.data.calibration_batch(digits, n=256)
    masked = {n: p.detach() * res.masks[n] for n, p in trained.named_parameters() if n in res.masks}
    with torch.no_grad():
        f, g = trained(x), torch.func.functional_call(trained, masked, (x,))
    expected = ((f - g).norm(dim=1) / f.norm(dim=1)).mean().item()
    assert row["output_distortion"] == pytest.approx(expected, rel=1e-5)
    assert row["loss_change"] == pytest.approx((nn.functional.cross_entropy(g, y) -
                                                nn.functional.cross_entropy(f, y)).item(), rel=1e-5)


def test_magnitude_minimises_single_layer_distortion_at_a_fixed_count():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))
    s = pl.PruneSession(m)
    res = s.prune("magnitude", 0.7)
    w = m[0].weight.detach()
    k = res.pruned[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = torch.ones(w.numel(), dtype=torch.bool)
        mask[torch.randperm(w.numel(), generator=g)[:k]] = False
        assert res.frobenius["0.weight"] <= (w.reshape(-1) * ~mask).norm().item() + 1e-6


def test_lap_lookahead_vs_magnitude_on_a_trained_mlp(trained):
    """LAP minimises the sum of the single-weight lookahead terms, so that sum is never above magnitude's. The full
    lookahead distortion adds cross terms: on this MLP LAP is lower at moderate sparsity (0.3), while at 0.9 the
    cross terms can reverse it (measured and reported, not forced)."""
    s = pl.PruneSession(trained)
    scores = s.scores("lap")
    for sp in (0.3, 0.6, 0.9):
        lap, mp = s.prune("lap", sp), s.prune("magnitude", sp)
        for n in lap.layers:
            diag = lambda r: float(scores[n][~r.masks[n]].pow(2).sum())
            assert diag(lap) <= diag(mp) + 1e-9
    lap = s.distortion(s.prune("lap", 0.3)).set_index("layer")
    mp = s.distortion(s.prune("magnitude", 0.3)).set_index("layer")
    assert (lap["lookahead"] <= mp["lookahead"]).all(), (lap["lookahead"], mp["lookahead"])


def test_distortion_curve_equals_point_by_point(trained, monkeypatch):
    s = pl.PruneSession(trained)
    grid = np.linspace(0, 0.99, 12)
    curve = s.distortion_curve("lamp", grid)
    assert len(curve) == 12 * 3
    for sp in (grid[3], grid[11]):
        res = s.prune("lamp", sp)
        part = curve[curve.sparsity == sp].set_index("layer")
        for n, m in res.masks.items():
            w = dict(trained.named_parameters())[n].detach()
            assert part.loc[n, "frobenius"] == pytest.approx((w * ~m).norm().item(), rel=1e-5, abs=1e-7)


def test_sweep_is_cached_and_sparsity_zero_is_dense(trained, digits, monkeypatch):
    s = pl.PruneSession(trained, digits)
    df = s.sweep(["magnitude", "lamp"], [0.0, 0.5, 0.9], progress=False)
    assert list(df.columns) == ["method", "allocation", "sparsity", "seed", "achieved_sparsity", "accuracy",
                                "loss", "finetuned"]
    dense = pl.evaluate(trained, digits)
    assert (df[df.sparsity == 0.0]["accuracy"] == dense["accuracy"]).all()
    assert set(df.allocation) == {"uniform", "global"}
    import prune_lab.analysis.session as S

    calls = []
    monkeypatch.setattr(S, "evaluate", lambda *a, **k: calls.append(1) or {"accuracy": -1.0, "loss": -1.0})
    again = s.sweep(["magnitude", "lamp"], [0.0, 0.5, 0.9], progress=False)
    assert calls == [] and again.equals(df)
    more = s.sweep(["lamp"], [0.7], progress=False)  # a new point does evaluate
    assert calls == [1] and more["accuracy"].iloc[0] == -1.0


def test_sweep_finetune_rows_and_interrupt(trained, digits, monkeypatch):
    s = pl.PruneSession(trained, digits)
    df = s.sweep("lamp", [0.9], finetune={"epochs": 2}, progress=False)
    assert df["finetuned"].tolist() == [False, True]
    assert df.iloc[1]["accuracy"] > df.iloc[0]["accuracy"]  # fine-tuning recovers accuracy at 90 %
    from prune_lab.analysis import sweeps

    original = sweeps.evaluate_point
    count = []

    def flaky(*a, **k):
        count.append(1)
        if len(count) == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(sweeps, "evaluate_point", flaky)
    with pytest.warns(UserWarning, match="interrupted"):
        part = s.sweep("magnitude", [0.1, 0.2, 0.3, 0.4], progress=False)
    assert len(part) == 2 and part.attrs["interrupted"]


def test_sweep_rejects_bad_points(trained, digits):
    s = pl.PruneSession(trained, digits)
    with pytest.raises(ValueError, match="sparsity must be in"):
        s.sweep("lamp", [0.5, 1.0], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        s.sweep(["lamp", "lamb"], [0.5], progress=False)


def test_concurrent_evaluations_do_not_mix(trained, digits):
    """A dashboard's refresh thread and a running cell use one session at once. Evaluation swaps pruned weights in
    (functional_call); a second thread must never read the swapped weights as the model's own."""
    import threading

    s = pl.PruneSession(trained, digits)
    dense = pl.evaluate(trained, digits)
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):  # keeps thread A inside its forward pass, pruned weights swapped in
        if threading.current_thread().name == "A" and not inside.is_set():
            inside.set()
            release.wait(timeout=5)

    handle = trained.fc1.register_forward_pre_hook(hold)
    try:
        a = threading.Thread(target=lambda: s.output_distortion(s.prune("magnitude", 0.9)), name="A")
        a.start()
        assert inside.wait(timeout=30)
        got = {}
        b = threading.Thread(target=lambda: got.update(s.evaluate(s.prune("lap", 0.0))), name="B")
        b.start()
        b.join(timeout=1.0)  # B must wait for A: it may not evaluate while A's weights are swapped in
        assert b.is_alive()
        release.set()
        a.join()
        b.join()
    finally:
        release.set()
        handle.remove()
    assert got == dense


def test_bn_recalibration_in_evaluate_and_the_lab():
    from tests.conftest import SmallConvNet

    data = pl.data.synthetic(n_train=256, n_test=128, input_shape=(1, 8, 8), num_classes=3, seed=0)
    model = pl.train(SmallConvNet(), data, epochs=3, progress=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = pl.PruneSession(model, data)
    res = s.prune("global_magnitude", 0.8)
    plain = s.evaluate(res)
    recal = s.evaluate(res, recalibrate_bn=True)
    expected = pl.evaluate(pl.recalibrate_bn(model, data, masks=res.masks), data, masks=res.masks)
    assert recal == expected and recal != plain
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert s.cached_evaluation(res, recalibrate_bn=True) == recal
    df = s.sweep("global_magnitude", [0.8], recalibrate_bn=True, progress=False)
    assert df["accuracy"].iloc[0] == recal["accuracy"]
    from prune_lab.widgets import PruneLab

    lab = PruneLab(s, debounce_s=0, selected=("global_magnitude",), sparsity=0.8)
    assert lab.summary["accuracy % (BN recalibrated)"].iloc[0] == round(100 * recal["accuracy"], 2)


def test_lookahead_distortion_says_once_which_layers_have_unseen_neighbours():
    class Cat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    session = pl.PruneSession(Cat())
    res = session.prune("magnitude", 0.5)
    with pytest.warns(UserWarning, match="the lookahead distortion: .*identity") as seen:
        session.distortion(res)
    assert sum("lookahead distortion" in str(w.message) for w in seen) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per graph: not again
        session.distortion(res)
