"""iterative_prune: the schedule, nested masks, the table, rewinding, and the caller's model left alone."""
import copy

import pytest
import torch

from prune_lab import data, models
from prune_lab.training import evaluate, train

pytest.importorskip("prune_lab.engine.prune", reason="the pruning engine is not there yet")
from prune_lab.engine import iterative  # noqa: E402
from prune_lab.engine.iterative import iterative_prune, schedule  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _cpu_only():
    """Bit-exact comparisons below are CPU checks: make device="auto" resolve to the CPU even with a GPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="module")
def digits():
    return data.digits()


@pytest.fixture(scope="module")
def trained(digits):
    net = models.create("mlpnet", in_features=64, seed=0)
    return train(net, digits, epochs=15, lr=3e-3, batch_size=64, progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedule():
    assert schedule(3, 0.5) == [0.5, 0.75, 0.875]
    assert schedule(20, 0.2)[-1] == pytest.approx(1 - 0.8**20)  # LAMP: 20 rounds down to 1.15 % density
    with pytest.raises(ValueError, match="rounds"):
        schedule(0)
    with pytest.raises(ValueError, match="rate"):
        schedule(2, 1.0)


def test_rounds_table_nested_masks_and_untouched_model(digits, trained):
    before = _state(trained)
    res = iterative_prune(trained, digits, "global_magnitude", rounds=3, rate=0.5, finetune_epochs=1, progress=False)
    assert _same(before, _state(trained)) and res.model is not trained
    t = res.table
    assert list(t.columns) == ["round", "sparsity", "accuracy", "loss"]
    assert t["round"].tolist() == [0, 1, 2, 3]
    assert t["sparsity"].tolist() == pytest.approx([0.0, 0.5, 0.75, 0.875], abs=1e-3)
    assert t.loc[0, "accuracy"] == evaluate(trained, digits)["accuracy"]
    assert (t["accuracy"] > 0.8).all()
    # masks nest: every weight pruned in round r stays pruned in round r + 1
    for prev, nxt in zip(res.results, res.results[1:]):
        for name in prev.masks:
            assert not (nxt.masks[name] & ~prev.masks[name]).any()
    assert all(torch.equal(res.masks[n], res.results[-1].masks[n]) for n in res.masks)
    params = dict(res.model.named_parameters())
    for name, mask in res.masks.items():
        assert int((params[name][~mask] != 0).sum()) == 0
    assert evaluate(res.model, digits)["accuracy"] == t.loc[3, "accuracy"]


def test_rewind_to_init_matches_a_by_hand_run(digits, trained):
    res = iterative_prune(trained, digits, "magnitude", rounds=2, rate=0.3, finetune_steps=4, rewind_to="init",
                          seed=5, progress=False)
    by_hand = copy.deepcopy(trained)
    masks = res.results[-1].masks
    with torch.no_grad():
        for n, p in by_hand.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    train(by_hand, digits, steps=4, masks=masks, seed=5 + 2, progress=False)
    assert _same(_state(by_hand), _state(res.model))


def test_rewind_to_step_k_matches_a_by_hand_run(digits, trained):
    k = 3
    res = iterative_prune(trained, digits, "magnitude", rounds=2, rate=0.3, finetune_steps=6, rewind_to=k,
                          progress=False)
    m1, m2 = res.results[0].masks, res.results[1].masks
    state_k = copy.deepcopy(trained)
    with torch.no_grad():
        for n, p in state_k.named_parameters():
            if n in m1:
                p.mul_(m1[n])
    train(state_k, digits, steps=k, masks=m1, seed=0 + 1, progress=False)  # the first k steps of round 1
    with torch.no_grad():
        for n, p in state_k.named_parameters():
            if n in m2:
                p.mul_(m2[n])
    train(state_k, digits, steps=6, masks=m2, seed=0 + 2, progress=False)
    assert _same(_state(state_k), _state(res.model))
    no_rewind = iterative_prune(trained, digits, "magnitude", rounds=2, rate=0.3, finetune_steps=6, progress=False)
    assert not _same(_state(no_rewind.model), _state(res.model))


def test_without_finetuning_accuracy_is_the_one_shot_accuracy(digits, trained):
    res = iterative_prune(trained, digits, "magnitude", rounds=1, rate=0.6, finetune_epochs=0, progress=False)
    assert res.table.loc[1, "accuracy"] == evaluate(trained, digits, masks=res.masks)["accuracy"]


def test_weights_returned_by_the_method_are_used(digits, trained, monkeypatch):
    real = iterative._engine_prune()

    def prune_with_update(model, method, sparsity, **kw):  # an OBS-like method shifting the kept weights
        res = real(model, method, sparsity, **kw)
        res.weights = {n: p.detach() + 1.0 for n, p in model.named_parameters() if n in res.masks}
        return res

    monkeypatch.setattr(iterative, "_engine_prune", lambda: prune_with_update)
    res = iterative_prune(trained, digits, "magnitude", rounds=1, rate=0.5, finetune_epochs=0, progress=False)
    for n, p in res.model.named_parameters():
        mask = res.masks[n]
        assert torch.equal(p[mask], dict(trained.named_parameters())[n][mask] + 1.0)
        assert int((p[~mask] != 0).sum()) == 0


def test_argument_errors(digits, trained):
    with pytest.raises(ValueError, match="rewind_to"):
        iterative_prune(trained, digits, "magnitude", rounds=2, rewind_to="start", progress=False)
    with pytest.raises(ValueError, match="rewind_to=50"):
        iterative_prune(trained, digits, "magnitude", rounds=2, finetune_steps=10, rewind_to=50, progress=False)
    with pytest.raises(ValueError, match="rewind_to=5000"):
        iterative_prune(trained, digits, "magnitude", rounds=2, finetune_epochs=1, rewind_to=5000, progress=False)
    with pytest.raises(TypeError, match="masks"):
        iterative_prune(trained, digits, "magnitude", rounds=2, masks={}, progress=False)
    with pytest.raises(ValueError, match="rate"):
        iterative_prune(trained, digits, "magnitude", rounds=2, rate=0.0, progress=False)
