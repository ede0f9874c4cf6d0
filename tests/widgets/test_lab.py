import json
import time

import numpy as np
import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.widgets import PruneLab


@pytest.fixture(scope="module")
def session():
    data = pl.data.digits()
    model = pl.train(pl.models.create("mlpnet", in_features=64, seed=0), data, epochs=10, progress=False).eval()
    return pl.PruneSession(model, data)


def layer_widths(lab, method, column="sparsity"):
    paths = lab.figures["layers"].layer_geometry["collections"][(column, method)].get_paths()
    return [float(p.vertices[:, 0].max()) for p in paths]


def test_slider_moves_redraw_the_panels(session):
    lab = PruneLab(session, debounce_s=0)
    assert lab.state.methods == ("magnitude", "lamp", "lap") and lab.state.error == ""
    png = lab.images["layers"].value
    lab.slider.value = 0.5
    assert lab.state.sparsity == 0.5
    assert layer_widths(lab, "magnitude") == pytest.approx([0.5, 0.5, 0.5], abs=0.01)
    assert lab.images["layers"].value != png
    assert "sparsity=0.500" in lab.state.status and "3 methods" in lab.state.status
    assert "sparsity=0.500" in lab.panel_state["layers"].value and "sparsity=0.500" in lab.panel_state["accuracy"].value
    assert lab.summary["remaining %"].tolist() == [50.0, 50.0, 50.0]
    assert lab.summary["accuracy %"].notna().all()
    assert lab.summary["remaining weights"].dtype.kind == "i"  # numbers, not text
    look = lab.figures["layers"].plot_data["relative_lookahead"]
    assert look.notna().all()  # the slider rested (debounce_s=0): lookahead at this sparsity
    assert "lookahead: at this sparsity" in lab.figures["layers"].layer_geometry["heading"].get_text()


def test_methods_and_allocation_follow_the_controls(session):
    lab = PruneLab(session, debounce_s=0)
    lab.method_boxes["lap"].value = False
    lab.method_boxes["global_magnitude"].value = True
    assert lab.state.methods == ("magnitude", "global_magnitude", "lamp")  # registry order
    assert set(lab.figures["layers"].plot_data.method) == {"global_magnitude", "magnitude", "lamp"}
    assert len(lab.legend.children) == 1 + 3
    lab.allocation.value = "erk"
    assert set(lab.summary["allocation"]) == {"erk"}
    assert lab.state.error == ""


def test_unreachable_sparsity_is_one_message_and_keeps_the_last_state(session):
    lab = PruneLab(session, debounce_s=0)
    lab.allocation.value = "uniform_plus"
    lab.slider.value = 0.5
    lab.slider.value = 0.99  # the last layer must keep 20 %: unreachable on this MLP
    assert "cannot reach" in lab.state.error and lab.state.error.count("uniform_plus") == 1
    assert "Magnitude (MP), LAMP, LAP" in lab.state.error  # one message naming every method it hit
    assert "prune-lab-error" in lab.error.value
    assert "last reachable state (0.500)" in lab.state.status
    assert "last reachable state, sparsity 0.500" in lab.panel_state["layers"].value
    assert layer_widths(lab, "magnitude")[0] == pytest.approx(0.5, abs=0.01)
    lab.slider.value = 0.6
    assert lab.state.error == "" and lab.error.value == "" and "last reachable" not in lab.state.status


def test_float_noise_in_the_slider_value_finds_the_cached_point(session, tmp_path):
    lab = PruneLab(session, debounce_s=0, selected=("lamp",))
    lab.slider.value = 0.9000000000000001  # what a browser sends for 0.9
    assert lab.query("lamp", 0.9000000000000001) == lab.query("lamp", 0.9)
    assert lab.summary["accuracy %"].notna().all()
    lab.export(tmp_path)
    import pandas as pd

    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["accuracy %"].notna().all() and summary["accuracy %"].dtype.kind == "f"


def count_evaluations(session, monkeypatch) -> list:
    """A list that grows by one at every ``session.evaluate`` call (restored after the test)."""
    calls, original = [], session.evaluate
    monkeypatch.setattr(session, "evaluate", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_accuracy_waits_for_the_slider_to_rest(session, monkeypatch):
    lab = PruneLab(session, debounce_s=60)  # a long rest: moving evaluates nothing new
    try:
        assert lab.wait_drawn(30)
        calls = count_evaluations(session, monkeypatch)
        for v in (0.61, 0.62, 0.63):
            lab.slider.value = v
            assert lab.wait_drawn(30)
        assert calls == [] and "sparsity=0.630" in lab.state.status
        lab.refresh_accuracy()  # the slider rests
        assert len(calls) > 0
        assert 0.63 in set(lab.figures["accuracy"].plot_data.sparsity)
    finally:
        lab.close()


def test_the_lookahead_is_drawn_before_the_slider_rests(session, monkeypatch):
    """The lookahead needs no rest: it starts right after the frame (a newer move stops it), while accuracy and
    expensive methods still wait for the slider to rest."""
    lab = PruneLab(session, debounce_s=60, selected=("magnitude", "lamp", "lap_forward"))
    try:
        assert lab.wait_drawn(30)
        calls = count_evaluations(session, monkeypatch)
        lab.slider.value = 0.64
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline and not lab.figures["layers"].plot_data.query(
                "method != 'lap_forward'")["relative_lookahead"].notna().all():
            time.sleep(0.01)
        table = lab.figures["layers"].plot_data
        assert set(table.method) == {"magnitude", "lamp"}  # lap_forward waits for the rest
        assert table["relative_lookahead"].notna().all() and (table["relative_lookahead"] > 0).all()
        heading = lab.figures["layers"].layer_geometry["heading"].get_text()
        assert heading == "sparsity 0.640 · lookahead: at this sparsity"
        assert calls == [] and lab.pending == ["lap_forward"]  # accuracy and lap_forward still wait
        assert not any(f[3] == "rest" and f[2] == pytest.approx(0.64) for f in lab.frames)
    finally:
        lab.close()


def test_no_busy_sign_while_the_rest_waits_and_a_new_width_is_only_a_frame(session):
    lab = PruneLab(session, debounce_s=60, width=960, selected=("magnitude", "lamp"))
    try:
        assert lab.wait_drawn(30)
        lab.slider.value = 0.66
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline and "lookahead: at this sparsity" not in \
                lab.figures["layers"].layer_geometry["heading"].get_text():
            time.sleep(0.01)
        time.sleep(0.05)
        assert not lab.state.busy  # the lookahead is done; nothing runs while the slider has not rested
        lab.refresh_accuracy()
        before = list(lab.frames)
        lab.pointer("layers", {"type": "mousemove", "dataX": 10, "dataY": 10, "boundingRectWidth": 700})
        assert lab.wait_idle(60)
        new = [f[3] for f in lab.frames[len(before):]]
        assert new == ["frame"]  # laid out again at the new width; the rest phase is not run again
        assert 690 <= lab.figures["layers"].get_size_inches()[0] * 96 <= 700
    finally:
        lab.close()


def test_a_drag_draws_the_newest_value_and_replays_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 10))
    lab = PruneLab(pl.PruneSession(model), debounce_s=0.3, selected=("magnitude", "lamp"))
    try:
        assert lab.wait_idle(60)
        start = len(lab.frames)
        values = np.round(np.linspace(0.30, 0.70, 60), 3)
        for v in values:  # faster than frames are drawn: the worker coalesces
            lab.slider.value = float(v)
        assert lab.wait_idle(60)
        frames = lab.frames[start:]
        drawn = [f[2] for f in frames if f[3] == "frame"]
        assert drawn[-1] == pytest.approx(0.70)
        assert len(drawn) < len(values)  # stale positions were skipped, not replayed
        rests = [f for f in frames if f[3] == "rest"]
        assert [f[2] for f in rests] == [pytest.approx(0.70)]  # one rest phase, at the final value
        assert "sparsity=0.700" in lab.state.status and "sparsity=0.700" in lab.panel_state["layers"].value
        assert lab.figures["layers"].plot_data["relative_lookahead"].notna().all()
    finally:
        lab.close()


def test_overrides_keep_the_accuracy_curve(session):
    lab = PruneLab(session, debounce_s=0, selected=("lamp",), sparsity=0.8)
    lab.set_override("fc3.weight", "lock", 0.5)  # 0 and 0.98 become unreachable, the rest of the grid is not
    curve = lab.figures["accuracy"].plot_data
    assert set(curve.sparsity) >= {0.3, 0.5, 0.7, 0.8, 0.9, 0.95} and curve["accuracy"].notna().all()
    assert lab.summary["accuracy %"].notna().all()


def test_layer_overrides_from_the_dashboard(session):
    lab = PruneLab(session, debounce_s=0, selected=("lamp",), sparsity=0.8)
    lab.set_override("fc3.weight", "exclude")
    lab.set_override("fc1.weight", "lock", 0.95)
    assert lab.state.error == ""
    res = lab.results["lamp"]
    assert res.layer_sparsity["fc3.weight"] == 0.0 and res.layer_sparsity["fc1.weight"] == pytest.approx(0.95, 1e-3)
    assert res.sparsity == pytest.approx(0.8, abs=1e-3)  # the budget moves to the free layer
    assert "excluded" in lab.override_list.value and "locked at 0.95" in lab.override_list.value
    assert lab.settings()["overrides"] == {"fc3.weight": 0.0, "fc1.weight": 0.95}
    lab.set_override("fc1.weight", "exclude")  # leaves too little to prune: said in words, once
    assert "cannot be met" in lab.state.error and "last reachable state" in lab.state.status
    lab.set_override("fc1.weight", "free")
    lab.set_override("fc3.weight", "free")
    assert lab.state.overrides == {} and lab.state.error == ""
    assert lab.results["lamp"].layer_sparsity["fc3.weight"] > 0
    with pytest.raises(ValueError, match="unknown layer"):
        lab.set_override("fc9.weight", "lock", 0.5)


def test_hover_and_click_on_a_layer(session):
    lab = PruneLab(session, debounce_s=0)
    fig = lab.figures["layers"]
    ax = fig.axes[1]
    h = fig.layer_geometry["bar_height"]
    x, y = ax.transData.transform((0.01, 1 + h))  # layer fc2, third method (LAP)
    event = {"type": "mousemove", "dataX": x, "dataY": fig.bbox.height - y}
    lab.pointer("layers", event)
    assert "fc2.weight" in lab.hover.value and "800 weights" in lab.hover.value and "LAP" in lab.hover.value
    assert "single-layer distortion" in lab.hover.value and "sparsity 0.9" in lab.hover.value
    lab.pointer("layers", {**event, "type": "click"})
    assert lab.override_layer.value == "fc2.weight" and lab.state.selected_layer == "fc2.weight"
    assert all(band.get_visible() for band in fig.layer_geometry["selection"])
    lab.pointer("layers", {"type": "mouseleave"})
    assert lab.hover.value == ""
    acc = lab.figures["accuracy"]
    row = acc.plot_data[(acc.plot_data.method == "lamp") & (acc.plot_data.sparsity == 0.9)].iloc[0]
    px, py = acc.axes[0].transData.transform((row.sparsity, 100 * row.accuracy))
    lab.pointer("accuracy", {"type": "mousemove", "dataX": px, "dataY": acc.bbox.height - py})
    assert "LAMP" in lab.hover.value and f"{100 * row.accuracy:.2f} %" in lab.hover.value


def test_legend_toggle_hides_a_method_everywhere(session):
    lab = PruneLab(session, debounce_s=0)
    lab.toggle_method("lamp", False)
    g = lab.figures["layers"].layer_geometry
    assert not g["collections"][("sparsity", "lamp")].get_visible()
    assert g["collections"][("sparsity", "magnitude")].get_visible()
    assert "LAMP" not in [line.get_label() for line in lab.figures["accuracy"].axes[0].get_lines()]
    assert lab.legend_buttons["lamp"].style.button_color == "#bdbdbd"  # greyed while hidden
    lab.legend_buttons["lamp"].click()  # the LAMP button, clicked again
    assert lab.state.hidden == ()
    assert g["collections"][("sparsity", "lamp")].get_visible()


def test_panel_width_follows_a_narrower_notebook(session):
    lab = PruneLab(session, debounce_s=0, width=960)
    lab.pointer("layers", {"type": "mousemove", "dataX": 10, "dataY": 10, "boundingRectWidth": 700})
    assert 690 <= lab.figures["layers"].get_size_inches()[0] * 96 <= 700
    assert "sparsity=0.900" in lab.panel_state["layers"].value  # redrawn at once, same state


def test_expensive_methods_wait_and_fill_their_curves_in_the_background(session):
    lab = PruneLab(session, debounce_s=60, selected=("magnitude", "lap_forward"))
    try:
        assert lab.wait_drawn(30)
        lab.slider.value = 0.77  # while dragging: lap_forward (sparsity-dependent) is not computed
        assert lab.wait_drawn(30)
        assert "lap_forward" in lab.pending and set(lab.results) == {"magnitude"}
        assert "computing lap_forward" in lab.state.status
        lab.refresh_accuracy()  # the slider rests
        assert lab.pending == [] and set(lab.results) == {"magnitude", "lap_forward"}
        assert "computing" not in lab.state.status
        curve = lab.figures["accuracy"].plot_data
        assert set(curve[curve.method == "lap_forward"].sparsity) >= set(lab.grid)  # a curve, not one dot
        assert lab.progress.value == lab.progress.max and lab.progress.layout.visibility == "hidden"
        lab.slider.value = 0.5
        assert lab.wait_drawn(30)  # a grid point filled in the background: drawn at once
        assert "lap_forward" in lab.results
    finally:
        lab.close()


def test_disabled_methods_say_why():
    from prune_lab.methods import registry

    spec = registry.MethodSpec("_needs_data_demo", "Demo", "", lambda ctx, hp: {}, "global",
                               needs=frozenset({"data"}))
    registry._METHODS[spec.name] = spec
    try:
        lab = PruneLab(pl.PruneSession(torch.nn.Sequential(torch.nn.Linear(4, 3))), debounce_s=0)
        box = lab.method_boxes["_needs_data_demo"]
        assert box.disabled and "needs data" in box.tooltip
        assert "_needs_data_demo" not in lab.state.methods
        assert lab.method_boxes["synflow"].disabled and "input shape" in lab.method_boxes["synflow"].tooltip
        assert lab.method_boxes["snip"].disabled and "needs data" in lab.method_boxes["snip"].tooltip
        assert lab.evaluate_box.disabled
    finally:
        del registry._METHODS[spec.name]
    lab = PruneLab(pl.PruneSession(torch.nn.Sequential(torch.nn.Linear(4, 3))), debounce_s=0, input_shape=(4,))
    assert not lab.method_boxes["synflow"].disabled


def test_without_data_the_accuracy_panel_says_so_and_is_not_exported(tmp_path):
    lab = PruneLab(pl.PruneSession(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))), debounce_s=0)
    assert "no evaluation data" in lab.no_data.value
    assert lab.images["accuracy"] not in _descendants(lab.widget) and lab.no_data in _descendants(lab.widget)
    names = {p.name for p in lab.export(tmp_path)}
    assert "layers.png" in names and not any(n.startswith("accuracy") for n in names)


def _descendants(w):
    out = [w]
    for c in getattr(w, "children", ()):
        out += _descendants(c)
    return out


def test_export_writes_every_panel_into_a_new_folder(session, tmp_path):
    lab = PruneLab(session, debounce_s=0)
    lab.slider.value = 0.8
    written = lab.export(tmp_path / "figs")
    folder = tmp_path / "figs"
    names = {p.name for p in written}
    for panel in ("layers", "accuracy"):
        assert {f"{panel}.png", f"{panel}.pdf", f"{panel}.svg", f"{panel}.csv"} <= names
        assert (folder / f"{panel}.png").read_bytes()[:4] == b"\x89PNG"
        assert (folder / f"{panel}.pdf").read_bytes()[:5] == b"%PDF-"
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["sparsity"] == 0.8 and settings["methods"] == ["magnitude", "lamp", "lap"]
    assert settings["model_fingerprint"] == session.fingerprint and settings["prune_lab_version"]
    assert "output distortion" in (folder / "summary.csv").read_text()
    assert str(folder.resolve()) in lab.state.status
    again = lab.export(tmp_path / "figs")  # never overwrites: a new sub-folder
    assert again[0].parent == folder / "export-001" and (folder / "layers.png").exists()
    exported = lab.export(tmp_path / "figs", overwrite=True)
    assert exported[0].parent == folder.resolve()
    accuracy = [ln.get_label() for ln in _accuracy_export_lines(folder)]
    assert not any(label.startswith("current") for label in accuracy)


def _accuracy_export_lines(folder):
    # the exported accuracy data has no current-sparsity column; check the figure the lab exports
    import pandas as pd

    data = pd.read_csv(folder / "accuracy.csv")
    from prune_lab.viz import plot_accuracy_curve

    return plot_accuracy_curve(data).axes[0].get_lines()


def test_model_untouched_by_the_lab(session):
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    lab = PruneLab(session, debounce_s=0)
    for v in (0.3, 0.95):
        lab.slider.value = v
    lab.export_path.value = "unused"
    assert all(torch.equal(before[k], v) for k, v in session.model.state_dict().items())


def test_live_render_matches_a_full_draw(session):
    """The blitted live frame shows the same picture as drawing the figure in full."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    lab = PruneLab(session, debounce_s=0, selected=("magnitude", "lamp"))
    lab.slider.value = 0.42
    blit = np.asarray(Image.open(io.BytesIO(lab.images["layers"].value)).convert("RGB")).astype(int)
    fig = lab.figures["layers"]
    for c in fig.layer_geometry["collections"].values():
        c.set_animated(False)
    fig.layer_geometry["heading"].set_animated(False)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    full = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    assert blit.shape == full.shape
    assert (np.abs(blit - full).max(axis=2) > 30).mean() < 0.01


def test_log_scaled_remaining_weights_slider(session):
    lab = PruneLab(session, debounce_s=0, selected=("lamp",))
    lab.log_toggle.value = True
    assert lab.remaining_slider.layout.display is None and lab.slider.layout.display == "none"
    lab.remaining_slider.value = 0.5  # 0.5 % of the weights remain
    assert lab.state.sparsity == pytest.approx(0.995)
    assert lab.results["lamp"].sparsity == pytest.approx(0.995, abs=1e-3)
    assert lab.figures["accuracy"].axes[0].get_xscale() == "log"
    lab.slider.value = 0.9
    assert lab.remaining_slider.value == pytest.approx(10.0)


def test_hyperparameter_controls_come_from_the_registry(session):
    lab = PruneLab(session, debounce_s=0, selected=("magnitude",))
    assert lab.hp_box.children == ()
    hp_methods = [m for m in pl.list_methods() if pl.get_method(m).hyperparameter_fields()]
    if hp_methods:
        lab.method_boxes[hp_methods[0]].value = True
        assert len(lab.hp_box.children) == len(pl.get_method(hp_methods[0]).hyperparameter_fields())


def test_a_200_layer_model_is_readable():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(200)])
    lab = PruneLab(pl.PruneSession(model), debounce_s=0, selected=("magnitude", "lamp"))
    fig = lab.figures["layers"]
    assert len(fig.layer_geometry["layers"]) == 200
    assert fig.axes[0].bbox.height / 200 >= 16
    assert min(t.get_fontsize() for t in fig.axes[0].get_yticklabels()) >= 8
    assert lab.layer_box.layout.overflow == "hidden auto"  # the panel scrolls


def test_emptied_layers_are_said_in_the_status_not_warned_per_move(recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # global magnitude prunes this layer first
    lab = PruneLab(pl.PruneSession(model), debounce_s=0, selected=("global_magnitude",))
    for v in (0.6, 0.7, 0.75):
        lab.slider.value = v
    assert "Global magnitude empties 1 layer" in lab.state.status
    assert lab.summary["empty layers"].tolist() == [1]
    assert not [w for w in recwarn.list if "empties" in str(w.message)]


def test_layer_sensitivity_fills_in_and_feeds_the_allocation(session):
    lab = PruneLab(session, debounce_s=0, selected=("magnitude",))
    df = lab.sensitivity
    assert df is not None and not df.attrs["interrupted"]
    assert set(df["layer"]) == set(session.layer_names) and set(df["sparsity"]) == set(lab.sensitivity_grid)
    fig = lab.figures["sensitivity"]
    assert fig.sensitivity_layers == session.layer_names and lab.images["sensitivity"].value[:4] == b"\x89PNG"
    assert "3 of 3 layers measured" in lab.sensitivity_note.value
    ax = fig.axes[0]
    grid = sorted(df["sparsity"].unique())
    x, y = ax.transData.transform((grid.index(0.9), 2))  # fc3 pruned alone to 0.9
    event = {"type": "click", "dataX": x, "dataY": fig.bbox.height - y}
    lab.pointer("sensitivity", event)
    row = df[(df.layer == "fc3.weight") & (df.sparsity == 0.9)].iloc[0]
    assert "fc3.weight" in lab.hover.value and "pruned alone to 0.9" in lab.hover.value
    assert f"{row['value']:.4f}" in lab.hover.value
    assert lab.override_layer.value == "fc3.weight"
    lab.allocation.value = "sensitivity"  # measured: the allocation works in the lab
    assert lab.state.error == "" and set(lab.summary["allocation"]) == {"sensitivity"}


def test_no_sensitivity_panel_without_data():
    lab = PruneLab(pl.PruneSession(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))), debounce_s=0)
    assert lab.sensitivity is None and lab.images["sensitivity"] not in _descendants(lab.widget)
    lab.allocation.value = "sensitivity"  # not measured: said in words
    assert "needs a measured sensitivity table" in lab.state.error


def test_changed_weights_get_their_own_lookahead():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    lab = PruneLab(pl.PruneSession(model), debounce_s=0, selected=("magnitude",))
    before = lab.figures["layers"].plot_data["relative_lookahead"].to_numpy().copy()
    with torch.no_grad():
        model[2].weight.add_(torch.randn_like(model[2].weight))  # e.g. a training step in another cell
    lab.slider.value = 0.5
    lab.slider.value = 0.9  # the same query as at first: recomputed for the new weights, not read back
    after = lab.figures["layers"].plot_data["relative_lookahead"].to_numpy()
    want = lab.session.distortion(lab.session.prune("magnitude", 0.9), output=False)["relative_lookahead"][:3]
    assert not np.allclose(before, after) and np.allclose(after, want.to_numpy())


def test_export_with_nothing_to_show_says_so(tmp_path):
    lab = PruneLab(pl.PruneSession(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))), debounce_s=0,
                   selected=())
    with pytest.raises(ValueError, match="nothing to export"):
        lab.export(tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_causal_lm_shows_perplexity_and_its_layers_per_block(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lm_helpers import pattern_ids, quiet_session, trained_llama

    model = trained_llama()
    data = pl.data.token_bundle(pattern_ids(32, 16, seed=1), pattern_ids(32, 16, seed=2))
    session = quiet_session(model, data=data, exclude=pl.models.causal_lm_exclude(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lab = PruneLab(session, methods=["magnitude", "wanda", "lamp", "lap"], sparsity=0.5, debounce_s=0)
    assert lab.metric == "perplexity" and lab.state.methods == ("magnitude", "wanda", "lamp")
    lab.slider.value = 0.7
    assert lab.state.error == ""
    summary = lab.summary.set_index("method")
    dense = session.evaluate()["perplexity"]
    assert (summary["perplexity"] > dense).all()  # pruning 70 % costs perplexity
    ev = session.evaluate(lab.results["wanda"])
    assert summary.loc["wanda", "perplexity"] == pytest.approx(ev["perplexity"], rel=1e-3)
    assert "accuracy %" not in summary and "next-token accuracy %" in summary
    curve = lab.figures["accuracy"]
    ax = curve.axes[0]
    assert ax.get_yscale() == "log" and "perplexity" in ax.get_ylabel()
    rows = curve.plot_data
    assert set(rows["method"]) == {"magnitude", "wanda", "lamp"} and rows["perplexity"].notna().all()
    at = rows[(rows["method"] == "magnitude")].sort_values("sparsity")
    assert at["perplexity"].iloc[-1] > at["perplexity"].iloc[0]  # the curve rises with sparsity
    heads = [t.get_text() for t in lab.figures["layers"].axes[0].texts]
    assert heads == ["model.layers.0", "model.layers.1"]
    names = {p.name for p in lab.export(tmp_path)}
    assert {"accuracy.png", "accuracy.csv"} <= names
    assert "perplexity" in (tmp_path / "accuracy.csv").read_text().splitlines()[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_methods_a_language_model_refuses_are_disabled_with_the_reason():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lm_helpers import pattern_ids, quiet_session, tiny_llama

    model = tiny_llama(0)
    session = quiet_session(model, data=pl.data.token_bundle(pattern_ids(8, 12, seed=1), pattern_ids(8, 12, seed=2)),
                            exclude=pl.models.causal_lm_exclude(model))
    lab = PruneLab(session, methods=["magnitude", "synflow", "snip"], debounce_s=0)
    assert lab.unavailable["snip"] == "" and lab.unavailable["synflow"]
    assert lab.method_boxes["synflow"].disabled and lab.unavailable["synflow"] in lab.method_boxes["synflow"].tooltip
    assert "synflow" not in lab.state.methods


def test_a_bad_hyperparameter_is_one_message_and_the_panels_keep_drawing(session):
    lab = PruneLab(session, methods=["magnitude", "synflow"], selected=("magnitude", "synflow"), debounce_s=0)
    before = dict(lab.hyperparameters["synflow"])
    lab._set_hyperparameter("synflow", "input_shape", 3)  # what a mistyped text box sends
    assert "SynFlow" in lab.state.error and lab.hyperparameters["synflow"] == before
    lab.slider.value = 0.6
    assert lab.state.error == "" and "sparsity=0.600" in lab.state.status
    assert set(lab.figures["layers"].plot_data["method"]) == {"magnitude", "synflow"}


def test_export_and_evaluate_now_run_on_the_worker_thread(session, tmp_path):
    import threading

    lab = PruneLab(session, debounce_s=0.05)
    try:
        assert lab.wait_idle(120)
        threads = []
        rest = lab._rest
        lab._rest = lambda gen: (threads.append(threading.current_thread().name), rest(gen))[1]
        lab.refresh_accuracy()  # waits: the worker does it
        lab.export(tmp_path)
        assert threads and set(threads) == {"prune-lab"}  # never the caller's thread beside the worker's
        assert (tmp_path / "layers.png").exists() and lab.summary["accuracy %"].notna().all()
    finally:
        lab.close()


def test_a_narrower_notebook_is_laid_out_by_the_worker(session):
    lab = PruneLab(session, debounce_s=0.05, width=960)
    try:
        assert lab.wait_idle(120)
        lab.pointer("layers", {"type": "mousemove", "dataX": 10, "dataY": 10, "boundingRectWidth": 700})
        assert lab.wait_idle(120)
        assert 690 <= lab.figures["layers"].get_size_inches()[0] * 96 <= 700
    finally:
        lab.close()
