import matplotlib
import matplotlib.text
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from prune_lab.viz import (method_color, plot_accuracy_curve, plot_distortion, plot_layer_sparsity, plot_mask,
                           save_figure, update_bars)

TABLE = pd.DataFrame({"method": ["magnitude"] * 2 + ["lamp"] * 2, "layer": ["a.weight", "b.weight"] * 2,
                      "n_weights": [100, 20] * 2, "sparsity": [0.9, 0.9, 0.95, 0.7]})
DIST = TABLE.assign(frobenius=[1.0, 2.0, 1.5, 0.5], relative_frobenius=[0.5, 0.6, 0.7, 0.2],
                    lookahead=[3.0, 4.0, 5.0, 1.0], relative_lookahead=[0.3, 0.4, 0.5, 0.1])


def test_method_colours_are_fixed_and_distinct():
    assert method_color("lamp") == method_color("lamp")
    assert len({method_color(m) for m in ["magnitude", "global_magnitude", "lamp", "lap", "random"]}) == 5


def test_layer_sparsity_bars():
    fig = plot_layer_sparsity(TABLE)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2 and [r.get_height() for r in bars[1].patches] == [0.95, 0.7]
    assert bars[1].patches[0].get_facecolor()[:3] == pytest.approx(method_color("lamp"))
    assert "a\n100" in [t.get_text() for t in ax.get_xticklabels()]
    assert ax.get_ylabel() and ax.get_legend() is not None
    assert fig.plot_data.equals(TABLE)


def test_update_bars_in_place_and_structure_check():
    fig = plot_layer_sparsity(TABLE)
    new = TABLE.assign(sparsity=[0.5, 0.4, 0.3, 0.2])
    assert update_bars(fig, new)
    assert [r.get_height() for r in fig.axes[0].containers[0].patches] == [0.5, 0.4]
    assert not update_bars(fig, TABLE[TABLE.method == "lamp"])  # different methods: rebuild instead


def test_distortion_two_panels_and_model_row_dropped():
    fig = plot_distortion(pd.concat([DIST, pd.DataFrame([{"method": "lamp", "layer": "(model)"}])]))
    top, bottom = fig.axes
    assert [r.get_height() for r in top.containers[0].patches] == [0.5, 0.6]
    assert [r.get_height() for r in bottom.containers[1].patches] == [0.5, 0.1]
    assert top.get_ylim() == (0.0, 1.05) and bottom.get_ylim() == (0.0, 1.05)  # relative: a still frame
    assert "(model)" not in set(fig.plot_data.layer)
    assert update_bars(fig, DIST.assign(relative_lookahead=[0.3, 0.4, 0.5, 0.2])) and not fig.layout_changed
    assert update_bars(fig, DIST.assign(relative_lookahead=[0.3, 0.4, 2.0, 0.2])) and fig.layout_changed
    assert bottom.get_ylim()[1] > 2.0
    absolute = plot_distortion(DIST, relative=False)
    assert [r.get_height() for r in absolute.axes[1].containers[1].patches] == [5.0, 1.0]


def test_accuracy_curve_with_seeds_marker_and_log_axis():
    df = pd.DataFrame({"method": ["lamp"] * 4, "sparsity": [0.5, 0.5, 0.9, 0.9], "seed": [0, 1, 0, 1],
                       "accuracy": [0.9, 0.8, 0.5, 0.4]})
    fig = plot_accuracy_curve(df, current=0.9, dense=0.95)
    ax = fig.axes[0]
    (line,) = [l for l in ax.get_lines() if l.get_label() == "LAMP"]  # display names in legends
    assert list(line.get_ydata()) == pytest.approx([85.0, 45.0])
    assert any(l.get_label().startswith("current") for l in ax.get_lines())
    assert len(ax.collections) == 1  # the ± std band
    log = plot_accuracy_curve(df.assign(sparsity=[0.5, 0.5, 0.999, 0.999]), current=0.9, log_remaining=True)
    ax = log.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlim()[0] > ax.get_xlim()[1]  # sparsity grows to the right: remaining weights fall
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(log).draw()
    ticks = {t.get_text() for t in ax.get_xticklabels() if t.get_text()}
    assert {"100 %", "10 %", "1 %", "0.1 %"} <= ticks


def test_mask_view_and_difference():
    a = torch.tensor([[True, False], [True, True]])
    b = torch.tensor([[True, True], [False, True]])
    assert "3 of 4" in plot_mask(a).axes[0].get_title()
    fig = plot_mask(a, other=b, names=("lamp", "lap"))
    assert fig.plot_data.iloc[0].tolist() == [2, 1, 1]


def test_save_figure_writes_valid_files(tmp_path):
    written = save_figure(plot_layer_sparsity(TABLE), tmp_path / "sub" / "bars")
    by_ext = {p.suffix: p.read_bytes() for p in written}
    assert by_ext[".png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert by_ext[".pdf"][:5] == b"%PDF-"
    assert b"<svg" in by_ext[".svg"][:500]
    csv = pd.read_csv(tmp_path / "sub" / "bars.csv")
    assert csv.shape == (len(TABLE), TABLE.shape[1] + 1)  # + the display names beside the method ids
    assert csv["label"].tolist() == ["Magnitude (MP)"] * 2 + ["LAMP"] * 2 and list(csv.columns[:2]) == ["method",
                                                                                                        "label"]


def test_no_pyplot_figures_leak():
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_layer_sparsity(TABLE), plot_distortion(DIST)
    assert len(plt.get_fignums()) == before


def test_figures_show_themselves_in_a_notebook():
    png = plot_layer_sparsity(TABLE)._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_curve_is_on_a_log_axis_without_percent():
    df = pd.DataFrame({"method": ["wanda", "wanda", "magnitude", "magnitude"], "sparsity": [0.3, 0.5, 0.3, 0.5],
                       "perplexity": [12.0, 30.0, 13.0, 40.0], "accuracy": [0.3, 0.2, 0.3, 0.1]})
    ax = plot_accuracy_curve(df, metric="perplexity", dense=10.0).axes[0]
    (line,) = [l for l in ax.get_lines() if l.get_label() == "Wanda"]
    assert list(line.get_ydata()) == pytest.approx([12.0, 30.0])
    assert ax.get_yscale() == "log" and "perplexity" in ax.get_ylabel()
    assert any(l.get_label() == "dense" and l.get_ydata()[0] == 10.0 for l in ax.get_lines())
    with pytest.raises(ValueError, match="unknown metric 'ppl'"):
        plot_accuracy_curve(df, metric="ppl")


def _texts(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]


def _axis_labels(fig):
    out = []
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
    return [t for t in out + [fig._suptitle.get_text() if fig._suptitle else ""] if t]


def test_axis_labels_are_words_with_units_not_formulas():
    figs = [plot_layer_sparsity(TABLE), plot_distortion(DIST), plot_distortion(DIST, relative=False),
            plot_accuracy_curve(pd.DataFrame({"method": ["lamp"] * 2, "sparsity": [0.5, 0.9], "accuracy": 0.5})),
            plot_mask(torch.ones(3, 4, dtype=torch.bool), other=torch.zeros(3, 4, dtype=torch.bool),
                      names=("lamp", "lap"))]
    for fig in figs:
        for text in _axis_labels(fig):
            assert "‖" not in text and "_F" not in text, text  # a formula alone is not a label
            assert len([w for w in text.replace("\n", " ").split() if w.isalpha()]) >= 1, text
    top, bottom = figs[1].axes
    assert top.get_ylabel() == "single-layer distortion\n(relative)"
    assert bottom.get_ylabel() == "lookahead distortion\n(relative)"
    assert figs[2].axes[1].get_ylabel() == "lookahead distortion\n(Frobenius norm)"
    assert "%" in figs[3].axes[0].get_ylabel()
    assert "LAMP" in figs[4].axes[0].get_title()  # display names, not ids


def test_no_text_below_8_pt_and_legends_beside_the_data():
    many = pd.DataFrame({"method": ["lamp"] * 60 + ["magnitude"] * 60,
                         "layer": [f"features.block{i}.conv.weight" for i in range(60)] * 2,
                         "n_weights": [2_359_296] * 120, "sparsity": 0.9})
    curve = pd.DataFrame({"method": ["lamp"] * 3, "sparsity": [0.0, 0.5, 0.99], "accuracy": [0.98, 0.97, 0.1]})
    figs = [plot_layer_sparsity(TABLE), plot_layer_sparsity(many), plot_distortion(DIST),
            plot_accuracy_curve(curve, dense=0.98), plot_accuracy_curve(curve, log_remaining=True)]
    for fig in figs:
        assert min(t.get_fontsize() for t in _texts(fig)) >= 8
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:  # outside the axes: it never hides a bar or a curve
                assert legend.get_window_extent().x0 >= ax.get_window_extent().x1


def test_many_layers_are_lines_over_the_layers_with_every_name():
    layers = [f"layer{i // 3}.{i % 3}.conv.weight" for i in range(54)]
    table = pd.DataFrame({"method": ["magnitude"] * 54 + ["lamp"] * 54, "layer": layers * 2,
                          "n_weights": [9408] * 108, "sparsity": [0.9] * 54 + list(np.linspace(0.2, 0.99, 54))})
    fig = plot_layer_sparsity(table)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [l.get_label() for l in lines] == ["Magnitude (MP)", "LAMP"]
    assert list(lines[1].get_ydata()) == pytest.approx(list(np.linspace(0.2, 0.99, 54)))
    assert lines[0].get_marker() != lines[1].get_marker()  # coinciding lines stay apart in grey-scale too
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert len(ticks) == 54 and ticks[0] == "layer0.0.conv (9.4k)"
    assert fig.get_size_inches()[0] <= 16
    assert not update_bars(fig, table)  # line figures are rebuilt, not updated in place
    dist = plot_distortion(table.assign(relative_frobenius=0.5, relative_lookahead=0.4))
    assert [len(a.get_lines()) for a in dist.axes] == [2, 2]


def test_pdf_fonts_are_truetype_and_report_csv_labels_are_display_names(tmp_path):
    import re

    table = TABLE.assign(label=TABLE.method)  # layer_table(...).assign(method=label): a label column of ids
    written = save_figure(plot_layer_sparsity(table), tmp_path / "bars")
    pdf = next(p for p in written if p.suffix == ".pdf").read_bytes()
    assert b"/FontFile2" in pdf and not re.search(rb"/Subtype\s*/Type3", pdf)
    csv = pd.read_csv(tmp_path / "bars.csv")
    assert csv["label"].tolist() == ["Magnitude (MP)"] * 2 + ["LAMP"] * 2
    kept = save_figure(plot_layer_sparsity(TABLE.assign(label=["ours", "ours", "theirs", "theirs"])),
                       tmp_path / "own")
    assert pd.read_csv(kept[-1])["label"].tolist() == ["ours", "ours", "theirs", "theirs"]  # a user's own labels


@pytest.mark.parametrize("values", [(7.2, 9.0, 14.1), (18.0, 40.0, 650.0)])
def test_a_perplexity_axis_keeps_a_few_plain_number_ticks(values):
    import pandas as pd

    from prune_lab.viz import plot_accuracy_curve

    df = pd.DataFrame({"method": "magnitude", "sparsity": [0.3, 0.6, 0.9], "perplexity": list(values)})
    ax = plot_accuracy_curve(df, metric="perplexity").axes[0]
    ax.figure.canvas.draw()
    lo, hi = ax.get_ylim()
    shown = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
    assert len(shown) >= 3 and all(t.replace(",", "").replace(".", "").isdigit() for t in shown), shown
