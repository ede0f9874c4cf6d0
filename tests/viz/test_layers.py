import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from prune_lab.viz import method_color
from prune_lab.viz.layers import hit_test, plot_layers, short_layer_name, unique_labels, update_layers


def table(n_layers=3, methods=("magnitude", "lamp"), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for m in methods:
        for i in range(n_layers):
            rows.append({"method": m, "layer": f"block{i}.conv.weight", "n_weights": 100 + i,
                         "sparsity": rng.uniform(), "relative_frobenius": rng.uniform(),
                         "relative_lookahead": rng.uniform()})
    return pd.DataFrame(rows)


def widths(fig, column, method):
    verts = fig.layer_geometry["collections"][(column, method)].get_paths()
    return [float(p.vertices[:, 0].max()) for p in verts]


def test_one_row_per_layer_three_columns_one_colour_per_method():
    t = table()
    fig = plot_layers(t)
    assert len(fig.axes) == 3
    assert widths(fig, "sparsity", "lamp") == pytest.approx(t[t.method == "lamp"].sparsity.tolist())
    coll = fig.layer_geometry["collections"][("relative_lookahead", "magnitude")]
    assert tuple(coll.get_facecolor()[0][:3]) == pytest.approx(method_color("magnitude"))
    assert [x.get_text() for x in fig.axes[0].get_yticklabels()] == ["block0.conv", "block1.conv", "block2.conv"]
    assert fig.plot_data.equals(t)


def test_update_in_place_hides_methods_and_refuses_other_structures():
    t = table()
    fig = plot_layers(t)
    new = t.assign(sparsity=0.25)
    assert update_layers(fig, new, title="sparsity 0.250", hidden=("lamp",))
    assert widths(fig, "sparsity", "magnitude") == pytest.approx([0.25] * 3)
    assert not fig.layer_geometry["collections"][("sparsity", "lamp")].get_visible()
    assert fig.layer_geometry["heading"].get_text() == "sparsity 0.250"
    assert not update_layers(fig, t[t.method == "lamp"])
    pending = t.assign(relative_lookahead=np.nan)  # not computed yet: no bars, no error
    assert update_layers(fig, pending) and widths(fig, "relative_lookahead", "lamp") == [0.0] * 3
    assert not fig.layout_changed
    assert update_layers(fig, t.assign(relative_lookahead=1.7)) and fig.layout_changed
    assert fig.axes[2].get_xlim()[1] > 1.7


@pytest.mark.parametrize("n_layers", [3, 54, 200])
def test_readable_at_any_number_of_layers(n_layers):
    fig = plot_layers(table(n_layers, methods=("magnitude", "lamp", "lap")), width_px=960, dpi=96)
    FigureCanvasAgg(fig).draw()
    sizes = [t.get_fontsize() for ax in fig.axes for t in ax.get_yticklabels() + ax.get_xticklabels()]
    sizes += [ax.title.get_fontsize() for ax in fig.axes]
    assert min(sizes) >= 8
    assert fig.get_size_inches()[0] * 96 == pytest.approx(960)
    row_px = fig.axes[0].bbox.height / n_layers
    assert row_px >= 16  # a row holds its name at 9 pt
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in fig.axes[0].get_yticklabels()]
    assert min(b.x0 for b in labels) >= 0  # no name cut at the left edge


def test_hit_test_finds_the_layer_and_method_under_the_pointer():
    t = table(4, methods=("magnitude", "lamp", "lap"))
    fig = plot_layers(t)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[1]
    height = fig.bbox.height
    for row, layer in enumerate(dict.fromkeys(t.layer)):
        for j, m in enumerate(("magnitude", "lamp", "lap")):
            y = row + (j - 1) * fig.layer_geometry["bar_height"]
            x_disp, y_disp = ax.transData.transform((0.01, y))
            assert hit_test(fig, x_disp, height - y_disp) == (layer, m, "relative_frobenius")
    x_disp, y_disp = fig.axes[0].transData.transform((0, 2))
    assert hit_test(fig, x_disp - 30, height - y_disp) == ("block2.conv.weight", None, None)  # on the name
    assert hit_test(fig, 5, 2) is None  # above the rows


def test_short_names_keep_the_end_of_long_paths():
    assert short_layer_name("fc1.weight") == "fc1"
    long = "features.denseblock4.denselayer16.conv2.weight"
    assert short_layer_name(long).endswith("denselayer16.conv2") and len(short_layer_name(long)) <= 31
    assert short_layer_name("encoder.layers.encoder_layer_0.self_attention.in_proj_weight").endswith("in_proj")


def test_labels_stay_distinct_when_blocks_repeat_their_parts():
    names = [f"encoder.layers.encoder_layer_{i}.self_attention.{p}" for i in range(12)
             for p in ("in_proj_weight", "out_proj.weight")] + ["heads.head.weight"]
    labels = unique_labels(names)
    assert len(set(labels)) == len(names)
    assert labels[0].endswith("encoder_layer_0.self_attention.in_proj") and labels[-1] == "heads.head"
    fig = plot_layers(pd.DataFrame({"method": "lamp", "layer": names, "n_weights": 10, "sparsity": 0.5}))
    # in the panel the blocks are headings, and each layer reads as its part of the block
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == \
        ["self_attention.in_proj", "self_attention.out_proj"] * 12 + ["heads.head"]
    assert sum(t.get_text().endswith("encoder_layer_3") for t in fig.axes[0].texts) == 1


LLAMA = [f"model.layers.{b}.{part}.weight" for b in range(24) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]


def test_repeated_blocks_are_found_in_the_common_naming_schemes():
    from prune_lab.viz.layers import layer_blocks

    assert layer_blocks(LLAMA)[:8] == ["model.layers.0"] * 7 + ["model.layers.1"]
    gpt2 = [f"transformer.h.{b}.{p}.weight" for b in range(3) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
    assert sorted(set(layer_blocks(gpt2))) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    vit = ["conv_proj.weight"] + [f"encoder.layers.encoder_layer_{b}.{p}" for b in range(2)
                                  for p in ("self_attention.in_proj_weight", "mlp.0.weight")]
    assert layer_blocks(vit) == ["", *["encoder.layers.encoder_layer_0"] * 2, *["encoder.layers.encoder_layer_1"] * 2]
    assert layer_blocks(["fc1.weight", "fc2.weight", "fc3.weight"]) is None  # no repeated block
    assert layer_blocks(["a.0.weight", "b.weight", "a.0.bias_like.weight"]) is None  # a block split in two


def test_a_24_block_language_model_reads_per_block():
    methods = ("magnitude", "wanda", "lamp")
    rng = np.random.default_rng(1)
    t = pd.DataFrame([{"method": m, "layer": n, "n_weights": 4096, "sparsity": rng.uniform(),
                       "relative_frobenius": rng.uniform()} for m in methods for n in LLAMA])
    fig = plot_layers(t, width_px=800)
    FigureCanvasAgg(fig).draw()
    ticks = [x.get_text() for x in fig.axes[0].get_yticklabels()]
    assert ticks[:7] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # each layer by its part of the block
    heads = [x for x in fig.axes[0].texts if x.get_text().startswith("model.layers.")]
    assert [x.get_text() for x in heads] == [f"model.layers.{b}" for b in range(24)]
    assert all(x.get_fontsize() >= 8 for x in heads + fig.axes[0].get_yticklabels())
    renderer = fig.canvas.get_renderer()
    for head in heads[:3]:  # the block's name ends before its first layer's label begins
        row = [x for x in fig.axes[0].get_yticklabels()][int(head.get_position()[1])]
        assert head.get_window_extent(renderer).x1 < row.get_window_extent(renderer).x0
        assert head.get_window_extent(renderer).x0 >= 0
    assert hit_test(fig, 400, fig.bbox.height - fig.axes[0].transData.transform((0.1, 8))[1])[0] == LLAMA[8]
