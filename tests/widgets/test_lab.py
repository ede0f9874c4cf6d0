import json

import pytest
import torch

import prune_lab as pl
from prune_lab.widgets import PruneLab


@pytest.fixture(scope="module")
def session():
    data = pl.data.digits()
    model = pl.train(pl.models.create("mlpnet", in_features=64, seed=0), data, epochs=10, progress=False).eval()
    return pl.PruneSession(model, data)


def bar_heights(fig, ax=0):
    return [[r.get_height() for r in c.patches] for c in fig.axes[ax].containers]


def test_slider_moves_redraw_the_panels(session):
    lab = PruneLab(session, debounce_s=0)
    assert lab.state.methods == ("magnitude", "lamp", "lap") and lab.state.error == ""
    before = bar_heights(lab.figures["sparsity"])
    png = lab.images["sparsity"].value
    lab.slider.value = 0.5
    assert lab.state.sparsity == 0.5
    after = bar_heights(lab.figures["sparsity"])
    assert after != before and after[0] == pytest.approx([0.5, 0.5, 0.5], abs=0.01)
    assert lab.images["sparsity"].value != png
    assert "sparsity=0.500" in lab.state.status and "3 methods" in lab.state.status
    assert lab.summary["remaining %"].tolist() == [50.0, 50.0, 50.0]
    assert lab.summary["accuracy %"].notna().all()


def test_methods_and_allocation_follow_the_controls(session):
    lab = PruneLab(session, debounce_s=0)
    lab.method_boxes["lap"].value = False
    lab.method_boxes["global_magnitude"].value = True
    assert lab.state.methods == ("magnitude", "global_magnitude", "lamp")  # registry order
    assert set(lab.figures["sparsity"].plot_data.method) == {"global_magnitude", "magnitude", "lamp"}
    lab.allocation.value = "erk"
    assert set(lab.summary["allocation"]) == {"erk"}
    assert lab.state.error == ""


def test_errors_are_shown_in_words(session):
    lab = PruneLab(session, debounce_s=0)
    lab.allocation.value = "uniform_plus"
    lab.slider.value = 0.99  # the last layer must keep 20 %: unreachable on this MLP
    assert "uniform_plus" in lab.state.error and "cannot reach" in lab.state.error
    assert "prune-lab-error" in lab.error.value
    lab.slider.value = 0.5
    assert lab.state.error == "" and lab.error.value == ""


def test_accuracy_curve_fills_in_and_is_debounced(session):
    lab = PruneLab(session, debounce_s=0)
    curve = lab.figures["accuracy"].plot_data
    assert set(curve.method) == {"magnitude", "lamp", "lap"} and len(curve) >= 3 * len(lab.grid)
    lab.debounce_s = 60  # a long rest: the drag itself evaluates nothing new
    calls = []
    original = session.evaluate
    session.evaluate = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for v in (0.61, 0.62, 0.63):
            lab.slider.value = v
        assert calls == [] and lab._timer is not None
        lab._timer.cancel()
        lab.refresh_accuracy()
        assert len(calls) > 0
        assert 0.63 in set(lab.figures["accuracy"].plot_data.sparsity)
    finally:
        del session.evaluate


def test_hyperparameter_controls_come_from_the_registry(session):
    lab = PruneLab(session, debounce_s=0, selected=("magnitude",))
    assert lab.hp_box.children == ()
    hp_methods = [m for m in pl.list_methods() if pl.get_method(m).hyperparameter_fields()]
    if hp_methods:
        lab.method_boxes[hp_methods[0]].value = True
        assert len(lab.hp_box.children) == len(pl.get_method(hp_methods[0]).hyperparameter_fields())


def test_methods_needing_data_are_disabled_with_a_reason():
    from prune_lab.methods import registry

    spec = registry.MethodSpec("_needs_data_demo", "Demo", "", lambda ctx, hp: {}, "global",
                               needs=frozenset({"data"}))
    registry._METHODS[spec.name] = spec
    try:
        lab = PruneLab(pl.PruneSession(torch.nn.Sequential(torch.nn.Linear(4, 3))), debounce_s=0)
        box = lab.method_boxes["_needs_data_demo"]
        assert box.disabled and "needs data" in box.tooltip
        assert "_needs_data_demo" not in lab.state.methods
    finally:
        del registry._METHODS[spec.name]


def test_export_writes_every_panel(session, tmp_path):
    lab = PruneLab(session, debounce_s=0)
    lab.slider.value = 0.8
    written = lab.export(tmp_path / "figs")
    names = {p.name for p in written}
    for panel in ("sparsity", "distortion", "accuracy"):
        assert {f"{panel}.png", f"{panel}.pdf", f"{panel}.svg", f"{panel}.csv"} <= names
        assert (tmp_path / "figs" / f"{panel}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "figs" / f"{panel}.pdf").read_bytes()[:5] == b"%PDF-"
    settings = json.loads((tmp_path / "figs" / "settings.json").read_text())
    assert settings["sparsity"] == 0.8 and settings["methods"] == ["magnitude", "lamp", "lap"]
    assert settings["model_fingerprint"] == session.fingerprint and settings["prune_lab_version"]
    assert "output distortion" in (tmp_path / "figs" / "summary.csv").read_text()


def test_model_untouched_by_the_lab(session):
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    lab = PruneLab(session, debounce_s=0)
    for v in (0.3, 0.95):
        lab.slider.value = v
    lab.export_path.value = "unused"
    assert all(torch.equal(before[k], v) for k, v in session.model.state_dict().items())


def test_live_render_matches_a_full_draw():
    """The blitted live frame shows the same picture as drawing the figure in full."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    from prune_lab.viz import plot_layer_sparsity, update_bars
    from prune_lab.widgets.lab import LiveRenderer

    table = pd.DataFrame({"method": ["magnitude", "lamp"] * 2, "layer": ["a", "a", "b", "b"],
                          "n_weights": [10, 10, 5, 5], "sparsity": [0.2, 0.4, 0.6, 0.8]})
    fig = plot_layer_sparsity(table)
    live = LiveRenderer(dpi=60)
    first = live.render(fig)
    assert update_bars(fig, table.assign(sparsity=[0.9, 0.1, 0.3, 0.5]))
    second = live.render(fig)
    assert second != first
    for ax in fig.axes:
        for c in ax.containers:
            for p in c.patches:
                p.set_animated(False)
    fig.canvas.draw()
    full = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    blit = np.asarray(Image.open(io.BytesIO(second)).convert("RGB")).astype(int)
    assert blit.shape == full.shape
    assert (np.abs(blit - full).max(axis=2) > 30).mean() < 0.01


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
    lab.set_override("fc1.weight", "exclude")  # leaves too little to prune: said in words
    assert "cannot be met" in lab.state.error
    lab.set_override("fc1.weight", "free")
    lab.set_override("fc3.weight", "free")
    assert lab.state.overrides == {} and lab.state.error == ""
    assert lab.results["lamp"].layer_sparsity["fc3.weight"] > 0
    with pytest.raises(ValueError, match="unknown layer"):
        lab.set_override("fc9.weight", "lock", 0.5)


def test_expensive_methods_wait_for_the_slider_to_rest(session):
    lab = PruneLab(session, debounce_s=60, selected=("magnitude", "lap_forward"))
    lab._timer.cancel()
    lab.slider.value = 0.77  # while dragging: lap_forward (sparsity-dependent) is not computed
    lab._timer.cancel()
    assert "lap_forward" in lab.pending and set(lab.results) == {"magnitude"}
    assert "computing lap_forward" in lab.state.status
    lab.refresh_accuracy()  # the slider rests
    assert lab.pending == [] and set(lab.results) == {"magnitude", "lap_forward"}
    assert "computing" not in lab.state.status
    lab.slider.value = 0.5
    lab._timer.cancel()
    lab.slider.value = 0.77  # visited before: drawn at once
    lab._timer.cancel()
    assert "lap_forward" in lab.results


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
