
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


def test_figure_is_paper_ready_and_keeps_the_dense_lines_clear(tmp_path):
    from matplotlib.colors import to_rgb

    from prune_lab.viz import color

    from .test_reproductions import assert_paper_ready

    mod = load_benchmark("reproduce_rpi")
    rows = []
    for seed in (0, 1):
        for init in ("eoc", "ordered"):
            rows.append(dict(experiment="ffnn", model=None, method="dense", init=init, rescale=False, sparsity=0.0,
                             seed=seed, accuracy=0.9 - 0.05 * (init == "ordered"), critical_sparsity=None,
                             collapsed_layers=0, effective_sparsity=0.0))
            for method in ("snip", "grasp", "random"):
                rows.append(dict(experiment="collapse", model=None, method=method, init=init, rescale=False,
                                 sparsity=0.9, seed=seed, accuracy=None, critical_sparsity=0.95, collapsed_layers=0,
                                 effective_sparsity=0.9))
                for rescale in (False, True):
                    for s in (0.9, 0.98):
                        rows.append(dict(experiment="ffnn", model=None, method=method, init=init, rescale=rescale,
                                         sparsity=s, seed=seed, accuracy=0.8 - s / 2 + 0.01 * seed,
                                         critical_sparsity=0.95, collapsed_layers=0, effective_sparsity=s))
        for model in ("stable_resnet", "plain_resnet"):
            for s in (0.9, 0.98):
                rows.append(dict(experiment="resnet", model=model, method="snip", init="eoc", rescale=False,
                                 sparsity=s, seed=seed, accuracy=0.9 - s / 3, critical_sparsity=0.97,
                                 collapsed_layers=0, effective_sparsity=s))
    fig = mod.figure(mod.summarise(pd.DataFrame(rows)))
    fig.savefig(tmp_path / "rpi.png", dpi=60)
    entries = assert_paper_ready(fig)  # ≥ 8 pt, every legend outside every panel (the dense lines stay visible)
    assert {"SNIP (SBP)", "GraSP", "Random", "EOC + rescaling", "ordered", "dense network, EOC",
            "dense network, ordered", "Stable ResNet (branches × 1/√L)", "plain ResNet"} <= set(entries)
    ffnn, crit, resnet = fig.axes
    assert {to_rgb(c.lines[0].get_color()) for c in ffnn.containers} == {color(m) for m in ("snip", "grasp",
                                                                                              "random")}
    assert {to_rgb(p.get_facecolor()) for p in crit.patches} == {color(m) for m in ("snip", "grasp", "random")}
    assert {to_rgb(c.lines[0].get_color()) for c in resnet.containers} == {color("snip")}
    for ax in (ffnn, resnet):
        assert "%" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert "%" in crit.get_ylabel()
