"""Layer sensitivity: each layer pruned alone over a grid, checked against its definition; caching, resuming,
callbacks, the implied allocation and the comparison table."""
import copy
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.analysis.sensitivity import sensitivity_allocation, sensitivity_table
from prune_lab.core.allocation import equalise_counts


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    data = pl.data.synthetic(n_train=96, n_test=64, input_shape=(1, 4, 4), num_classes=3, seed=1)
    model = net()
    pl.train(model, data, epochs=3, progress=False, seed=0)
    return model, data


def magnitude_mask(w, s):
    k = int(np.floor(s * w.numel() + 0.5))
    order = torch.sort(w.abs().reshape(-1), stable=True).indices
    m = torch.ones(w.numel(), dtype=torch.bool)
    m[order[:k]] = False
    return m.reshape(w.shape)


def test_each_point_is_the_layer_pruned_alone_and_evaluated(setup):
    model, data = setup
    session = pl.PruneSession(model, data)
    grid = [0.3, 0.8]
    df = session.sensitivity("magnitude", grid, metric="accuracy", progress=False)
    params = dict(model.named_parameters())
    assert df["layer"].tolist() == [n for n in session.layer_names for _ in grid]  # data-flow order
    dense = pl.evaluate(model, data)
    for _, r in df.iterrows():
        w = params[r.layer].detach()
        expect = pl.evaluate(model, data, masks={r.layer: magnitude_mask(w, r.sparsity)})
        assert r.accuracy == pytest.approx(expect["accuracy"]) and r.loss == pytest.approx(expect["loss"])
        assert r.value == r.accuracy and r.metric == "accuracy"
        assert r.increase == pytest.approx(dense["accuracy"] - r.accuracy)  # harm: the accuracy drop
        assert r.loss_increase == pytest.approx(r.loss - dense["loss"])
        assert r.pruned == int(np.floor(r.sparsity * w.numel() + 0.5)) and r.n_weights == w.numel()
        assert r.layer_sparsity == pytest.approx(r.pruned / r.n_weights)
    assert df.attrs["dense"] == pytest.approx(dense)
    assert not df.attrs["interrupted"] and df.attrs["computed"] == len(df) == 6


def test_ranking_and_prune_paths_agree(setup):
    model, data = setup
    session = pl.PruneSession(model, data)
    a = session.sensitivity("lamp", [0.5, 0.9], via="ranking", progress=False, install=False)
    b = pl.PruneSession(model, data).sensitivity("lamp", [0.5, 0.9], via="prune", progress=False)
    assert a["value"].tolist() == pytest.approx(b["value"].tolist())
    assert a["pruned"].tolist() == b["pruned"].tolist()


def test_loss_metric_and_perplexity_refused_on_class_data(setup):
    model, data = setup
    session = pl.PruneSession(model, data)
    df = session.sensitivity(grid=[0.5], progress=False)  # default metric: the loss
    assert (df["metric"] == "loss").all() and df["increase"].tolist() == pytest.approx(df["loss_increase"].tolist())
    with pytest.raises(ValueError, match="'perplexity' is not measured.*token data"):
        session.sensitivity(grid=[0.5], metric="perplexity", progress=False)
    with pytest.raises(ValueError, match="Valid choices.*'output_distortion'"):
        session.sensitivity(grid=[0.5], metric="acc", progress=False)
    with pytest.raises(ValueError, match="layers: 'nope' is not a prunable layer"):
        session.sensitivity(grid=[0.5], layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="grid"):
        session.sensitivity(grid=[1.0], progress=False)


def test_data_free_output_distortion_on_a_batch_and_clear_errors(setup):
    model, _ = setup
    session = pl.PruneSession(model)
    with pytest.raises(ValueError, match="needs data.*batch=<a tensor of inputs>.*output_distortion"):
        session.sensitivity(grid=[0.5], progress=False)
    with pytest.raises(ValueError, match="metric='loss' needs data with labels.*batch="):
        session.sensitivity(grid=[0.5], metric="loss", progress=False)
    with pytest.raises(ValueError, match="output_distortion' needs a batch of inputs: pass batch="):
        session.sensitivity(grid=[0.5], metric="output_distortion", progress=False)
    x = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    df = session.sensitivity(grid=[0.5, 0.9], batch=x, progress=False)
    assert (df["metric"] == "output_distortion").all() and (df["dense"] == 0).all()
    params = dict(model.named_parameters())
    dense = model(x).detach()
    for _, r in df.iterrows():
        w = params[r.layer].detach()
        out = torch.func.functional_call(model, {r.layer: w * magnitude_mask(w, r.sparsity)}, (x,)).detach()
        expect = float(((dense - out).flatten(1).norm(dim=1) / dense.flatten(1).norm(dim=1)).mean())
        assert r.value == pytest.approx(expect, rel=1e-5) and r.increase == r.value
    # the distortion grows with the sparsity of a layer (magnitude order, the rest dense)
    for _, g in df.groupby("layer"):
        assert g.sort_values("sparsity")["value"].is_monotonic_increasing


def test_cached_by_content_in_the_session_and_in_a_store(setup, tmp_path):
    model, data = setup
    session = pl.PruneSession(model, data)
    first = session.sensitivity(grid=[0.4, 0.7], progress=False, cache_dir=tmp_path)
    again = session.sensitivity(grid=[0.4, 0.7], progress=False)
    assert again.attrs["computed"] == 0 and again.attrs["cached"] == len(first)
    pd.testing.assert_frame_equal(first, again)
    other = pl.PruneSession(copy.deepcopy(model), data)  # the same weights in a new session: found in the store
    from_store = other.sensitivity(grid=[0.4, 0.7], progress=False, cache_dir=tmp_path)
    assert from_store.attrs["computed"] == 0
    pd.testing.assert_frame_equal(first, from_store)
    # other weights: nothing reused
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[1].weight.mul_(0.5)
    assert pl.PruneSession(changed, data).sensitivity(grid=[0.4, 0.7], progress=False,
                                                      cache_dir=tmp_path).attrs["computed"] == len(first)


def test_callback_stop_and_resume(setup):
    model, data = setup
    session = pl.PruneSession(model, data)
    stop = threading.Event()
    seen = []

    def callback(row, done, total):
        seen.append((row["layer"], row["sparsity"], done, total))
        if done == 4:
            stop.set()

    part = session.sensitivity(grid=[0.2, 0.5, 0.8], progress=False, callback=callback, stop=stop)
    assert part.attrs["interrupted"] and len(part) == 4 and [s[2] for s in seen] == [1, 2, 3, 4]
    assert seen[0][3] == 9 and not part.attrs["installed"]
    assert session.sensitivity_table is None  # a partial table is not used by the allocation
    fig = pl.viz.plot_sensitivity(part)  # a partial run plots
    assert len(fig.plot_data) == 4
    rest = session.sensitivity(grid=[0.2, 0.5, 0.8], progress=False)
    assert rest.attrs["computed"] == 5 and rest.attrs["cached"] == 4 and not rest.attrs["interrupted"]
    assert rest.attrs["installed"] and session.sensitivity_table is not None


def test_iter_sensitivity_yields_rows_as_they_finish(setup):
    model, data = setup
    session = pl.PruneSession(model, data)
    rows = list(pl.analysis.iter_sensitivity(session, "magnitude", [0.5]))
    assert [r["layer"] for r, _ in rows] == session.layer_names and all(c for _, c in rows)
    df = pl.analysis.sensitivity_frame([r for r, _ in rows][::-1])  # any order in: data-flow order out
    assert df["layer"].tolist() == session.layer_names


def test_the_allocation_equalises_the_measured_loss_increase(setup):
    model, data = setup
    session = pl.PruneSession(model, data)
    with pytest.raises(ValueError, match="needs a measured sensitivity table"):  # no table yet: no stand-in
        session.prune("magnitude", 0.6, allocation="sensitivity")
    df = session.sensitivity(grid=[0.2, 0.4, 0.6, 0.8, 0.9], progress=False)
    table = session.sensitivity_table
    assert table.metric == "loss" and table.fingerprint == session.fingerprint
    for s in (0.3, 0.6, 0.85):
        res = session.prune("magnitude", s, allocation="sensitivity")
        sizes = np.asarray(res.numel)
        expect = equalise_counts([table.curve(n) for n in res.layers], sizes, int(np.floor(s * sizes.sum() + 0.5)))
        assert list(res.pruned) == expect.tolist()
        assert sum(res.pruned) == int(np.floor(s * sizes.sum() + 0.5))
        alloc = sensitivity_allocation(df, s)
        assert alloc["pruned"].tolist() == expect.tolist()
        # one common level: the last weight pruned in any layer costs no more than the next one of another
        harm = {n: (lambda x, c=table.curve(n): float(np.interp(x, *c))) for n in res.layers}
        scale = max(table.curve(n)[1][-1] for n in res.layers)
        for i, a in enumerate(res.layers):
            for j, b in enumerate(res.layers):
                if i != j and expect[i] > 0 and expect[j] < 0.9 * sizes[j]:
                    assert harm[a](expect[i] / sizes[i]) <= harm[b]((expect[j] + 1) / sizes[j]) + 1e-5 * scale
    measured = session.prune("magnitude", 0.6, allocation="sensitivity")
    assert measured.pruned != session.prune("magnitude", 0.6, allocation="global").pruned
    session.use_sensitivity(None)
    with pytest.raises(ValueError, match="needs a measured sensitivity table"):
        session.prune("magnitude", 0.6, allocation="sensitivity")
    session.use_sensitivity(df)
    assert session.prune("magnitude", 0.6, allocation="sensitivity").pruned == measured.pruned
    with pytest.raises(TypeError, match="DataFrame, a SensitivityTable or None"):
        session.use_sensitivity({"a": 1})
    with pytest.raises(ValueError, match="sweep points are not keyed by the session's sensitivity table"):
        session.sweep("magnitude", [0.5], allocations=["sensitivity"], progress=False)
    # a new session on the same weights takes the table too
    engine = pl.PruneSession(model)
    engine.use_sensitivity(sensitivity_table(df))
    assert engine.prune("magnitude", 0.6, allocation="sensitivity").pruned == measured.pruned
    with torch.no_grad():
        changed = copy.deepcopy(model)
        next(changed.parameters()).mul_(2.0)
    other = pl.PruneSession(changed)
    other.use_sensitivity(sensitivity_table(df))
    assert other.sensitivity_table is None  # measured on other weights: not used


def test_sensitivity_table_refuses_foreign_frames_and_columns(setup):
    with pytest.raises(TypeError, match="session.sensitivity"):
        sensitivity_table(pd.DataFrame({"a": [1]}))
    model, data = setup
    df = pl.PruneSession(model, data).sensitivity(grid=[0.5], progress=False)
    with pytest.raises(ValueError, match="column 'nope'.*'increase'"):
        sensitivity_table(df, column="nope")


def test_compare_allocations_table(setup):
    model, data = setup
    session = pl.PruneSession(model, data)
    session.sensitivity(grid=[0.3, 0.6, 0.9], progress=False)
    cmp = session.compare_allocations([0.5, 0.8])
    assert cmp["allocation"].tolist() == ["sensitivity", "uniform", "global", "lamp", "uniform_plus", "erk"] * 2
    ok = cmp[cmp["error"] == ""]
    assert (abs(ok["achieved_sparsity"] - ok["sparsity"]) < 0.01).all()
    for _, r in ok.iterrows():
        res = session.prune("magnitude", r.sparsity, allocation=r.allocation)
        assert session.evaluate(res)["accuracy"] == r.accuracy
    with pytest.raises(ValueError, match="Did you mean 'lamp'"):
        session.compare_allocations(0.5, allocations=["lamb"])


@pytest.mark.slow
def test_local_process_pool_backend_gives_the_same_rows(setup, tmp_path):
    model, data = setup
    local = pl.PruneSession(model, data).sensitivity(grid=[0.5, 0.9], progress=False)
    pooled = pl.PruneSession(model, data).sensitivity(grid=[0.5, 0.9], progress=False, backend="local", workers=2,
                                                      cache_dir=tmp_path)
    assert pooled.attrs["computed"] == len(local)
    pd.testing.assert_frame_equal(local, pooled)


def test_ray_backend_gives_the_same_rows(setup, tmp_path, ray_cluster):
    model, data = setup
    local = pl.PruneSession(model, data).sensitivity(grid=[0.5, 0.9], progress=False)
    remote = pl.PruneSession(model, data).sensitivity(grid=[0.5, 0.9], progress=False, backend="ray",
                                                      cache_dir=tmp_path)
    assert remote.attrs["computed"] == len(local)
    pd.testing.assert_frame_equal(local, remote)
    again = pl.PruneSession(model, data).sensitivity(grid=[0.5, 0.9], progress=False, backend="ray",
                                                     cache_dir=tmp_path)
    assert again.attrs["computed"] == 0  # from the store
