import json

import pytest

from . import load_benchmark


@pytest.mark.slow
def test_big_model_benchmark_quick_mode(tmp_path):
    """The benchmark's smoke mode (5 M weights, every tool in a subprocess): the files' structure, the memory
    readings, and prune_lab's per-layer counts equal to torch.nn.utils.prune's masks."""
    mod = load_benchmark("big_model")
    r = mod.main(["--quick", "--jobs", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "big_model_quick.json").read_text())
    assert saved["model"] == json.loads(json.dumps(r["model"]))
    assert 4e6 < saved["model"]["n_weights"] < 6e6 and saved["model"]["layers"] == len(mod.shapes(True))
    assert {"cpu", "cores", "ram_bytes", "torch"} <= saved["machine"].keys()
    assert saved["load_before"] and saved["load_after"]
    runs = {(x["tool"], x["method"], x["dtype"]): x for x in saved["runs"]}
    assert set(runs) == set(mod.RUNS)
    for key, x in runs.items():
        if key[0] == "torch" and "error" in x:  # a dtype torch's pruning does not support is reported, not hidden
            continue
        assert "error" not in x, x.get("error")
        assert x["n_weights"] == saved["model"]["n_weights"]
        c = x["cold"]
        assert c["seconds"] > 0 and c["peak_rss_bytes"] >= c["base_rss_bytes"] > 0
        assert c["increment_vs_weights"] == pytest.approx(c["increment_bytes"] / x["weight_bytes"])
        assert abs(x["sparsity"] - 0.9) < 1e-3
        if key[0] == "prune_lab":
            assert x["warm"]["median_ms"] > 0 and len(x["warm"]["all_ms"]) == len(mod.WARM)
            assert x["cache_vs_weights"] <= 3.3  # ≤ 3× the weights in big layers; small layers pay for tables
            assert x["masks"]["seconds"] > 0
    cmp = saved["counts_vs_torch"]["float32"]
    assert cmp["comparable"] and cmp["identical"]  # no weight ties the threshold in this seeded model
    assert saved["counts_vs_torch"]["bfloat16"]["within_threshold_ties"]
    md = (tmp_path / "big_model_quick.md").read_text()
    assert "peak memory increment" in md and "identical in all" in md
