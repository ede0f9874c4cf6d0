"""plot_sensitivity: small lines for a few layers, a readable heat map for many, partial data, one colour per method."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

import prune_lab as pl
from prune_lab.viz import method_color, plot_sensitivity


def frame(n_layers, grid=(0.5, 0.8, 0.9), methods=("magnitude",), prefix="encoder.layers.block_{i}.attention.proj"):
    rows = []
    for m in methods:
        for i in range(n_layers):
            for s in grid:
                rows.append({"layer": prefix.format(i=i) + ".weight", "order": i, "n_weights": 100 + i,
                             "sparsity": s, "layer_sparsity": s, "method": m, "metric": "loss",
                             "value": 0.3 + s * (i % 5), "dense": 0.3, "increase": s * (i % 5)})
    return pd.DataFrame(rows)


def texts(fig):
    out = []
    for ax in fig.axes:
        out += [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
        out += [ax.title, ax.xaxis.label, ax.yaxis.label]
    return [t for t in out if t.get_text()]


def test_few_layers_one_small_line_each_in_the_method_colour():
    df = frame(3, methods=("magnitude", "lamp"), prefix="l{i}")
    fig = plot_sensitivity(df)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 3
    for ax, i in zip(panels, range(3)):
        lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
        assert [to_rgb(ln.get_color()) for ln in lines] == [to_rgb(method_color("magnitude")),
                                                            to_rgb(method_color("lamp"))]
        expect = df[(df.layer == f"l{i}.weight") & (df.method == "magnitude")]["value"].tolist()
        assert lines[0].get_ydata().tolist() == pytest.approx(expect)
        dense = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert dense and dense[0].get_ydata()[0] == pytest.approx(0.3)
    pd.testing.assert_frame_equal(fig.plot_data, df)


def test_many_layers_a_heat_map_readable_at_120_layers():
    df = frame(120)
    fig = plot_sensitivity(df)
    ax = fig.axes[0]
    image = ax.get_images()[0]
    assert image.get_array().shape == (120, 3)
    # cell (layer i, grid j) holds that point's increase (the harm)
    assert image.get_array()[7, 2] == pytest.approx(0.9 * (7 % 5))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 120 and all(len(t) <= 31 for t in labels) and labels[0].startswith("…")
    assert all(t.get_fontsize() >= 8 for t in texts(fig))
    w, h = fig.get_size_inches()
    assert h * 72 / 120 >= 8  # at least one 8-pt line of height per layer row
    assert fig.sensitivity_layers == df["layer"].unique().tolist()


def test_partial_data_leaves_blanks_and_an_empty_run_says_so():
    df = frame(30)
    partial = df.iloc[:40]  # 13 layers and a bit: a run still filling in
    fig = plot_sensitivity(partial, layout="heatmap")
    arr = fig.axes[0].get_images()[0].get_array()
    assert arr.shape == (14, 3) and np.ma.getmaskarray(arr)[13, 1:].all() and not np.ma.getmaskarray(arr)[0].any()
    empty = plot_sensitivity(df.iloc[:0])
    assert any("no sensitivity points yet" in t.get_text() for ax in empty.axes for t in ax.texts)


def test_layout_y_and_layer_choices_are_checked():
    df = frame(4)
    assert len(plot_sensitivity(df, layout="heatmap").axes[0].get_images()) == 1
    fig = plot_sensitivity(df, layers=[df.layer[0]], y="increase")
    assert len([a for a in fig.axes if a.axison]) == 1
    with pytest.raises(ValueError, match="Valid choices.*'heatmap'"):
        plot_sensitivity(df, layout="grid")
    with pytest.raises(ValueError, match="y='nope' is not a column"):
        plot_sensitivity(df, y="nope")
    with pytest.raises(ValueError, match="not in the data"):
        plot_sensitivity(df, layers=["x.weight"])
    with pytest.raises(TypeError, match="session.sensitivity"):
        plot_sensitivity({"layer": []})


def test_heat_maps_side_by_side_per_method_and_saved_with_data(tmp_path):
    df = frame(20, methods=("magnitude", "lamp"))
    fig = plot_sensitivity(df)
    maps = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in maps] == [pl.get_method("magnitude").label, pl.get_method("lamp").label]
    paths = pl.viz.save_figure(fig, tmp_path / "sens", formats=("png",))
    assert pd.read_csv(paths[-1]).shape == (len(df), df.shape[1] + 1)  # + the methods' display names


def test_axis_words_name_the_metric_and_its_unit_and_the_legend_stays_off_the_panels():
    df = frame(3, methods=("magnitude", "lamp"), prefix="l{i}")
    fig = plot_sensitivity(df)
    assert fig.get_supylabel() == "test loss (cross-entropy)"
    assert fig.get_supxlabel() == "layer sparsity (fraction removed; other layers dense)"
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1  # one legend, beside
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Magnitude (MP)", "LAMP"]
    assert "l0 (100 weights)" in [ax.get_title() for ax in fig.axes]
    heat = plot_sensitivity(frame(3), layout="heatmap")
    colorbar = heat.axes[-1]
    assert colorbar.get_ylabel() == "test-loss increase over dense"
    acc = plot_sensitivity(frame(3).assign(metric="accuracy"), layout="heatmap")
    assert acc.axes[-1].get_ylabel() == "accuracy drop (fraction)"
