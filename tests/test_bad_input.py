"""Bad input everywhere a user can reach: one table, one row per mistake.

Every row runs against a fresh model and fresh data, asserts the exception type and its message (the argument, the
bad value, the valid choices where there are any), and that the model (parameters, buffers, train/eval mode of
every submodule) and the data are unchanged afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab import export
from prune_lab.analysis.footprint import footprint
from prune_lab.engine.result import PruneResult
from prune_lab.methods import registry
from tests.conftest import SmallConvNet, assert_state_equal, state_copy

PROBE = "_needs_data_probe"


@pytest.fixture(scope="module", autouse=True)
def needs_data_method():
    """A throwaway method that needs data (its score function must never be reached without data)."""

    def scores(ctx, hp):
        raise AssertionError("a method that needs data was scored without data")

    registry.register_method(registry.MethodSpec(PROBE, "probe", "test", scores, "uniform",
                                                 needs=frozenset({"data"})))
    yield
    del registry._METHODS[PROBE]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).train()  # a user's model, in training mode


def conv():
    torch.manual_seed(0)
    return SmallConvNet().train()


def nan_model(value=float("nan")):
    def make():
        m = mlp()
        with torch.no_grad():
            m[2].weight[1, 2] = value
        return m

    return make


def meta_model():
    m = mlp()
    m[2].weight = nn.Parameter(torch.empty(3, 5, device="meta"))  # a second device, without data
    return m


def tied_model():
    return _Tied()


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)


def conv_masks():
    return pl.prune(conv(), "magnitude", 0.5, device="cpu").masks


def wrong_shape_masks():
    other = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    return pl.prune(other, "magnitude", 0.5).masks


def empty_loader(d):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(d[0][:0], d[1][:0]), batch_size=4)


def damaged_result(change):
    """A result saved by ``result.save`` and then damaged by ``change(payload)``: the path of the file."""
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "result.pt")
    pl.prune(mlp(), "magnitude", 0.5).save(path)
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


def _drop(key):
    return lambda payload: payload.pop(key)


def _set(key, value):
    return lambda payload: payload.__setitem__(key, value)


MSG_EMPTY = r"method '{}': data is empty \(0 samples\)"
MSG_EMPTY_PAIR = r"method '{}': data: the \(inputs, targets\) tuple is empty \(N = 0\)"
MSG_RUN = r"data: the model could not run on inputs of shape \(12, 4\) \(one sample: \(4,\)\) and dtype torch\.float32"
MSG_LABELS = r"labels must be class indices in \[0, 3\) for a model with 3 outputs; got labels from [56] to 7"


@dataclass
class Row:
    id: str
    call: Callable  # call(model, data) with fresh ones
    exc: type
    match: str
    model: Callable = mlp
    xfail: str | None = None


MSG_RANGE = r"sparsity must be in \[0, 1\) .*got "
MSG_TYPE = r"sparsity must be a real number in \[0, 1\) .*got "

ROWS = [
    # ---------------------------------------------------------------- sparsity
    Row("prune/sparsity<0", lambda m, d: pl.prune(m, "magnitude", -0.1), ValueError, MSG_RANGE + r"-0\.1"),
    Row("prune/sparsity=1", lambda m, d: pl.prune(m, "lamp", 1.0), ValueError, MSG_RANGE + r"1\.0"),
    Row("prune/sparsity>1", lambda m, d: pl.prune(m, "lamp", 90), ValueError, MSG_RANGE + "90"),
    Row("prune/sparsity=nan", lambda m, d: pl.prune(m, "lamp", float("nan")), ValueError, MSG_RANGE + "nan"),
    Row("prune/sparsity=inf", lambda m, d: pl.prune(m, "lamp", float("inf")), ValueError, MSG_RANGE + "inf"),
    Row("prune/sparsity=str", lambda m, d: pl.prune(m, "lamp", "0.5"), TypeError, MSG_TYPE + r"'0\.5' of type str"),
    Row("prune/sparsity=None", lambda m, d: pl.prune(m, "lamp", None), TypeError, MSG_TYPE + "None"),
    Row("prune/sparsity=list", lambda m, d: pl.prune(m, "lamp", [0.5]), TypeError, MSG_TYPE + r"\[0\.5\]"),
    Row("session/sparsity=1.5", lambda m, d: pl.PruneSession(m).prune("lap", 1.5), ValueError, MSG_RANGE + "1.5"),
    Row("session/sparsity=bool", lambda m, d: pl.PruneSession(m).prune("lap", True), TypeError, MSG_TYPE + "True"),
    # ---------------------------------------------------------------- unknown names (with a suggestion)
    Row("prune/unknown method", lambda m, d: pl.prune(m, "lampp", 0.5), ValueError,
        r"unknown method 'lampp'\. Did you mean 'lamp'\? Valid choices: 'magnitude', "),
    Row("score/unknown method", lambda m, d: pl.score(m, "magnitud"), ValueError,
        r"unknown method 'magnitud'\. Did you mean 'magnitude'\?"),
    Row("session/unknown method", lambda m, d: pl.PruneSession(m).prune("Lap", 0.5), ValueError,
        r"unknown method 'Lap'\. Did you mean 'lap'\?"),
    Row("prune/unknown allocation", lambda m, d: pl.prune(m, "lamp", 0.5, allocation="globl"), ValueError,
        r"unknown allocation 'globl'\. Did you mean 'global'\? Valid choices: 'uniform', 'global'"),
    Row("prune/unknown hyperparameter", lambda m, d: pl.prune(m, "lamp", 0.5, alpha=1), TypeError,
        r"method 'lamp' got unknown hyperparameter\(s\) 'alpha'"),
    Row("models.create/unknown model", lambda m, d: pl.models.create("mlpnett"), ValueError,
        r"unknown model 'mlpnett'\. Did you mean 'mlpnet'\? Valid choices: .*lenet_300_100"),
    Row("models.create/unknown kwarg", lambda m, d: pl.models.create("mlpnet", widht=3), TypeError,
        r"create\('mlpnet'\) got unexpected argument\(s\) widht"),
    Row("train/unknown optimizer", lambda m, d: pl.train(m, d, optimizer="adamm", progress=False), ValueError,
        r"unknown optimizer 'adamm'; valid choices: 'adam', 'adamw', 'sgd'"),
    Row("session/unknown device", lambda m, d: pl.PruneSession(m, device="tpu"), ValueError,
        r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    # ---------------------------------------------------------------- not a model / nothing prunable
    Row("prune/not a model", lambda m, d: pl.prune("resnet18", "lamp", 0.5), TypeError,
        "model must be a torch.nn.Module, got str"),
    Row("prune/nothing prunable", lambda m, d: pl.prune(m, "lamp", 0.5), ValueError,
        "model Sequential has nothing to prune: no Linear or Conv1d/2d/3d weight",
        model=lambda: nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))),
    Row("session/all excluded", lambda m, d: pl.PruneSession(m, exclude="*"), ValueError,
        "nothing to prune: no Linear or Conv weight left after include/exclude"),
    Row("score/nothing prunable", lambda m, d: pl.score(m, "magnitude"), ValueError, "has nothing to prune",
        model=lambda: nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())),
    # ---------------------------------------------------------------- NaN / Inf weights
    Row("prune/NaN weight", lambda m, d: pl.prune(m, "lamp", 0.5), ValueError,
        r"weight '2\.weight' contains NaN values", model=nan_model()),
    Row("prune/Inf weight", lambda m, d: pl.prune(m, "magnitude", 0.5), ValueError,
        r"weight '2\.weight' contains Inf values", model=nan_model(float("-inf"))),
    Row("score/NaN weight", lambda m, d: pl.score(m, "lap"), ValueError, r"weight '2\.weight' contains NaN",
        model=nan_model()),
    # ---------------------------------------------------------------- data: wrong shape / dtype / empty / missing
    Row("evaluate/wrong input shape", lambda m, d: pl.evaluate(m, (d[0][:, :4], d[1])), ValueError,
        r"data.*shape \(12, 4\)"),
    Row("train/wrong input shape", lambda m, d: pl.train(m, (d[0][:, :4], d[1]), progress=False), ValueError,
        r"data.*shape"),
    Row("evaluate/integer inputs", lambda m, d: pl.evaluate(m, (d[0].long(), d[1])), TypeError,
        r"data.*dtype torch\.int64"),
    Row("evaluate/float targets", lambda m, d: pl.evaluate(m, (d[0], d[1].float())), TypeError,
        r"targets must be integer class labels, got dtype torch\.float32"),
    Row("evaluate/length mismatch", lambda m, d: pl.evaluate(m, (d[0], d[1][:5])), ValueError,
        r"targets must have shape \(12,\) to match the inputs, got \(5,\)"),
    Row("evaluate/empty", lambda m, d: pl.evaluate(m, (d[0][:0], d[1][:0])), ValueError, r"empty \(N = 0\)"),
    Row("train/empty", lambda m, d: pl.train(m, (d[0][:0], d[1][:0]), progress=False), ValueError,
        r"empty \(N = 0\)"),
    Row("evaluate/empty dataset", lambda m, d: pl.evaluate(m, torch.utils.data.TensorDataset(d[0][:0], d[1][:0])),
        ValueError, r"data is empty \(0 samples\)"),
    Row("evaluate/not data", lambda m, d: pl.evaluate(m, d[0]), TypeError,
        "data must be a DataBundle, a torch Dataset, a DataLoader or an"),
    Row("train/negative epochs", lambda m, d: pl.train(m, d, epochs=-1, progress=False), ValueError,
        "epochs must be a non-negative int, got -1"),
    Row("data.calibration_batch/n=0", lambda m, d: pl.data.calibration_batch(d, n=0), ValueError,
        "n must be a positive int, got 0"),
    Row("data.synthetic/n_train=0", lambda m, d: pl.data.synthetic(n_train=0), ValueError,
        "n_train must be a positive int, got 0"),
    Row("data.digits/test_fraction", lambda m, d: pl.data.digits(test_fraction=1.5), ValueError,
        r"test_fraction must be in \(0, 1\), got 1\.5"),
    Row("data.mnist/no files", lambda m, d: pl.data.mnist(root="/nonexistent/prune_lab", download=False),
        FileNotFoundError, "mnist: dataset files not found.*download=False"),
    Row("prune/needs data", lambda m, d: pl.prune(m, PROBE, 0.5), ValueError,
        rf"method '{PROBE}' needs data .*pass data=\.\.\."),
    Row("score/needs data", lambda m, d: pl.score(m, PROBE), ValueError, rf"method '{PROBE}' needs data"),
    Row("session/evaluate without data", lambda m, d: pl.PruneSession(m).evaluate(), ValueError,
        r"evaluate needs data: pass data=\.\.\."),
    # ---------------------------------------------------------------- data methods: empty, wrong shape / dtype / labels
    Row("snip/empty batch", lambda m, d: pl.prune(m, "snip", 0.5, data=(d[0][:0], d[1][:0])), ValueError,
        MSG_EMPTY_PAIR.format("snip")),
    Row("snip/empty DataLoader", lambda m, d: pl.prune(m, "snip", 0.5, data=empty_loader(d)), ValueError,
        MSG_EMPTY.format("snip") + ": the DataLoader's dataset has no samples"),
    Row("grasp/empty batch", lambda m, d: pl.prune(m, "grasp", 0.5, data=(d[0][:0], d[1][:0])), ValueError,
        MSG_EMPTY_PAIR.format("grasp")),
    Row("grasp/empty DataLoader", lambda m, d: pl.prune(m, "grasp", 0.5, data=empty_loader(d)), ValueError,
        MSG_EMPTY.format("grasp")),
    Row("woodfisher/empty batch", lambda m, d: pl.prune(m, "woodfisher", 0.5, data=(d[0][:0], d[1][:0])),
        ValueError, MSG_EMPTY_PAIR.format("woodfisher")),
    Row("woodfisher/empty DataLoader", lambda m, d: pl.prune(m, "woodfisher", 0.5, data=empty_loader(d)),
        ValueError, MSG_EMPTY.format("woodfisher")),
    Row("cbs/empty DataLoader", lambda m, d: pl.prune(m, "cbs", 0.5, data=empty_loader(d)), ValueError,
        MSG_EMPTY.format("cbs")),
    Row("obs_layerwise/empty batch", lambda m, d: pl.prune(m, "obs_layerwise", 0.5, data=(d[0][:0], d[1][:0])),
        ValueError, MSG_EMPTY_PAIR.format("obs_layerwise")),
    Row("obs_layerwise/empty DataLoader", lambda m, d: pl.prune(m, "obs_layerwise", 0.5, data=empty_loader(d)),
        ValueError, MSG_EMPTY.format("obs_layerwise")),
    Row("wanda/empty DataLoader", lambda m, d: pl.prune(m, "wanda", 0.5, data=empty_loader(d)), ValueError,
        MSG_EMPTY.format("wanda")),
    Row("snip/wrong input shape", lambda m, d: pl.prune(m, "snip", 0.5, data=(d[0][:, :4], d[1])), ValueError,
        MSG_RUN),
    Row("grasp/integer inputs", lambda m, d: pl.prune(m, "grasp", 0.5, data=(d[0].long(), d[1])), TypeError,
        r"inputs must be floating point, got dtype torch\.int64"),
    Row("woodfisher/wrong input shape", lambda m, d: pl.prune(m, "woodfisher", 0.5, data=(d[0][:, :4], d[1])),
        ValueError, MSG_RUN),
    Row("obs_layerwise/wrong input shape",
        lambda m, d: pl.prune(m, "obs_layerwise", 0.5, data=(d[0][:, :4], d[1])), ValueError, MSG_RUN),
    Row("wanda/wrong input shape", lambda m, d: pl.prune(m, "wanda", 0.5, data=(d[0][:, :4], d[1])), ValueError,
        MSG_RUN),
    Row("snip/labels outside the classes", lambda m, d: pl.prune(m, "snip", 0.5, data=(d[0], d[1] + 5)),
        ValueError, "data: " + MSG_LABELS),
    Row("cbs/labels outside the classes", lambda m, d: pl.prune(m, "cbs", 0.5, data=(d[0], d[1] + 5)),
        ValueError, "data: " + MSG_LABELS),
    Row("evaluate/labels outside the classes", lambda m, d: pl.evaluate(m, (d[0], d[1] + 5)), ValueError,
        "data: " + MSG_LABELS),
    Row("synflow/wrong input_shape", lambda m, d: pl.prune(m, "synflow", 0.5, input_shape=(4,)), ValueError,
        r"input_shape \(4,\) does not fit the model: it could not run on an input of shape \(1, 4\)"),
    # ---------------------------------------------------------------- non-numeric hyperparameters and seeds
    Row("prune/rounds=str", lambda m, d: pl.prune(m, "synflow", 0.5, input_shape=(6,), rounds="ten"), TypeError,
        r"hyperparameter 'rounds' of method 'synflow' must be an int in \[1, 1000\], got 'ten' of type str"),
    Row("prune/samples=float", lambda m, d: pl.prune(m, "snip", 0.5, data=d, samples=2.5), TypeError,
        r"hyperparameter 'samples' of method 'snip' must be an int in \[1, 100000\], got 2\.5"),
    Row("prune/damping=nan", lambda m, d: pl.prune(m, "woodfisher", 0.5, data=d, damping=float("nan")),
        ValueError, r"hyperparameter 'damping' of method 'woodfisher' must be in \[1e-10, 10\.0\], got nan"),
    Row("prune/seed=str", lambda m, d: pl.prune(m, "random", 0.5, seed="a"), TypeError,
        "seed must be an int, got 'a' of type str"),
    # ---------------------------------------------------------------- a sparsity that rounds to 1.0
    Row("prune/budget rounds to every weight", lambda m, d: pl.prune(m, "global_magnitude", 0.9999), ValueError,
        r"sparsity 0\.9999 with allocation 'global' prunes every one of the model's 45 weights .*sparsity 1\.0, "
        r"which is not allowed\. Ask for a sparsity below 0\.988889"),
    Row("prune/uniform budget rounds to every weight", lambda m, d: pl.prune(m, "magnitude", 0.995), ValueError,
        r"allocation 'uniform' prunes every one of the model's 45 weights"),
    # ---------------------------------------------------------------- damaged result files
    Row("result.load/missing key", lambda m, d: PruneResult.load(damaged_result(_drop("numel"))), ValueError,
        r"is not a complete saved PruneResult: it lacks 'numel'"),
    Row("result.load/string format version",
        lambda m, d: PruneResult.load(damaged_result(_set("format_version", "1"))), ValueError,
        r"its format_version is '1' \(str\), not a non-negative int"),
    Row("result.load/missing mask", lambda m, d: PruneResult.load(damaged_result(lambda p: p["masks"].pop("2.weight"))),
        ValueError, r"no mask for layer '2\.weight'"),
    # ---------------------------------------------------------------- masks of another model
    Row("prune/masks of another model", lambda m, d: pl.prune(m, "lamp", 0.5, masks=conv_masks()), ValueError,
        r"masks do not fit this model: 'c1\.weight' is not one of its prunable weights \(0\.weight, 2\.weight\)"),
    Row("prune/masks of another shape", lambda m, d: pl.prune(m, "lamp", 0.5, masks=wrong_shape_masks()),
        ValueError, r"the mask of '0\.weight' has shape \(7, 6\), the weight \(5, 6\)"),
    Row("evaluate/masks of another model", lambda m, d: pl.evaluate(m, d, masks=conv_masks()), ValueError,
        r"masks\['c1\.weight'\]: the model has no parameter of that name"),
    Row("train/masks of another shape", lambda m, d: pl.train(m, d, masks=wrong_shape_masks(), progress=False),
        ValueError, r"masks\['0\.weight'\] has shape \(7, 6\) but the parameter has shape \(5, 6\)"),
    Row("session.evaluate/result of another model",
        lambda m, d: pl.PruneSession(m, d).evaluate(pl.prune(conv(), "lamp", 0.5, device="cpu")), ValueError,
        r"masks\['c1\.weight'\]"),
    Row("export.apply/masks of another model", lambda m, d: export.apply(m, conv_masks()), ValueError,
        r"masks do not fit the model Sequential: it has no parameter 'c1\.weight'"),
    Row("export.to_torch_prune/another shape", lambda m, d: export.to_torch_prune(m, wrong_shape_masks()),
        ValueError, r"the mask of '0\.weight' has shape \(7, 6\), the parameter \(5, 6\)"),
    Row("export.masks_from_state_dict/another model",
        lambda m, d: export.masks_from_state_dict(conv().state_dict(), model=m), ValueError,
        r"state dict's masks do not fit the model Sequential: it has no parameter 'c1\.weight'"),
    Row("export.masks_from_state_dict/not a mapping", lambda m, d: export.masks_from_state_dict("model.pt"),
        TypeError, "state_dict must be a mapping .* got str"),
    Row("export.apply/inplace not bool", lambda m, d: export.apply(m, {}, inplace="yes"), TypeError,
        "inplace must be True or False, got 'yes'"),
    Row("result.check_model/another model",
        lambda m, d: pl.prune(conv(), "lamp", 0.5, device="cpu").check_model(m), ValueError,
        r"this result does not fit the model Sequential: it has no parameter 'c1\.weight'"),
    Row("footprint/masks of another model", lambda m, d: footprint(m, conv_masks()), ValueError,
        r"'c1\.weight' is not one of its Linear/Conv weights \(0\.weight, 2\.weight\)"),
    # ---------------------------------------------------------------- devices
    Row("prune/param on another device", lambda m, d: pl.prune(m, "lamp", 0.5), ValueError,
        r"weight '2\.weight' is on the 'meta' device", model=meta_model),
    Row("session/param on another device", lambda m, d: pl.PruneSession(m), ValueError,
        r"weight '2\.weight' is on the 'meta' device", model=meta_model),
    Row("evaluate/param on another device", lambda m, d: pl.evaluate(m, d), ValueError, r"2\.weight.*meta",
        model=meta_model),
]


def _bytes_equal(model, before):
    """Bit for bit (NaN weights included: NaN != NaN for torch.equal)."""
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        a = after[k].detach().cpu().contiguous()
        assert a.dtype == v.dtype and a.shape == v.shape and \
            a.reshape(-1).view(torch.uint8).numpy().tobytes() == v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), \
            f"{k} changed"


def _modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)]
                                              if r.xfail else []) for r in ROWS])
def test_bad_input(row: Row):
    model = row.model()
    d = data()
    d_before = tuple(t.clone() for t in d)
    meta = any(p.device.type == "meta" for p in model.parameters())
    before = None if meta else state_copy(model)
    modes = _modes(model)
    with pytest.raises(row.exc, match=row.match):
        row.call(model, d)
    if before is not None:
        _bytes_equal(model, before)
    assert _modes(model) == modes, "the model's train/eval mode changed"
    assert all(torch.equal(a, b) for a, b in zip(d, d_before)), "the data changed"


def test_every_public_entry_point_has_a_row():
    covered = {r.id.split("/")[0] for r in ROWS}
    assert {"prune", "score", "session", "train", "evaluate", "models.create", "export.apply",
            "export.to_torch_prune", "export.masks_from_state_dict", "footprint"} <= covered
    assert {"data.calibration_batch", "data.synthetic", "data.digits", "data.mnist"} <= covered


def test_tied_weights_pruned_once_and_reported():
    model = tied_model()
    before = state_copy(model)
    with pytest.warns(UserWarning, match=r"tied \(shared\) weights are pruned once.*'a\.weight' also as 'b\.weight'"):
        session = pl.PruneSession(model)
    assert session.tied_weights == {"a.weight": ["b.weight"]}
    res = session.prune("magnitude", 0.5)
    assert res.layers == ("a.weight", "c.weight")  # once, under its first name
    assert res.numel == (16, 8) and sum(res.pruned) == 12
    x = torch.randn(3, 4)
    masked = export.apply(model, res)
    assert masked.b.weight is masked.a.weight and torch.equal(masked.a.weight == 0, ~res.masks["a.weight"])
    with torch.no_grad():
        assert torch.equal(masked(x), export.to_torch_prune(model, res)(x))
    assert_state_equal(model, before)


def test_evaluation_keeps_training_mode_and_running_stats():
    model = conv()
    before = state_copy(model)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    session = pl.PruneSession(model, (x, y), device="cpu")
    res = session.prune("lamp", 0.5)
    for r in (None, res):
        out = session.evaluate(r)
        assert 0.0 <= out["accuracy"] <= 1.0
    pl.evaluate(model, (x, y), masks=res.masks)
    assert model.training and all(m.training for m in model.modules())
    assert_state_equal(model, before)  # BatchNorm running statistics not updated by evaluation


def test_result_load_rejects_another_model(tmp_path):
    m = mlp()
    pl.prune(conv(), "lamp", 0.5, device="cpu").save(tmp_path / "r.pt")
    before = state_copy(m)
    with pytest.raises(ValueError, match=r"no parameter 'c1\.weight'"):
        PruneResult.load(tmp_path / "r.pt", model=m)
    assert_state_equal(m, before)
