"""Every registered method on tiny causal LMs (Llama, OPT, GPT-NeoX, GPT-2) with token data: it prunes with exact
per-layer counts and leaves the model unchanged, or it refuses with the reason its registry record gives."""
import math

import pytest
import torch

import prune_lab as pl
from prune_lab.core.validation import round_half_up
from tests.conftest import assert_state_equal, state_copy
from tests.lm_helpers import TINY_LMS, pattern_ids, quiet_session

METHODS = pl.list_methods()
CHEAP = {"n_samples": 6, "samples": 6, "n_calibration": 6, "max_swaps": 10, "trials": 2, "rounds": 3,
         "grad_chunk": 3}


def cheap(method: str) -> dict:
    names = {f for f, _, _ in pl.get_method(method).hyperparameter_fields()}
    return {k: v for k, v in CHEAP.items() if k in names}


def ragged_tokens():
    """Calibration: 4 sequences of 12 tokens and 4 of 7 (right-padded); evaluation: 4 of 12."""
    calib = pl.data.tokens([pattern_ids(4, 12, seed=1), pattern_ids(4, 7, seed=2)], batch_size=4)
    assert calib.padded
    return pl.data.token_bundle(calib, pattern_ids(4, 12, seed=3))


@pytest.fixture(scope="module", params=list(TINY_LMS))
def lm_session(request):
    model = TINY_LMS[request.param](0)
    data = ragged_tokens()
    return model, data, quiet_session(model, data, exclude=pl.models.causal_lm_exclude(model))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_a_causal_lm_or_says_why_not(lm_session, method):
    model, data, session = lm_session
    spec = pl.get_method(method)
    before, modes = state_copy(model), [m.training for m in model.modules()]
    why = spec.unavailable_reason(data)
    if why:
        with pytest.raises(ValueError) as err:
            session.prune(method, 0.5, allocation="uniform", **cheap(method))
        assert why in str(err.value)
    else:
        res = session.prune(method, 0.5, allocation="uniform", **cheap(method))
        params = dict(model.named_parameters())
        assert set(res.masks) == set(session.layer_names)
        for name, mask in res.masks.items():  # exact per-layer counts
            assert int((~mask).sum()) == round_half_up(0.5 * params[name].numel()), name
        for name, w in (res.weights or {}).items():
            assert torch.isfinite(w).all() and bool((w[~res.masks[name]] == 0).all()), name
        ppl = session.evaluate(res)["perplexity"]
        assert math.isfinite(ppl) and ppl > 1.0
    assert_state_equal(model, before)
    assert [m.training for m in model.modules()] == modes


def test_which_methods_refuse_token_data_and_why():
    data = ragged_tokens()
    refused = {m: pl.get_method(m).unavailable_reason(data) for m in METHODS}
    refused = {m: why for m, why in refused.items() if why}
    assert list(refused) == ["synflow"]
    assert "language models" in refused["synflow"] and "token ids" in refused["synflow"]
    # the same records say nothing against image / tabular data, and name the missing data
    assert pl.get_method("synflow").unavailable_reason(pl.data.synthetic(n_train=8, n_test=4)) == ""
    assert pl.get_method("snip").unavailable_reason(None).startswith("needs data")
    assert pl.get_method("synflow").unavailable_reason(None) == ""


@pytest.mark.filterwarnings("ignore:torch.fx could not trace")
def test_synflow_refuses_a_language_model_even_without_data():
    model = TINY_LMS["llama"](0)
    with pytest.raises(ValueError, match="SynFlow is not defined for language models"):
        pl.prune(model, "synflow", 0.5, input_shape=(12,), exclude=pl.models.causal_lm_exclude(model))


def test_token_ids_beyond_the_vocabulary_are_named_by_the_method():
    model = TINY_LMS["llama"](0)
    data = pl.data.tokens(pattern_ids(4, 8, seed=0) + 1000)
    session = quiet_session(model, data, exclude=pl.models.causal_lm_exclude(model))
    for method in ("snip", "woodfisher"):
        with pytest.raises(ValueError, match=rf"method '{method}'.*vocabulary of 128"):
            session.prune(method, 0.5, **cheap(method))


def test_the_cbs_u_update_runs_on_token_data():
    model = TINY_LMS["llama"](0)
    before = state_copy(model)
    session = quiet_session(model, ragged_tokens(), exclude=pl.models.causal_lm_exclude(model))
    plain = session.prune("magnitude", 0.5)
    res = session.prune("magnitude", 0.5, update="cbs_u")
    assert all(torch.equal(res.masks[n], plain.masks[n]) for n in plain.masks)
    for n, w in res.weights.items():
        assert bool((w[~res.masks[n]] == 0).all()) and torch.isfinite(w).all()
    kept = {n: res.weights[n][res.masks[n]] for n in res.masks}
    orig = dict(model.named_parameters())
    assert any(not torch.allclose(kept[n], orig[n].detach()[res.masks[n]]) for n in kept)  # the kept weights moved
    assert math.isfinite(session.evaluate(res)["perplexity"])
    assert_state_equal(model, before)
