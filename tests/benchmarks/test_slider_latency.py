import json

import pytest

from . import load_benchmark


@pytest.mark.slow
def test_benchmark_runs_and_writes_results(tmp_path):
    mod = load_benchmark("slider_latency")
    r = mod.main(["--quick", "--points", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "slider_latency_quick.json").read_text())
    assert saved["methods"].keys() == {"lamp", "global_magnitude", "magnitude"}
    for v in saved["methods"].values():
        assert v["warm_median_ms"] > 0 and v["cold_s"] > 0 and v["speedup_vs_torch"] > 1
    assert 1.0 < saved["cache_vs_weights"] < 5.0
    assert saved["curve_100_s"] > 0 and saved["curve_vs_warmup"] > 0
    assert "× faster than torch" in (tmp_path / "slider_latency_quick.md").read_text()
    assert r["prunable_weights"] == saved["prunable_weights"]
