import pandas as pd
import pytest

from prune_lab.cli import main


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lamp" in out and "2010.07611" in out and "uniform_plus" in out


def test_prune_a_torchvision_model_without_data(capsys):
    assert main(["prune", "--model", "torchvision:mobilenet_v3_small", "--data", "none", "--method", "lamp",
                 "magnitude", "--sparsity", "0.5", "0.8", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("lamp") == 2 and "0.8" in out


def test_bad_sparsity_is_a_clear_error(capsys):
    assert main(["prune", "--model", "torchvision:mobilenet_v3_small", "--data", "none", "--sparsity", "1.5",
                 "--no-progress", "--device", "cpu"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_report_writes_figures_and_tables(tmp_path, capsys, monkeypatch):
    import prune_lab.viz as viz

    currents = []
    original = viz.plot_accuracy_curve
    monkeypatch.setattr(viz, "plot_accuracy_curve", lambda *a, **k: currents.append(k.get("current")) or
                        original(*a, **k))
    out = tmp_path / "figs"
    assert main(["report", "--methods", "magnitude,lamp", "--grid", "0", "0.5", "--sparsity", "0.8",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert currents == [None]  # a figure for a paper: no dashed "current" line unless asked
    layers = pd.read_csv(out / "layer_sparsity.csv")
    assert list(layers.columns[:2]) == ["method", "label"]  # the id and the display name, side by side
    assert set(layers["label"]) == {"Magnitude (MP)", "LAMP"}
    for stem in ("layer_sparsity", "distortion", "accuracy"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{stem}.pdf").exists() and (out / f"{stem}.svg").exists() and (out / f"{stem}.csv").exists()
    assert "lookahead" in (out / "distortion_table.csv").read_text()
    assert '"sparsity": 0.8' in (out / "settings.json").read_text()
    assert main(["report", "--methods", "magnitude,lampp", "--out", str(out), "--no-progress"]) == 2
    assert "Did you mean 'lamp'" in capsys.readouterr().err


def test_report_without_data_writes_the_layer_figures_only(tmp_path, capsys, monkeypatch):
    import torch

    import prune_lab.cli as cli

    def small(name, bundle, device):  # stands in for a torchvision architecture at random init
        assert name == "torchvision:tiny" and bundle is None
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                  torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
        return net.eval(), False

    monkeypatch.setattr(cli, "_load_model", small)
    out = tmp_path / "figs"
    assert main(["report", "--model", "torchvision:tiny", "--data", "none", "--methods", "magnitude,lamp",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    for stem in ("layer_sparsity", "distortion"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" and (out / f"{stem}.pdf").exists()
    assert not (out / "accuracy.png").exists()  # no data: no accuracy figure
    assert '"grid": null' in (out / "settings.json").read_text()
    assert main(["report", "--model", "mlpnet", "--data", "none", "--out", str(out), "--no-progress"]) == 2
    assert "use a torchvision architecture" in capsys.readouterr().err


SWEEP_YAML = """
methods: [magnitude, lamp]
sparsities: [0.5, 0.9]
device: cpu
"""


def test_sweep_from_a_config_file_and_its_cache(tmp_path, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP_YAML)
    out, cache = tmp_path / "res" / "sweep.csv", tmp_path / "cache"
    args = ["sweep", str(cfg), "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    assert main(args) == 0
    assert "4 rows (4 points computed, 0 from the cache)" in capsys.readouterr().out
    first = pd.read_csv(out)
    assert list(first["method"]) == ["magnitude"] * 2 + ["lamp"] * 2 and first["accuracy"].between(0, 1).all()
    assert main(args) == 0
    assert "(0 points computed, 4 from the cache)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out), first)


def test_sweep_config_errors_name_the_problem(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("methods: [lamp]\nsparsity: [0.5]\n")
    assert main(["sweep", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'sparsity'" in err and "sparsities" in err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    cfg.write_text("methods: [lamp]\nsparsities: [1.5]\n")
    assert main(["sweep", str(cfg), "--no-progress"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_on_ray_from_the_command_line(tmp_path, ray_cluster, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(SWEEP_YAML + "backend: ray\n")
    out, local = tmp_path / "ray.csv", tmp_path / "local.csv"
    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "4 rows (4 points computed" in capsys.readouterr().out
    assert main(["sweep", str(cfg), "--backend", "local", "--out", str(local), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(local))
