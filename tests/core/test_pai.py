"""Pruning-at-init scores against their formulas (autograd, finite differences, conservation), the EOC / ordered
initialisers and the rescaling trick."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prune_lab.core import pai
from tests.conftest import SmallConvNet, assert_state_equal, randomize_bn, state_copy


def tanh_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def batch(n=7, d=6, classes=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------------------------------------------- SNIP
def test_snip_equals_autograd_on_a_copy():
    net = tanh_mlp()
    x, y = batch()
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    scores = pai.snip_scores(net, x, y)
    assert list(scores) == ["1.weight", "3.weight", "5.weight"]
    for n, p in ref.named_parameters():
        if n in scores:
            torch.testing.assert_close(scores[n], (p.detach() * p.grad).abs(), rtol=1e-6, atol=1e-8)


def test_snip_with_weight_overrides_scores_masked_weights_zero_and_uses_them():
    net = tanh_mlp()
    x, y = batch()
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(3)) > 0.5
    w = {"1.weight": net[1].weight.detach() * mask}
    s = pai.snip_scores(net, x, y, weights=w)
    assert (s["1.weight"][~mask] == 0).all()
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref[1].weight.mul_(mask)
    F.cross_entropy(ref(x), y).backward()
    torch.testing.assert_close(s["3.weight"], (ref[3].weight * ref[3].weight.grad).abs().detach())


def test_scores_never_modify_the_model_bn_in_train_mode(convnet):
    convnet.train()
    before = state_copy(convnet)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    pai.snip_scores(convnet, x, y)
    pai.grasp_scores(convnet, x, y)
    pai.synflow_scores(convnet, (1, 8, 8))
    pai.synflow_masks(convnet, (1, 8, 8), {"c1.weight": 20, "fc2.weight": 10}, rounds=3)
    assert_state_equal(convnet, before)  # running stats, weights, num_batches_tracked: bit for bit
    assert all(m.training for m in convnet.modules())
    assert all(p.grad is None for p in convnet.parameters())


# ------------------------------------------------------------------------------------------------------ GraSP
def test_grasp_equals_w_times_finite_difference_hessian_gradient_product():
    net = tanh_mlp(torch.float64)
    x, y = batch(dtype=torch.float64)
    names = ["1.weight", "3.weight", "5.weight"]
    params = dict(net.named_parameters())

    def grads_at(ws):
        state = {n: p.detach().clone() for n, p in params.items()}
        leaves = []
        for n in names:
            state[n] = ws[n].clone().requires_grad_(True)
            leaves.append(state[n])
        loss = F.cross_entropy(torch.func.functional_call(net, state, (x,)), y)
        return dict(zip(names, torch.autograd.grad(loss, leaves)))

    w0 = {n: params[n].detach() for n in names}
    g = grads_at(w0)
    eps = 1e-5
    plus = grads_at({n: w0[n] + eps * g[n] for n in names})
    minus = grads_at({n: w0[n] - eps * g[n] for n in names})
    scores = pai.grasp_scores(net, x, y)
    for n in names:
        hg = (plus[n] - minus[n]) / (2 * eps)
        torch.testing.assert_close(scores[n], w0[n] * hg, rtol=1e-6, atol=1e-10)
    assert any((s < 0).any() for s in scores.values()) and any((s > 0).any() for s in scores.values())


def test_grasp_temperature_divides_the_logits():
    net = tanh_mlp(torch.float64)
    x, y = batch(dtype=torch.float64)
    scaled = copy.deepcopy(net)
    with torch.no_grad():  # logits / 4 == a last layer (weight and bias) divided by 4
        scaled[5].weight.div_(4)
        scaled[5].bias.div_(4)
    a = pai.grasp_scores(net, x, y, temperature=4.0, names=["1.weight"])
    b = pai.grasp_scores(scaled, x, y, names=["1.weight"])
    torch.testing.assert_close(a["1.weight"], b["1.weight"])
    with pytest.raises(ValueError, match="temperature.*-1"):
        pai.grasp_scores(net, x, y, temperature=-1)


# ---------------------------------------------------------------------------------------------------- SynFlow
def bias_free_convnet():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))


def test_synflow_conserves_the_flow_in_every_layer():
    net = bias_free_convnet()
    s = pai.synflow_scores(net, (1, 8, 8))
    # R computed independently: |w| network on an all-ones input, in float64
    ref = copy.deepcopy(net).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.abs_()
    with torch.no_grad():
        r = float(ref(torch.ones(1, 1, 8, 8, dtype=torch.float64)).sum())
    assert r > 0
    for n, v in s.items():
        assert v.dtype == torch.float64 and (v >= 0).all()
        assert float(v.sum()) == pytest.approx(r, rel=1e-10), n
    norm = pai.synflow_scores(net, (1, 8, 8), normalize=True)
    assert [float(v.sum()) for v in norm.values()] == pytest.approx([1.0] * 4, rel=1e-10)


def test_synflow_matches_formula_on_a_two_layer_net():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
        net[2].weight.copy_(torch.tensor([[-1.0, 2.0]]))
    s = pai.synflow_scores(net, (2,))
    # R = Σ_j |v_j| Σ_k |W_jk|; score(W_jk) = |W_jk| |v_j|, score(v_j) = |v_j| Σ_k |W_jk|
    torch.testing.assert_close(s["0.weight"], torch.tensor([[1.0, 2.0], [1.0, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(s["2.weight"], torch.tensor([[3.0, 7.0]], dtype=torch.float64))


def test_synflow_masked_weights_score_zero():
    net = bias_free_convnet()
    m = {"6.weight": torch.rand(5, 64, generator=torch.Generator().manual_seed(0)) > 0.5}
    s = pai.synflow_scores(net, (1, 8, 8), masks=m)
    assert (s["6.weight"][~m["6.weight"]] == 0).all()


@settings(max_examples=12)
@given(st.integers(1, 12), st.floats(0.0, 0.99), st.sampled_from(["layerwise", "global"]))
def test_synflow_masks_exact_counts_and_determinism(rounds, s, scope):
    net = bias_free_convnet()
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    counts = {n: int(s * k + 0.5) for n, k in sizes.items()}
    a = pai.synflow_masks(net, (1, 8, 8), counts, rounds=rounds, scope=scope)
    b = pai.synflow_masks(net, (1, 8, 8), counts, rounds=rounds, scope=scope)
    assert all(torch.equal(a[n], b[n]) for n in a)
    pruned = {n: int((~m).sum()) for n, m in a.items()}
    if scope == "layerwise":
        assert pruned == counts
    else:
        assert sum(pruned.values()) == sum(counts.values())


def test_synflow_masks_start_masks_stay_pruned_and_one_round_is_one_shot():
    net = bias_free_convnet()
    start = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.3
             for n, p in net.named_parameters()}
    counts = {n: int((~m).sum()) + 5 for n, m in start.items()}
    m = pai.synflow_masks(net, (1, 8, 8), counts, rounds=4, masks=start)
    assert all(not (m[n] & ~start[n]).any() for n in m)
    one = pai.synflow_masks(net, (1, 8, 8), {"6.weight": 100}, rounds=1)
    s = pai.synflow_scores(net, (1, 8, 8))["6.weight"].reshape(-1)
    expect = torch.ones(s.numel(), dtype=torch.bool)
    expect[torch.sort(s, stable=True).indices[:100]] = False
    assert torch.equal(one["6.weight"].reshape(-1), expect)


def test_iterative_global_synflow_avoids_the_collapse_of_one_shot():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(),
                        nn.Linear(32, 10, bias=False))
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    total = sum(sizes.values())
    k = int(0.995 * total)
    # one shot, global: the largest layer collects the lowest scores (conservation) and empties
    s = pai.synflow_scores(net, (64,))
    allv = torch.cat([v.reshape(-1) for v in s.values()])
    thresh = torch.sort(allv).values[k - 1]
    one_shot_empty = [n for n, v in s.items() if (v > thresh).sum() == 0]
    counts, left = {}, k  # any split with the right total: the global scope only uses the total
    for n, size in sizes.items():
        counts[n] = min(size, left)
        left -= counts[n]
    it = pai.synflow_masks(net, (64,), counts, rounds=100, scope="global")
    assert sum(int((~m).sum()) for m in it.values()) == k
    assert one_shot_empty and all(m.any() for m in it.values())


def test_synflow_input_validation():
    net = bias_free_convnet()
    with pytest.raises(ValueError, match="input_shape.*\\(1, 0\\)"):
        pai.synflow_scores(net, (1, 0))
    with pytest.raises(ValueError, match="unknown scope 'local'.*'layerwise', 'global'"):
        pai.synflow_masks(net, (1, 8, 8), {"0.weight": 1}, scope="local")
    with pytest.raises(ValueError, match=r"counts\['0.weight'\].*\[0, 27\].*99"):
        pai.synflow_masks(net, (1, 8, 8), {"0.weight": 99})
    with pytest.raises(ValueError, match="rounds.*0"):
        pai.synflow_masks(net, (1, 8, 8), {"0.weight": 1}, rounds=0)
    assert pai.synflow_schedule(4, 0.0625) == pytest.approx([0.5, 0.25, 0.125, 0.0625])


# ------------------------------------------------------------------------------------------- EOC and ordered
def test_eoc_init_statistics_relu_linear_and_conv():
    net = nn.Sequential(nn.Linear(500, 400), nn.ReLU(), nn.Conv2d(8, 300, 5))
    before_rng = torch.random.get_rng_state()
    pai.eoc_init_(net, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before_rng)
    for m, fan_in in ((net[0], 500), (net[2], 8 * 25)):
        w = m.weight.detach().double()
        assert float(w.var() * fan_in) == pytest.approx(2.0, rel=0.02)
        assert abs(float(w.mean())) < 3 * math.sqrt(2.0 / fan_in / w.numel())
        assert (m.bias == 0).all()
    a = pai.eoc_init_(copy.deepcopy(net), seed=5)
    b = pai.eoc_init_(copy.deepcopy(net), seed=5)
    assert torch.equal(a[0].weight, b[0].weight)


def test_eoc_keeps_signal_norm_through_depth_ordered_phase_shrinks_it():
    def depth_ratio(init):
        torch.manual_seed(0)
        net = nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(256, 256), nn.ReLU())])
        init(net)
        x = torch.randn(64, 256)
        with torch.no_grad():
            return float(net(x).pow(2).mean() / (0.5 * x.pow(2).mean()))  # ReLU halves the first second moment

    eoc = depth_ratio(lambda n: pai.eoc_init_(n, seed=1))
    ordered = depth_ratio(lambda n: pai.ordered_init_(n, 1.0, seed=1))
    assert 0.3 < eoc < 3.0
    assert ordered < 1e-6  # (σ_w²/2)^30 = 2^-30


def test_tanh_eoc_pair_solves_chi_equals_one_by_monte_carlo():
    assert pai.eoc_sigma_w("tanh", 0.0) == pytest.approx(1.0)
    sw = pai.eoc_sigma_w("tanh", 0.3)
    assert 1.0 < sw < 2.0
    z = np.random.default_rng(0).standard_normal(400_000)
    q = 1.0
    for _ in range(40):
        q = sw ** 2 * np.mean(np.tanh(np.sqrt(q) * z) ** 2) + 0.09
    chi = sw ** 2 * np.mean((1 - np.tanh(np.sqrt(q) * z) ** 2) ** 2)
    assert chi == pytest.approx(1.0, abs=1e-2)
    net = pai.eoc_init_(nn.Sequential(nn.Linear(400, 400)), "tanh", 0.3, seed=0).requires_grad_(False)
    assert float(net[0].weight.var() * 400) == pytest.approx(sw ** 2, rel=0.02)
    assert float(net[0].bias.std()) == pytest.approx(0.3, rel=0.15)


def test_init_errors_name_argument_value_and_choices():
    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*'relu', 'tanh'"):
        pai.eoc_init_(net, "gelu")
    with pytest.raises(ValueError, match="sigma_b must be 0 for ReLU.*0.1"):
        pai.eoc_init_(net, "relu", 0.1)
    with pytest.raises(ValueError, match="sigma_w must be a positive.*-1"):
        pai.ordered_init_(net, -1)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        pai.eoc_init_(nn.Sequential(nn.ReLU()))


def test_ordered_init_statistics():
    net = pai.ordered_init_(nn.Sequential(nn.Linear(800, 500)), 0.8, 0.1, seed=0).requires_grad_(False)
    assert float(net[0].weight.double().var() * 800) == pytest.approx(0.64, rel=0.02)
    assert float(net[0].bias.std()) == pytest.approx(0.1, rel=0.2)


# ---------------------------------------------------------------------------------------------------- rescale
@given(st.integers(0, 10_000), st.floats(0.5, 4.0))
def test_rescaling_restores_row_norms(seed, sigma_w2):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Conv2d(5, 4, 3))
    masks = {"0.weight": torch.rand(5, 7, generator=g) > 0.6, "2.weight": torch.rand(4, 5, 3, 3, generator=g) > 0.9}
    masks["0.weight"][0] = False  # a dead unit stays dead
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    pai.rescale_(net, masks, sigma_w2=sigma_w2)
    for n, m in masks.items():
        w = dict(net.named_parameters())[n].detach()
        assert (w[~m] == 0).all()
        rows = w.double().pow(2).reshape(w.shape[0], -1).sum(1)
        alive = m.reshape(m.shape[0], -1).any(1)
        torch.testing.assert_close(rows[alive], torch.full_like(rows[alive], sigma_w2))
        assert (rows[~alive] == 0).all()
        # direction kept: each row is a positive multiple of the masked original
        orig = (before[n] * m).reshape(w.shape[0], -1)
        ratio = w.reshape(w.shape[0], -1)[m.reshape(m.shape[0], -1)] / orig[m.reshape(m.shape[0], -1)]
        assert (ratio > 0).all()
    assert torch.equal(net[0].bias, before["0.bias"])


def test_rescale_errors():
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="masks\\['0.weight'\\] must be a bool tensor of shape \\(2, 3\\)"):
        pai.rescale_(net, {"0.weight": torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'nope' is not a parameter"):
        pai.rescale_(net, {"nope": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="sigma_w2 must be a positive.*0"):
        pai.rescale_(net, {}, sigma_w2=0)


# --------------------------------------------------------------------------------------------------------------
# causal LMs: token ids with their attention mask, the mean next-token loss (prune_lab.core.losses)
# --------------------------------------------------------------------------------------------------------------
def test_snip_and_grasp_on_a_token_batch_use_the_next_token_loss():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.lm_helpers import pattern_ids, tiny_llama

    lm = tiny_llama(2)
    before = state_copy(lm)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    ids = pattern_ids(4, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)  # transformers' own loss, padding ignored
    params = dict(lm.named_parameters())
    snip = pai.snip_scores(lm, ids, mask, names=names)
    loss = lm(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    for n, g in zip(names, grads):
        assert torch.allclose(snip[n], (params[n].detach() * g).abs(), rtol=1e-4, atol=1e-9)
    grasp = pai.grasp_scores(lm, ids, mask, names=names)  # double backprop through attention
    with sdpa_kernel([SDPBackend.MATH]):
        loss = lm(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        hg = torch.autograd.grad(sum((t * t.detach()).sum() for t in g), [params[n] for n in names])
    for n, h in zip(names, hg):
        assert torch.allclose(grasp[n], params[n].detach() * h, rtol=1e-3, atol=1e-9)
        assert grasp[n].abs().max() > 0
    assert_state_equal(lm, before)


def test_a_token_batch_needs_two_tokens_and_image_inputs_stay_floating():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        pai._check_batch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="floating point.*attention mask"):
        pai._check_batch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
