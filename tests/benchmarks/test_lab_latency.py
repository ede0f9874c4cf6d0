import json

import pytest

from . import load_benchmark


@pytest.mark.slow
def test_lab_benchmark_runs_through_the_dashboard_and_writes_results(tmp_path):
    mod = load_benchmark("lab_latency")
    rows = mod.main(["--cases", "mlpnet on digits", "--moves", "3", "--no-lookahead-paths", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "lab_latency.json").read_text())
    (row,) = saved["cases"]
    assert row == rows[0] and row["layers"] == 3 and row["data"] is True
    assert 0 < row["frame_median_ms"] <= row["frame_max_ms"] and row["everything_median_s"] >= row["debounce_s"]
    assert row["build_s"] > 0 and row["cold_prunes_s"] > 0
    md = (tmp_path / "lab_latency.md").read_text()
    assert "| mlpnet on digits |" in md and "frame median" in md


def test_moves_mix_drag_steps_and_jumps_and_never_repeat():
    mod = load_benchmark("lab_latency")
    values = mod.moves(30)
    steps = [abs(b - a) for a, b in zip([0.9] + values, values)]
    assert all(0.3 <= v <= 0.98 for v in values) and all(s > 0 for s in steps)
    assert sum(s <= 0.021 for s in steps) >= 15 and max(steps) >= 0.05
