import json

import pytest

from . import load_benchmark


@pytest.mark.slow
def test_sweep_benchmark_runs_and_backends_agree(tmp_path):
    mod = load_benchmark("sweep_backends")
    r = mod.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "sweep_backends_quick.json").read_text())
    assert saved["tables_equal"] is True and set(saved["backends"]) == {"in-process", "pool"}
    assert saved["max_abs_difference"] < 1e-9
    for b in saved["backends"].values():
        assert b["computed"] == 4 and b["repeat_computed"] == 0 and b["seconds"] > 0
    assert "| pool |" in (tmp_path / "sweep_backends_quick.md").read_text()
    assert r["points"] == 4
