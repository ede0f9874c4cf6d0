"""The LAP and LAMP reproduction scripts in their ``--quick`` mode: they run, write their results with the expected
columns, and their resume cache skips finished points on a second call."""
import csv
import json
from pathlib import Path

import pytest

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
