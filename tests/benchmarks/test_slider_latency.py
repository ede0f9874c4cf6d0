import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_runs_and_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("slider_latency", ROOT / "benchmarks" / "slider_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--quick", "--points", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "slider_latency_quick.json").read_text())
    assert saved["methods"].keys() == {"lamp", "global_magnitude", "magnitude"}
    for v in saved["methods"].values():
        assert v["warm_median_ms"] > 0 and v["cold_s"] > 0 and v["speedup_vs_torch"] > 1
    assert 1.0 < saved["cache_vs_weights"] < 5.0
    assert saved["curve_100_s"] > 0 and saved["curve_vs_warmup"] > 0
    assert "× faster than torch" in (tmp_path / "slider_latency_quick.md").read_text()
    assert r["prunable_weights"] == saved["prunable_weights"]
