"""Wanda (|W|·‖X_j‖, per-row comparison) on hand-checked layers, convolutions and tiny transformers LMs."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

import prune_lab as pl
from prune_lab.methods.wanda import input_feature_norms, row_pruned, wanda_scores
from tests.conftest import SmallConvNet, assert_state_equal, randomize_bn, state_copy
from tests.lm_helpers import VOCAB, pattern_ids, quiet_session, tiny_llama, trained_llama


def classification(x):
    return x, torch.zeros(x.shape[0], dtype=torch.long)


def test_registered_with_paper_reference_and_help():
    spec = pl.get_method("wanda")
    assert "wanda" in pl.list_methods() and "2306.11695" in spec.reference
    assert spec.needs == frozenset({"data"}) and spec.sparsity_dependent and spec.default_allocation == "uniform"
    fields = {name: (default, meta) for name, default, meta in spec.hyperparameter_fields()}
    assert fields["group"][0] == "row" and fields["group"][1]["choices"] == ("row", "layer")
    assert fields["n_calibration"][1]["help"] and spec.description


def test_scores_are_weight_magnitude_times_input_norm_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    x = torch.tensor([[1.0, 2.0, 0.0], [2.0, -2.0, 3.0], [2.0, 1.0, -4.0]])
    session = pl.PruneSession(net, classification(x))
    norms = torch.tensor([3.0, 3.0, 5.0])  # sqrt(1+4+4), sqrt(4+4+1), sqrt(0+9+16)
    expected = net[0].weight.detach().abs() * norms
    assert torch.allclose(session.scores("wanda")["0.weight"], expected, rtol=1e-6)
    assert torch.allclose(input_feature_norms(net, classification(x))["0.weight"].float(), norms)


def test_token_norms_leave_padding_out():
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    norms = input_feature_norms(lm, pl.data.tokens(ids, attention_mask=mask))["1.weight"]
    emb = lm[0].weight.detach().double()
    assert torch.allclose(norms, emb[[1, 2, 3, 4, 5, 6]].pow(2).sum(0).sqrt())


def test_per_row_counts_are_exact_and_remainders_go_to_the_cheapest_rows():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 9.0, 9.5, 10.0], [5.0, 6.0, 7.0, 8.0]])
    pruned = row_pruned(s, 5)  # 5 = 3 rows × 1 + 2 extra
    assert pruned.sum(1).tolist() == [2, 1, 2]  # the second-lowest scores: 2.0, 9.0, 6.0 → rows 0 and 2
    assert pruned.tolist()[0] == [True, True, False, False] and pruned.tolist()[1] == [True, False, False, False]
    # already-pruned weights (-inf) stay pruned; the free rows share the rest as evenly as possible
    s2 = s.clone()
    s2[1, 1:] = float("-inf")
    p2 = row_pruned(s2, 6)
    assert p2[1, 1:].all() and int(p2.sum()) == 6
    assert p2.sum(1).tolist() == [2, 3, 1]  # level 1 for rows 0 and 2; the extra one to row 0 (2.0 < 6.0)


@given(st.integers(1, 6), st.integers(1, 9), st.floats(0, 1), st.integers(0, 10_000))
def test_row_pruning_property(rows, cols, frac, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g)
    fixed = torch.rand(rows, cols, generator=g) < 0.2
    s[fixed] = float("-inf")
    k = int(fixed.sum()) + round(frac * int((~fixed).sum()))
    p = row_pruned(s, k)
    assert int(p.sum()) == k and p[fixed].all()
    free = (~fixed).sum(1)
    level = p.sum(1)[(p.sum(1) > fixed.sum(1)) | (fixed.sum(1) == 0)]
    if level.numel():  # rows above their fixed count sit at one level t or t + 1
        assert int(level.max() - level.min()) <= 1
    for r in range(rows):  # threshold separation inside every row
        kept, gone = s[r][~p[r]], s[r][p[r]]
        if kept.numel() and gone.numel():
            assert kept.min() >= gone.max()
    assert (p.sum(1) <= fixed.sum(1) + free).all()


def test_session_masks_on_a_trained_llama_row_by_row():
    model = trained_llama()
    before = state_copy(model)
    data = pl.data.tokens(pattern_ids(8, 24, seed=5), batch_size=4)
    session = quiet_session(model, data, exclude=pl.models.causal_lm_exclude(model))
    assert "lm_head.weight" not in session.layer_names and len(session.layer_names) == 14
    res = session.prune("wanda", 0.5)
    scores = session.scores("wanda")
    for i, n in enumerate(res.layers):
        m, w = res.masks[n], dict(model.named_parameters())[n]
        assert int((~m).sum()) == res.pruned[i] == round(0.5 * w.numel())
        per_row = (~m).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1  # each row at the layer's sparsity
        for r in range(m.shape[0]):
            assert scores[n][r][m[r]].min() >= scores[n][r][~m[r]].max()
    # deterministic: a fresh session on the same content gives the same masks
    again = quiet_session(trained_llama(), pl.data.tokens(data.input_ids.clone()),
                          exclude=pl.models.causal_lm_exclude(model)).prune("wanda", 0.5)
    assert all(torch.equal(res.masks[n], again.masks[n]) for n in res.masks)
    session.evaluate(res)
    session.distortion(res, n_calibration=4)
    assert_state_equal(model, before)


def test_group_layer_and_every_allocation_keep_exact_counts():
    model = tiny_llama(4)
    session = quiet_session(model, pl.data.tokens(pattern_ids(4, 16, seed=6)),
                            exclude=pl.models.causal_lm_exclude(model))
    total = sum(dict(model.named_parameters())[n].numel() for n in session.layer_names)
    scores = session.scores("wanda", group="layer")
    res = session.prune("wanda", 0.7, group="layer")
    for n in res.masks:  # the layer's lowest scores, wherever they are
        assert scores[n][res.masks[n]].min() >= scores[n][~res.masks[n]].max()
    for alloc in [a for a in pl.list_allocations() if not pl.get_allocation(a).needs]:
        r = session.prune("wanda", 0.7, allocation=alloc)
        assert sum(int((~m).sum()) for m in r.masks.values()) == sum(r.pruned)
        if alloc != "uniform":
            assert sum(r.pruned) == round(0.7 * total)
    # nested pruning from starting masks keeps the old ones pruned
    first = session.prune("wanda", 0.4)
    second = session.prune("wanda", 0.7, masks=first.masks)
    assert all(not (second.masks[n] & ~first.masks[n]).any() for n in first.masks)
    assert second.pruned == session.prune("wanda", 0.7).pruned


def test_wanda_beats_magnitude_when_one_input_feature_is_large():
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 8, generator=g))
        layer.weight[:, 0] = 0.05 * torch.sign(layer.weight[:, 0])  # small weights on the ×100 feature
    x = torch.randn(256, 8, generator=g)
    x[:, 0] *= 100.0
    session = pl.PruneSession(nn.Sequential(layer), classification(x))
    with torch.no_grad():
        dense = layer(x)
    errors = {}
    for method in ("magnitude", "wanda"):
        res = session.prune(method, 0.5)
        w = layer.weight.detach() * res.masks["0.weight"]
        errors[method] = float((dense - x @ w.T).norm())
        if method == "wanda":
            assert res.masks["0.weight"][:, 0].all()  # Wanda keeps the weights reading the large feature
        else:
            assert not res.masks["0.weight"][:, 0].any()  # magnitude drops them all
    assert errors["wanda"] < 0.5 * errors["magnitude"]


def _conv_norms_by_one_hot(conv, x):
    """‖X_{c,u,v}‖ by convolving with one-hot kernels (output = the input entries that weight reads)."""
    out = torch.zeros((conv.in_channels,) + conv.kernel_size, dtype=torch.float64)
    probe = nn.Conv2d(conv.in_channels, 1, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, padding_mode=conv.padding_mode, bias=False)
    for c in range(conv.in_channels):
        for u in range(conv.kernel_size[0]):
            for v in range(conv.kernel_size[1]):
                with torch.no_grad():
                    probe.weight.zero_()
                    probe.weight[0, c, u, v] = 1.0
                    out[c, u, v] = probe(x).double().pow(2).sum().sqrt()
    return out


@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding="same", dilation=2, padding_mode="reflect"),
                                dict(stride=2, padding=0, groups=2)])
def test_conv_inputs_are_unfolded_patches(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kw)
    x = torch.randn(3, 4, 7, 7)
    norms = input_feature_norms(nn.Sequential(conv), classification(x))["0.weight"]
    dense_twin = nn.Conv2d(4, 1, 3, **{k: v for k, v in kw.items() if k != "groups"})
    assert torch.allclose(norms, _conv_norms_by_one_hot(dense_twin, x), rtol=1e-5)
    scores = wanda_scores(conv.weight.detach(), norms, conv.groups)
    in_g = 4 // conv.groups
    for o in (0, 5):
        c0 = (o // (6 // conv.groups)) * in_g
        assert torch.allclose(scores[o], (conv.weight[o].detach().abs().double() * norms[c0:c0 + in_g]).float())


def test_conv_models_prune_with_exact_counts():
    net = randomize_bn(SmallConvNet().eval())
    data = pl.data.synthetic(n_train=32, n_test=8, input_shape=(1, 8, 8), num_classes=3)
    res = pl.PruneSession(net, data).prune("wanda", 0.6)
    for n, m in res.masks.items():
        per_filter = (~m).reshape(m.shape[0], -1).sum(1)
        assert int(per_filter.sum()) == round(0.6 * m.numel()) and int(per_filter.max() - per_filter.min()) <= 1
    conv3d = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten())
    with pytest.raises(ValueError, match="Conv3d is not supported.*exclude"):
        pl.PruneSession(conv3d, classification(torch.randn(2, 1, 3, 3, 3))).prune("wanda", 0.5)


def test_errors_without_data_and_with_bad_tokens():
    model = tiny_llama(0)
    session = quiet_session(model, exclude=pl.models.causal_lm_exclude(model))
    with pytest.raises(ValueError, match="'wanda' needs data"):
        session.prune("wanda", 0.5)
    bad = quiet_session(model, pl.data.tokens(torch.tensor([[1, 2, VOCAB + 5]])))
    with pytest.raises(ValueError, match="vocabulary of 128"):
        bad.prune("wanda", 0.5)
    with pytest.raises(ValueError, match="must be one of"):
        bad.prune("wanda", 0.5, group="column")
    lm = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(TypeError, match=r"prune_lab.data.tokens\(ids\)"):
        pl.PruneSession(lm, (torch.ones(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
                        ).prune("wanda", 0.5)


def test_llama_session_warns_once_and_names_lm_head():
    model = tiny_llama(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = pl.PruneSession(model, pl.data.tokens(pattern_ids(2, 8, seed=0)),
                                  exclude=pl.models.causal_lm_exclude(model))
        session.prune("wanda", 0.5)
    assert len(caught) == 1 and "torch.fx could not trace" in str(caught[0].message)
    assert pl.models.causal_lm_exclude(model) == ["lm_head.weight"]


@pytest.mark.parametrize("family", ["opt", "gpt_neox"])
def test_other_families_prune_their_decoder_linears(family):
    torch.manual_seed(0)
    if family == "opt":  # lm_head tied to the input embedding
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64,
                                         word_embed_proj_dim=32)).eval()
        head = "model.decoder.embed_tokens.weight"
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=64)).eval()
        head = "lm_head.weight"
    assert pl.models.causal_lm_exclude(model) == [head]
    data = pl.data.tokens(pattern_ids(4, 12, seed=0))
    for exclude in (["lm_head"], pl.models.causal_lm_exclude(model)):  # the module name works for a tied head too
        session = quiet_session(model, data, exclude=exclude)
        assert head not in session.layer_names and not session.tied_weights
    before = state_copy(model)
    res = session.prune("wanda", 0.5)
    assert res.sparsity == pytest.approx(0.5, abs=1e-3)
    assert session.evaluate(res)["perplexity"] > 0
    assert_state_equal(model, before)


def test_gpt2_conv1d_is_named_then_converted():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.prunable_parameters(gpt2)
    assert any("8 transformers Conv1D" in str(w.message) and "conv1d_to_linear" in str(w.message) for w in caught)
    linear = pl.models.conv1d_to_linear(gpt2)
    ids = pattern_ids(2, 10, seed=0)
    with torch.no_grad():
        assert torch.allclose(gpt2(ids).logits, linear(ids).logits, atol=1e-5)
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the original is untouched
    session = quiet_session(linear, pl.data.tokens(ids), exclude=pl.models.causal_lm_exclude(linear))
    assert len(session.layer_names) == 8 and all(".h." in n for n in session.layer_names)
    assert session.prune("wanda", 0.5).sparsity == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ sequential
def _block_inputs(store):
    """A forward pre-hook keeping the hidden states that enter a decoder block."""
    def hook(_m, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    return hook


def test_sequential_feeds_each_block_the_outputs_of_the_already_pruned_blocks():
    model = trained_llama()
    before = state_copy(model)
    data = pl.data.tokens(pattern_ids(16, 16, seed=7), batch_size=8)
    session = quiet_session(model, data, exclude=pl.models.causal_lm_exclude(model))
    one = session.prune("wanda", 0.6)  # its one-pass norms are cached: the sequential call ranks with them
    block1 = model.model.layers[1]
    seen = []  # what entered block 1 during the sequential calibration passes
    handle = block1.register_forward_pre_hook(_block_inputs(seen), with_kwargs=True)
    try:
        seq = session.prune("wanda", 0.6, sequential=True)
    finally:
        handle.remove()
    # the pass for block 0 stops after it (block 1 never runs); the pass for block 1 runs it once per chunk
    assert len(seen) == 2
    # the pruned model, on the same calibration sequences: block 1's inputs are the ones Wanda calibrated on
    ids, _ = pl.data.calibration_batch(data, n=128, split="train", seed=0)
    params = dict(model.named_parameters())
    masked = {n: params[n].detach() * seq.masks[n] for n in seq.masks}
    pruned, dense = [], []
    for store, weights in ((pruned, masked), (dense, {})):
        handle = block1.register_forward_pre_hook(_block_inputs(store), with_kwargs=True)
        try:
            with torch.no_grad():
                for a in range(0, ids.shape[0], 8):
                    torch.func.functional_call(model, weights, (ids[a:a + 8],), {"use_cache": False})
        finally:
            handle.remove()
    assert torch.allclose(torch.cat(seen), torch.cat(pruned), atol=1e-6)
    assert (torch.cat(pruned) - torch.cat(dense)).abs().max() > 1e-2  # pruning block 0 did change them
    # block 0 is calibrated on the dense model either way; block 1's masks differ from the one-pass version
    for n in seq.masks:
        same = torch.equal(seq.masks[n], one.masks[n])
        assert same if ".layers.0." in n else not same, n
        assert int((~seq.masks[n]).sum()) == int((~one.masks[n]).sum())  # same exact counts
    assert_state_equal(model, before)


def test_sequential_on_a_model_without_blocks_goes_layer_by_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 6) * torch.tensor([1.0, 5.0, 0.2, 1.0, 3.0, 0.5])
    data = (x, torch.zeros(64, dtype=torch.long))
    assert [g for _, g in pl.methods.wanda.calibration_groups(net, ["0.weight", "2.weight", "4.weight"])] == \
        [["0.weight"], ["2.weight"], ["4.weight"]]
    seq = pl.prune(net, "wanda", 0.5, data=data, sequential=True)
    one = pl.prune(net, "wanda", 0.5, data=data)
    assert torch.equal(seq.masks["0.weight"], one.masks["0.weight"])  # the first layer sees the raw inputs
    assert not torch.equal(seq.masks["4.weight"], one.masks["4.weight"])
    # layer 4's norms: its inputs in the network whose layers 0 and 2 are pruned
    w = {n: p.detach() * seq.masks[n] for n, p in net.named_parameters() if n in seq.masks}
    norms = input_feature_norms(net, data, ["4.weight"], weights={k: v for k, v in w.items() if k != "4.weight"})
    k = int((~seq.masks["4.weight"]).sum())
    assert torch.equal(~row_pruned(wanda_scores(net[4].weight.detach(), norms["4.weight"]), k), seq.masks["4.weight"])
