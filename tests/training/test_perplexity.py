"""Perplexity as the evaluation metric of causal LMs (token data), masks applied through functional_call."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune_lab as pl
from prune_lab.training import evaluate, next_token_stats, perplexity
from tests.conftest import assert_state_equal, state_copy
from tests.lm_helpers import VOCAB, pattern_ids, quiet_session, tiny_llama, trained_llama


def hand_nll(model, ids, mask=None):
    """Mean next-token cross-entropy over real tokens, and top-1 accuracy, straight from the logits."""
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    pred, target = logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else \
        ((mask[:, :-1] > 0) & (mask[:, 1:] > 0)).reshape(-1)
    nll = F.cross_entropy(pred[valid], target[valid])
    acc = (pred[valid].argmax(-1) == target[valid]).float().mean()
    return float(nll), float(acc)


def test_perplexity_is_exp_of_the_hand_computed_cross_entropy():
    model = tiny_llama(1)
    ids = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(0))
    res = evaluate(model, pl.data.tokens(ids, batch_size=4))
    nll, acc = hand_nll(model, ids)
    assert set(res) == {"loss", "perplexity", "accuracy"}
    assert res["loss"] == pytest.approx(nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert res["accuracy"] == pytest.approx(acc)
    assert perplexity(model, ids) == pytest.approx(res["perplexity"], rel=1e-6)  # raw ids are wrapped


def test_padding_is_left_out_of_the_loss():
    model = tiny_llama(2)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    res = evaluate(model, pl.data.tokens(ids, attention_mask=mask, batch_size=2))
    nll, acc = hand_nll(model, ids, mask)
    assert res["loss"] == pytest.approx(nll, rel=1e-5) and res["accuracy"] == pytest.approx(acc)
    # padding tokens change nothing
    junk = ids.masked_fill(mask == 0, 77)
    assert evaluate(model, pl.data.tokens(junk, attention_mask=mask))["loss"] == pytest.approx(res["loss"], rel=1e-6)


def test_masks_and_weights_go_through_functional_call_only():
    model = tiny_llama(3)
    before = state_copy(model)
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
    name = "model.layers.0.mlp.down_proj.weight"
    w = dict(model.named_parameters())[name]
    masks = {name: w.detach().abs() > w.detach().abs().median()}
    res = evaluate(model, pl.data.tokens(ids), masks=masks)
    assert_state_equal(model, before)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        dict(zeroed.named_parameters())[name].mul_(masks[name])
    assert res["loss"] == pytest.approx(hand_nll(zeroed, ids)[0], rel=1e-5)
    assert res["loss"] != pytest.approx(evaluate(model, pl.data.tokens(ids))["loss"], rel=1e-6)
    new = {name: torch.zeros_like(w)}
    assert perplexity(model, ids, weights=new) == pytest.approx(perplexity(model, ids, masks={
        name: torch.zeros_like(w, dtype=torch.bool)}), rel=1e-6)


def test_plain_modules_returning_tensors_or_tuples():
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    ids = torch.randint(0, 16, (5, 7))
    with torch.no_grad():
        logits = lm(ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 16), ids[:, 1:].reshape(-1))
    assert evaluate(lm, pl.data.tokens(ids))["loss"] == pytest.approx(float(expected), rel=1e-5)

    class TupleLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = lm

        def forward(self, x):
            return self.inner(x), None

    assert perplexity(TupleLM(), ids) == pytest.approx(math.exp(float(expected)), rel=1e-5)
    nll, correct, n = next_token_stats(logits, ids)
    assert n == 5 * 6 and float(nll) / n == pytest.approx(float(expected), rel=1e-5)


def test_sparsity_zero_is_dense_and_heavy_pruning_raises_perplexity():
    model = trained_llama()
    before = state_copy(model)
    calib, test = pl.data.tokens(pattern_ids(16, 24, seed=1)), pl.data.tokens(pattern_ids(16, 24, seed=2))
    session = quiet_session(model, pl.data.token_bundle(calib, test), exclude=pl.models.causal_lm_exclude(model))
    dense = session.evaluate()
    assert dense["perplexity"] < 30  # trained: far below the vocabulary size (uniform guessing: 128)
    for method in ("magnitude", "wanda"):
        zero = session.evaluate(session.prune(method, 0.0))
        assert zero == dense  # exactly: nothing pruned, same numbers
        heavy = session.evaluate(session.prune(method, 0.95))
        assert heavy["perplexity"] > 1.5 * dense["perplexity"]
    assert_state_equal(model, before)


def test_output_distortion_on_token_data():
    model = trained_llama()
    calib = pl.data.tokens(pattern_ids(8, 16, seed=3), batch_size=3)
    session = quiet_session(model, calib, exclude=pl.models.causal_lm_exclude(model))
    zero = session.output_distortion(session.prune("wanda", 0.0), n=8)
    assert zero["output_distortion"] == 0.0 and zero["loss_change"] == 0.0
    res = session.prune("wanda", 0.6)
    out = session.output_distortion(res, n=8)
    # n covers all 8 sequences: the loss change is the evaluation's difference on the same tokens
    expected = session.evaluate(res, data=calib)["loss"] - session.evaluate(data=calib)["loss"]
    assert out["output_distortion"] > 0 and out["loss_change"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    table = session.distortion(res, n_calibration=8)
    assert table.iloc[-1]["output_distortion"] == pytest.approx(out["output_distortion"])


def test_clear_errors_for_token_misuse():
    model = tiny_llama(0)
    with pytest.raises(ValueError, match="token ids go up to 200.*vocabulary of 128"):
        evaluate(model, pl.data.tokens(torch.tensor([[1, 200, 3]])))
    with pytest.raises(TypeError, match=r"prune_lab.data.tokens\(ids\)"):
        evaluate(model, (torch.ones(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="logits"):
        evaluate(nn.Sequential(nn.Embedding(8, 4), nn.Flatten(), nn.Linear(12, 8)),
                 pl.data.tokens(torch.ones(2, 3, dtype=torch.long)))


def test_train_fits_a_causal_lm_on_token_data_and_keeps_pruned_weights_zero():
    model = tiny_llama(5)
    data = pl.data.tokens(pattern_ids(32, 16, seed=7), batch_size=16)
    before = evaluate(model, data)["loss"]
    name = "model.layers.0.mlp.up_proj.weight"
    mask = torch.rand(dict(model.named_parameters())[name].shape, generator=torch.Generator().manual_seed(0)) > 0.5
    pl.train(model, data, steps=20, lr=1e-2, masks={name: mask}, progress=False)
    assert evaluate(model, data)["loss"] < before - 0.5
    assert bool((dict(model.named_parameters())[name][~mask] == 0).all())
