
import pandas as pd

from . import load_benchmark


def test_quick_reproduction_writes_results_and_resumes(tmp_path):
    mod = load_benchmark("reproduce_rpi")
    df, summary = mod.main(["--quick", "--out", str(tmp_path)])
    for name in ("rpi.csv", "rpi.md", "rpi.png", "rpi_cache.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    saved = pd.read_csv(tmp_path / "rpi.csv")
    assert set(saved.experiment) == {"ffnn", "collapse", "resnet"}
    assert set(saved.method) >= {"snip", "grasp", "synflow", "random", "global_magnitude", "dense"}
    assert saved[saved.experiment != "collapse"].accuracy.between(0, 1).all()
    pruned = saved[saved.method != "dense"]
    assert pruned.critical_sparsity.between(0, 1).all()
    assert (pruned.effective_sparsity >= pruned.sparsity - 1e-3).all()
    md = (tmp_path / "rpi.md").read_text()
    assert "Claims vs our numbers" in md and "Deviations" in md
    n = len((tmp_path / "rpi_cache.jsonl").read_text().splitlines())
    df2, _ = mod.main(["--quick", "--out", str(tmp_path)])
    assert len((tmp_path / "rpi_cache.jsonl").read_text().splitlines()) == n  # resumed: nothing recomputed
    pd.testing.assert_frame_equal(df.reset_index(drop=True), df2.reset_index(drop=True))
