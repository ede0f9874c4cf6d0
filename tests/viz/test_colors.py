"""One palette for methods and allocations: fixed, distinct, shared by every figure."""
import itertools
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb

import prune_lab as pl
from prune_lab.core.allocation import get_allocation
from prune_lab.viz import (color, plot_accuracy_curve, plot_distortion, plot_layer_sparsity, plot_mask,
                           plot_sensitivity)
from prune_lab.viz.colors import COLORS, kind, label, resolve


def names():
    return list(dict.fromkeys(pl.list_methods() + pl.list_allocations()))


def cielab(rgb):
    c = np.where(np.asarray(rgb) <= 0.04045, np.asarray(rgb) / 12.92, ((np.asarray(rgb) + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    f = np.cbrt(xyz / np.array([0.95047, 1.0, 1.08883]))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_every_method_and_allocation_has_its_own_colour_far_from_the_others():
    colours = {n: color(n) for n in names()}
    assert len(set(colours.values())) == len(colours)  # lamp is both a method and an allocation: one colour
    gaps = {(a, b): float(np.linalg.norm(cielab(colours[a]) - cielab(colours[b])))
            for a, b in itertools.combinations(colours, 2)}
    closest = min(gaps, key=gaps.get)
    assert gaps[closest] > 20, f"{closest} are hard to tell apart (ΔE {gaps[closest]:.1f})"
    assert all(n in COLORS for n in names())  # each registered name has a chosen colour, not a spare one


def test_ids_and_display_names_share_a_colour():
    for m in pl.list_methods():
        assert color(pl.get_method(m).label) == color(m)
    for a in pl.list_allocations():
        assert color(get_allocation(a).label) == color(a)
    assert color("lamp") == color("LAMP")
    assert resolve("Magnitude (MP)") == "magnitude" and resolve("Uniform+") == "uniform_plus"
    assert label("uniform_plus") == "Uniform+" and label("lamp") == "LAMP" and label("dense") == "dense"
    assert kind(["uniform", "erk", "lamp"]) == "allocation" and kind(["lamp", "lap"]) == "method"
    assert kind(["Uniform", "ERK"]) == "allocation"


def test_colours_are_the_same_in_another_process_unknown_names_included():
    probe = names() + ["dense", "my_method"]
    code = ("import prune_lab.viz as v, sys; "
            f"print(repr([v.color(n) for n in {probe!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == [color(n) for n in probe]
    assert color("my_method") not in {color(n) for n in names()}


def _bar_colours(ax):
    return [to_rgb(c.patches[0].get_facecolor()) for c in ax.containers]


def test_figures_colour_methods_and_allocations_from_the_palette():
    allocations = ["uniform", "global", "lamp", "uniform_plus", "erk"]
    table = pd.DataFrame({"method": allocations, "layer": "a.weight", "n_weights": 10,
                          "sparsity": np.linspace(0.5, 0.9, 5)})
    fig = plot_layer_sparsity(table)
    assert _bar_colours(fig.axes[0]) == [color(a) for a in allocations]
    assert fig.axes[0].get_legend().get_title().get_text() == "allocation"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["Uniform", "Global", "LAMP",
                                                                           "Uniform+", "ERK"]
    # display names as the method column (notebooks pass layer_table(...).label): the same colours
    shown = plot_layer_sparsity(table.assign(method=[label(a) for a in allocations]))
    assert _bar_colours(shown.axes[0]) == [color(a) for a in allocations]

    methods = ["magnitude", "global_magnitude", "lamp", "lap"]
    curve = pd.DataFrame({"method": np.repeat(methods, 2), "sparsity": [0.5, 0.9] * 4, "accuracy": 0.5})
    ax = plot_accuracy_curve(curve).axes[0]
    assert [to_rgb(ln.get_color()) for ln in ax.get_lines()[:4]] == [color(m) for m in methods]
    dist = pd.DataFrame({"method": methods, "layer": "a.weight", "relative_frobenius": 0.5,
                         "relative_lookahead": 0.4})
    top, bottom = plot_distortion(dist).axes
    assert _bar_colours(top) == _bar_colours(bottom) == [color(m) for m in methods]  # one shade in both panels

    sens = pd.DataFrame({"layer": ["a"] * 2, "sparsity": [0.5, 0.9], "method": "lap", "value": [0.1, 0.2],
                         "dense": 0.1, "increase": [0.0, 0.1]})
    assert to_rgb(plot_sensitivity(sens, layout="heatmap").axes[0].title.get_color()) == color("lap")

    a = torch.tensor([[True, False], [True, True]])
    b = torch.tensor([[True, True], [False, True]])
    image = plot_mask(a, other=b, names=("lamp", "lap")).axes[0].get_images()[0].get_array()
    assert tuple(image[1, 0]) == pytest.approx(color("lamp")) and tuple(image[0, 1]) == pytest.approx(color("lap"))


def test_the_reproduction_scripts_take_their_colours_from_the_palette():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    for script in ("reproduce_lamp.py", "reproduce_lap.py", "reproduce_cbs.py", "reproduce_rpi.py"):
        text = (root / script).read_text()
        assert "from prune_lab.viz import color" in text, script
        assert "#E69F00" not in text and "#1f77b4" not in text, script  # no hand-made palette left
