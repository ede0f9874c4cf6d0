import json

import pytest

from . import load_benchmark


@pytest.mark.slow
def test_sensitivity_benchmark_quick_runs_and_the_three_ways_agree(tmp_path):
    mod = load_benchmark("sensitivity")
    r = mod.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "sensitivity_quick.json").read_text())
    assert saved["same_values"] is True and saved["points"] == r["points"] == 6
    assert saved["repeat_computed"] == 0
    assert set(saved["seconds"]) == {"ranking", "prune", "from scratch", "repeat (cached)"}
    assert "| fresh pl.prune + pl.evaluate per point |" in (tmp_path / "sensitivity_quick.md").read_text()
