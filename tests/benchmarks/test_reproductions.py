"""The LAP and LAMP reproduction scripts in their ``--quick`` mode: they run, write their results with the expected
columns, and their resume cache skips finished points on a second call; their figures are paper-ready (no text
under 8 pt, legends outside the data, display names, the library's colours)."""
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.legend
import pytest
from matplotlib.colors import to_rgb

from prune_lab.viz import color

from ..viz.test_plots import _texts
from . import load_benchmark



_load = load_benchmark


@pytest.fixture(autouse=True)
def _registry_left_as_found():
    """The LAP script registers its paper allocation; the rest of the suite must not see it."""
    from prune_lab.core import allocation

    before = dict(allocation._ALLOCATIONS)
    yield
    allocation._ALLOCATIONS.clear()
    allocation._ALLOCATIONS.update(before)


def _columns(path: Path) -> list:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_reproduce_lap_quick_and_resume(tmp_path):
    mod = _load("reproduce_lap")
    first = mod.main(["--quick", "--out", str(tmp_path)])
    for ext in ("csv", "md", "json", "png"):
        assert (tmp_path / f"lap_fcn_quick.{ext}").is_file()
    assert _columns(tmp_path / "lap_fcn_quick.csv") == [
        "method", "label", "k", "remaining_pct", "paper_remaining_pct", "n_seeds", "error_mean", "error_std",
        "error_oneshot_mean", "error_oneshot_std"]
    points = _rows(tmp_path / "lap_fcn_quick_points.csv")
    assert len(points) == first["computed_points"] == 2 * len(mod.METHODS)  # 2 points × 5 methods × 1 seed
    assert {r["method"] for r in points} == set(mod.METHODS)
    table = _rows(tmp_path / "lap_fcn_quick.csv")
    assert all(0.0 <= float(r["error_mean"]) <= 100.0 for r in table)
    # the LAP allocation: hidden layers keep 0.5^k, the output layer 0.75^k
    kept = json.loads(points[0]["layer_remaining"])
    assert kept["fc1.weight"] == pytest.approx(0.5 ** int(points[0]["k"]), abs=1e-3)
    assert kept["fc5.weight"] == pytest.approx(0.75 ** int(points[0]["k"]), abs=1e-3)
    assert "Verdict" in (tmp_path / "lap_fcn_quick.md").read_text()
    second = mod.main(["--quick", "--out", str(tmp_path)])  # resume: every point is cached
    assert second["computed_points"] == 0
    assert len(_rows(tmp_path / "lap_fcn_quick_points.csv")) == len(points)
    assert second["table"] == first["table"]


def test_lap_allocation_matches_the_paper_grid():
    mod = _load("reproduce_lap")
    sizes = [784 * 500, 500 * 500, 500 * 500, 500 * 500, 500 * 10]
    got = [round(100 * (1 - mod.sparsity_of(k, sizes)), 2) for k in mod.STEPS_K]
    assert got == list(mod.REMAINING)


@pytest.mark.slow
def test_reproduce_lamp_quick_and_resume(tmp_path):
    mod = _load("reproduce_lamp")
    first = mod.main(["--quick", "--out", str(tmp_path)])
    for name in ("lamp_conv6_quick.csv", "lamp_conv6_quick.md", "lamp_conv6_quick.json", "lamp_conv6_quick.png",
                 "lamp_conv6_quick_layers.csv", "lamp_conv6_quick_layers.png", "lamp_conv6_quick_points.csv"):
        assert (tmp_path / name).is_file(), name
    assert _columns(tmp_path / "lamp_conv6_quick.csv") == [
        "allocation", "label", "round", "remaining_pct", "n_seeds", "accuracy_mean", "accuracy_std",
        "n_collapsed_mean", "n_collapsed_max", "seeds_with_collapse", "min_layer_density_pct"]
    assert _columns(tmp_path / "lamp_conv6_quick_layers.csv") == [
        "allocation", "label", "layer", "round", "sparsity_mean", "sparsity_min", "sparsity_max", "n_seeds"]
    assert first["computed_trajectories"] == len(mod.ALLOCATIONS)
    table = _rows(tmp_path / "lamp_conv6_quick.csv")
    assert {r["allocation"] for r in table} == set(mod.ALLOCATIONS)
    last = [r for r in table if int(r["round"]) == 2]
    assert all(float(r["remaining_pct"]) == pytest.approx(25.0, abs=0.01) for r in last)
    layers = _rows(tmp_path / "lamp_conv6_quick_layers.csv")
    assert len(layers) == 9 * len(mod.ALLOCATIONS)  # Conv-6: 6 conv + 3 linear layers
    n_points = len(_rows(tmp_path / "lamp_conv6_quick_points.csv"))
    second = mod.main(["--quick", "--out", str(tmp_path)])  # resume: every trajectory is cached
    assert second["computed_trajectories"] == 0
    assert len(_rows(tmp_path / "lamp_conv6_quick_points.csv")) == n_points
    assert second["table"] == first["table"]


# ------------------------------------------------------------------------------------------------ figures
def _overlap(a, b) -> bool:
    """Whether two display-space boxes share an area (edges that touch do not count)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


def assert_paper_ready(fig):
    """Every text at least 8 pt; every legend (of an axes or of the figure) inside the figure and clear of every
    axes' data area. Returns the legends' entries."""
    sizes = [(t.get_text(), t.get_fontsize()) for t in _texts(fig)]  # _texts draws the figure first
    assert sizes and min(s for _, s in sizes) >= 8, [x for x in sizes if x[1] < 8]
    legends = fig.findobj(matplotlib.legend.Legend)
    assert legends, "no legend"
    page = fig.bbox
    entries = []
    for legend in legends:
        box = legend.get_window_extent()
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1
        for ax in fig.axes:
            assert not _overlap(box, ax.get_window_extent()), (legend.get_title().get_text(), ax.get_title())
        entries += [t.get_text() for t in legend.get_texts()]
    for ax in fig.axes:  # axis labels in words, with units where there are numbers
        for text in (ax.get_xlabel(), ax.get_ylabel()):
            assert any(w.isalpha() and len(w) > 2 for w in text.replace("(", " ").split()), text
    return entries


def _line_colours(ax) -> dict:
    """{legend label: colour} of the plotted lines and of the error-bar lines."""
    out = {l.get_label(): to_rgb(l.get_color()) for l in ax.get_lines() if not l.get_label().startswith("_")}
    out.update({c.get_label(): to_rgb(c.lines[0].get_color()) for c in ax.containers if hasattr(c, "has_yerr")})
    return out


def test_lamp_figures_are_paper_ready(tmp_path):
    mod = _load("reproduce_lamp")
    allocs = ["global", "uniform_plus", "lamp"]
    table = [dict(allocation=a, round=r, remaining_pct=100 * 0.5 ** r, accuracy_mean=90 - 10 * r - i,
                  accuracy_std=2.0, min_layer_density_pct=100 * 0.4 ** r)
             for i, a in enumerate(allocs) for r in range(4)]
    names = ["features.0.weight", "features.2.weight", "classifier.0.weight"]
    layers = [dict(allocation=a, layer=n, sparsity_mean=0.5 + 0.1 * i + 0.05 * j)
              for i, a in enumerate(allocs) for j, n in enumerate(names)]
    s = dict(table=table, layers=layers, layer_sizes=dict(zip(names, [576, 36864, 65536])), settings=dict(rounds=3))
    fig = mod.plot(s, tmp_path / "acc.png", SimpleNamespace(allocations=allocs))
    assert (tmp_path / "acc.png").stat().st_size > 0
    entries = assert_paper_ready(fig)
    assert entries == ["Global", "Uniform+", "LAMP"]  # the registry's display names, once for both panels
    for ax in fig.axes:
        assert "%" in ax.get_xlabel() and "%" in ax.get_ylabel()
        assert ax.get_xlim()[0] > ax.get_xlim()[1]  # remaining weights fall to the right
    assert _line_colours(fig.axes[1]) == {"Global": color("global"), "Uniform+": color("uniform_plus"),
                                          "LAMP": color("lamp")}
    bars = mod.plot_layers(s, tmp_path / "layers.png")
    assert assert_paper_ready(bars) == ["Global", "Uniform+", "LAMP"]
    ax = bars.axes[0]
    assert [to_rgb(c.patches[0].get_facecolor()) for c in ax.containers] == [color(a) for a in allocs]
    assert ax.containers[2].patches[1].get_height() == pytest.approx(100 * (1 - 0.75))
    assert "%" in ax.get_ylabel()


def test_lap_figure_is_paper_ready(tmp_path):
    mod = _load("reproduce_lap")
    methods = ["magnitude", "lap", "random"]
    table = [dict(method=m, remaining_pct=r, error_mean=5 + 10 * i + 1 / r, error_std=1.0,
                  error_oneshot_mean=10 + 20 * i + 1 / r, error_oneshot_std=2.0)
             for i, m in enumerate(methods) for r in (6.36, 1.63, 0.12)]
    fig = mod.plot(dict(table=table, dense_error_mean=4.0), tmp_path / "lap.png", SimpleNamespace(methods=methods))
    assert (tmp_path / "lap.png").stat().st_size > 0
    entries = assert_paper_ready(fig)
    assert entries == ["Magnitude (MP)", "LAP", "Random", "dense network"]
    for ax in fig.axes:
        assert "%" in ax.get_xlabel() and "%" in ax.get_ylabel()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.12", "1.63", "6.36"]  # the paper's grid
    colours = _line_colours(fig.axes[0])
    assert all(colours[label] == color(m) for label, m in zip(entries, methods))
