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


def test_report_writes_figures_and_tables(tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["report", "--methods", "magnitude,lamp", "--grid", "0", "0.5", "--sparsity", "0.8",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    for stem in ("layer_sparsity", "distortion", "accuracy"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{stem}.pdf").exists() and (out / f"{stem}.svg").exists() and (out / f"{stem}.csv").exists()
    assert "lookahead" in (out / "distortion_table.csv").read_text()
    assert '"sparsity": 0.8' in (out / "settings.json").read_text()
    assert main(["report", "--methods", "magnitude,lampp", "--out", str(out), "--no-progress"]) == 2
    assert "Did you mean 'lamp'" in capsys.readouterr().err
