import dataclasses
import math

import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.engine.result import PruneResult
from tests.conftest import SmallConvNet, assert_state_equal, state_copy

FIELDS = ("method", "allocation", "target_sparsity", "hyperparameters", "seed", "layers", "numel", "pruned",
          "frobenius", "weight_norms", "model_fingerprint")


def _same(a: PruneResult, b: PruneResult):
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    assert list(a.masks) == list(b.masks)
    for n in a.masks:
        assert a.masks[n].dtype == b.masks[n].dtype == torch.bool
        assert torch.equal(a.masks[n], b.masks[n]), n
    assert a.layer_sparsity == b.layer_sparsity and a.sparsity == b.sparsity


@pytest.mark.parametrize("method, alloc", [("lamp", None), ("random", "erk"), ("lap_forward", "uniform")])
def test_round_trip_bit_exact(convnet, tmp_path, method, alloc):
    before = state_copy(convnet)
    res = pl.prune(convnet, method, 0.73, allocation=alloc, seed=3, device="cpu")
    path = tmp_path / "res.pt"
    res.save(path)  # masks built lazily on save when needed
    back = PruneResult.load(path, model=convnet)
    _same(res, back)
    assert back.library_version == pl.__version__
    assert back.weights is None
    assert_state_equal(convnet, before)


def test_masks_are_stored_as_bits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    res = pl.prune(model, "magnitude", 0.9)
    res.save(tmp_path / "r.pt")
    payload = torch.load(tmp_path / "r.pt", weights_only=True)
    assert payload["masks"]["0.weight"].dtype == torch.uint8
    assert payload["masks"]["0.weight"].numel() == math.ceil(300 * 200 / 8)
    n_weights = 300 * 200 + 200 * 10
    assert (tmp_path / "r.pt").stat().st_size < n_weights / 8 + 20_000  # ≈ 1 bit per weight plus metadata


def test_weights_round_trip_with_dtype(mlp, tmp_path):
    res = pl.prune(mlp, "magnitude", 0.5)
    new = {n: (torch.randn_like(p) * res.masks[n]).to(torch.float16) for n, p in pl.prunable_parameters(mlp).items()}
    upd = dataclasses.replace(res, weights=new, hyperparameters={"update": "cbs", "lam": 1e-5},
                              _masks=res.masks, _mask_builder=None)
    upd.save(tmp_path / "u.pt")
    back = PruneResult.load(tmp_path / "u.pt")
    assert back.hyperparameters == {"update": "cbs", "lam": 1e-5}
    for n in new:
        assert back.weights[n].dtype == torch.float16 and torch.equal(back.weights[n], new[n])


def test_other_model_detected(tmp_path, mlp):
    torch.manual_seed(1)
    twin = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    res = pl.prune(mlp, "lamp", 0.5)
    res.save(tmp_path / "r.pt")
    with pytest.raises(ValueError, match="computed on a model with other weights"):
        PruneResult.load(tmp_path / "r.pt", model=twin)
    back = PruneResult.load(tmp_path / "r.pt")
    back.check_model(twin, weights=False)  # same architecture: layers fit
    with pytest.raises(ValueError, match=r"no parameter '0.weight'"):
        back.check_model(SmallConvNet())
    wider = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 7))
    with pytest.raises(ValueError, match=r"'4.weight' has shape \(7, 4\), the result's mask \(3, 4\)"):
        back.check_model(wider, weights=False)
    # the weights changed in place after pruning (the user kept training): detected too
    with torch.no_grad():
        mlp[0].weight.add_(1e-3)
    with pytest.raises(ValueError, match="other weights"):
        back.check_model(mlp)


def test_not_a_result_file(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not a saved PruneResult"):
        PruneResult.load(tmp_path / "x.pt")
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a saved PruneResult"):
        PruneResult.load(tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError):
        PruneResult.load(tmp_path / "missing.pt")


def test_newer_format_refused(tmp_path, mlp):
    pl.prune(mlp, "magnitude", 0.5).save(tmp_path / "r.pt")
    payload = torch.load(tmp_path / "r.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "r.pt")
    with pytest.raises(ValueError, match="format 99"):
        PruneResult.load(tmp_path / "r.pt")


def test_numpy_hyperparameters_saved_as_plain_numbers(mlp, tmp_path):
    import numpy as np

    res = pl.prune(mlp, "magnitude", np.float32(0.5))
    odd = dataclasses.replace(res, hyperparameters={"lam": np.float64(1e-4), "shape": (1, np.int64(28))},
                              seed=np.int64(3), _masks=res.masks, _mask_builder=None)
    odd.save(tmp_path / "r.pt")
    back = PruneResult.load(tmp_path / "r.pt")
    assert back.hyperparameters == {"lam": 1e-4, "shape": (1, 28)} and type(back.hyperparameters["lam"]) is float
    assert back.seed == 3 and back.target_sparsity == 0.5
