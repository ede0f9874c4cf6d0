"""Second-order math against dense formulas on small problems, plus properties."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from prune_lab.core import cbs as CBS
from prune_lab.core import fisher as FI
from prune_lab.core import obs_layerwise as LW
from tests.conftest import SmallConvNet, randomize_bn

D = torch.float64


def rand_fisher(n, d, lam=1e-2, seed=0, blocks=None):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g, dtype=D)
    return FI.EmpiricalFisher(G.clone(), lam, blocks), G


def dense_f(G, lam, blocks=None):
    d = G.shape[1]
    blocks = blocks or [(0, d)]
    F = torch.zeros(d, d, dtype=D)
    for s, e in blocks:
        F[s:e, s:e] = G[:, s:e].T @ G[:, s:e] / G.shape[0]
    return F + lam * torch.eye(d, dtype=D)


# ------------------------------------------------------------------------------------------- per-sample gradients
def test_per_sample_gradients_match_a_loop_of_autograd_calls():
    torch.manual_seed(0)
    net = randomize_bn(SmallConvNet()).train()  # in train mode on purpose: gradients are taken in eval mode
    names = ["c1.weight", "fc1.weight", "fc2.weight"]
    weights = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("weight")}
    x, y = torch.randn(7, 1, 8, 8), torch.randint(0, 3, (7,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    G = FI.per_sample_gradients(net, weights, names, x, y, chunk_size=3)
    assert G.shape == (7, sum(weights[n].numel() for n in names)) and G.dtype == D
    assert net.training  # modes restored
    ref = net.eval()
    for i in range(7):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        row = torch.cat([dict(ref.named_parameters())[n].grad.reshape(-1) for n in names]).to(D)
        torch.testing.assert_close(G[i], row, rtol=1e-4, atol=1e-6)
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v)


def test_per_sample_gradients_errors():
    net = nn.Sequential(nn.Linear(3, 2))
    w = {"0.weight": net[0].weight.detach()}
    with pytest.raises(ValueError, match="names"):
        FI.per_sample_gradients(net, w, [], torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="'1.weight'"):
        FI.per_sample_gradients(net, w, ["1.weight"], torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        FI.per_sample_gradients(net, w, ["0.weight"], torch.randn(2, 3), torch.tensor([0, 1]), chunk_size=0)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\).*from 0 to 7"):
        FI.per_sample_gradients(net, w, ["0.weight"], torch.randn(2, 3), torch.tensor([0, 7]))


# ------------------------------------------------------------------------------------------- the Fisher
def test_fisher_blocks_hand_cases_and_errors():
    assert FI.fisher_blocks([4, 3]) == [(0, 7)]
    assert FI.fisher_blocks([4, 3], blocks="layer") == [(0, 4), (4, 7)]
    assert FI.fisher_blocks([4, 3], blocks="full", block_size=3) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="'full', 'layer'.*'diag'"):
        FI.fisher_blocks([4], blocks="diag")
    with pytest.raises(ValueError, match="block_size"):
        FI.fisher_blocks([4], block_size=-1)


def test_fisher_hand_case():
    G = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=D)  # N = 2
    f = FI.EmpiricalFisher(G, 0.5)
    # F = 0.5 I + [[2, 2], [2, 4]] / 2 = [[1.5, 1], [1, 2.5]]
    torch.testing.assert_close(f.dense(), torch.tensor([[1.5, 1.0], [1.0, 2.5]], dtype=D))
    torch.testing.assert_close(f.diag(), torch.tensor([1.5, 2.5], dtype=D))
    torch.testing.assert_close(f.inverse_diag(), torch.tensor([2.5, 1.5], dtype=D) / 2.75)
    with pytest.raises(ValueError, match="damping"):
        FI.EmpiricalFisher(G, 0.0)
    with pytest.raises(ValueError, match="blocks"):
        FI.EmpiricalFisher(G, 1.0, [(0, 1)])


@pytest.mark.parametrize("n,d,blocks", [(5, 12, None), (20, 6, None), (6, 11, [(0, 4), (4, 9), (9, 11)])])
def test_woodbury_and_products_against_dense(n, d, blocks):
    """N < d uses Woodbury (no d×d inverse); N ≥ d or small blocks factor densely; both match a dense inverse."""
    lam = 1e-2
    f, G = rand_fisher(n, d, lam, blocks=blocks)
    F = dense_f(G, lam, blocks)
    Finv = torch.linalg.inv(F)
    v = torch.randn(d, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(f.dense(), F)
    torch.testing.assert_close(f.matvec(v), F @ v)
    torch.testing.assert_close(f.inverse_matvec(v), Finv @ v, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(f.inverse_matvec(v[:, 0]), Finv @ v[:, 0], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(f.inverse_diag(chunk=4), Finv.diagonal(), rtol=1e-7, atol=1e-9)
    idx = torch.tensor([0, d - 1, 3])
    torch.testing.assert_close(f.columns(idx), F[:, idx])
    torch.testing.assert_close(f.submatrix(idx, torch.tensor([1, 3])), F[idx][:, [1, 3]])
    keep = torch.rand(d, generator=torch.Generator().manual_seed(2)) < 0.6
    r = keep.nonzero().squeeze(1)
    expected = torch.zeros(d, dtype=D)
    expected[r] = torch.linalg.solve(F[r][:, r], v[r, 0])
    torch.testing.assert_close(f.restricted_solve(keep, v[:, 0]), expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(f.grads, G)  # inputs untouched


def test_woodbury_formula_of_methods_md():
    """F⁻¹ = (1/λ)(I − Gᵀ(NλI + GGᵀ)⁻¹G) — the identity the Woodbury blocks rely on."""
    lam, (n, d) = 1e-3, (4, 9)
    _, G = rand_fisher(n, d, lam)
    wood = (torch.eye(d, dtype=D) - G.T @ torch.linalg.inv(n * lam * torch.eye(n, dtype=D) + G @ G.T) @ G) / lam
    torch.testing.assert_close(wood, torch.linalg.inv(dense_f(G, lam)), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- OBS / WoodFisher
def test_obs_saliency_and_woodfisher_update_against_dense_formula():
    lam = 1e-2
    f, G = rand_fisher(6, 10, lam)
    Finv = torch.linalg.inv(dense_f(G, lam))
    w = torch.randn(10, dtype=D, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(FI.obs_saliency(w, f.inverse_diag()), w ** 2 / (2 * Finv.diagonal()))
    P = torch.zeros(10, dtype=torch.bool)
    P[[1, 4, 7]] = True
    u = torch.zeros(10, dtype=D)
    u[P] = w[P] / Finv.diagonal()[P]
    expected = w - Finv @ u
    expected[P] = 0
    torch.testing.assert_close(FI.woodfisher_update(f, w, P), expected)
    # one weight: the OBS update is the exact constrained optimum, i.e. it coincides with CBS-U
    one = torch.zeros(10, dtype=torch.bool)
    one[4] = True
    torch.testing.assert_close(FI.woodfisher_update(f, w, one), CBS.cbs_update(f, w, one))
    # and its modelled loss is the saliency
    dw = FI.woodfisher_update(f, w, one) - w
    assert float(dw @ dense_f(G, lam) @ dw) / 2 == pytest.approx(float(FI.obs_saliency(w, Finv.diagonal())[4]))


# ------------------------------------------------------------------------------------------- CBS
def test_obj_and_swap_terms_hand_case():
    # F = I (G = 0, λ = 1): Obj(P) = Σ_P w²; α_i = w_i² (i ∈ P), β_j = w_j², γ = 0
    f = FI.EmpiricalFisher(torch.zeros(1, 3, dtype=D), 1.0)
    w = torch.tensor([1.0, -2.0, 3.0])
    P = torch.tensor([True, True, False])
    assert CBS.cbs_objective(f, w, P) == 5.0
    a, b = CBS.swap_terms(f, w, P)
    assert a[:2].tolist() == [1.0, 4.0] and b[2].item() == 9.0


@given(st.integers(0, 10_000), st.integers(2, 12))
def test_swap_identity_against_direct_evaluation(seed, k):
    d = 14
    f, G = rand_fisher(5, d, 1e-2, seed=seed, blocks=[(0, 6), (6, 14)])
    F = dense_f(G, 1e-2, [(0, 6), (6, 14)])
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(d, dtype=D, generator=g)
    P = torch.zeros(d, dtype=torch.bool)
    P[torch.randperm(d, generator=g)[:k]] = True
    a, b = CBS.swap_terms(f, w, P)
    base = CBS.cbs_objective(f, w, P)
    wp = torch.where(P, w, torch.zeros_like(w))
    assert base == pytest.approx(float(wp @ F @ wp), rel=1e-10)
    for i in P.nonzero().squeeze(1).tolist():
        for j in (~P).nonzero().squeeze(1).tolist():
            Q = P.clone()
            Q[i], Q[j] = False, True
            gamma = 2 * w[i] * F[i, j] * w[j]
            assert CBS.cbs_objective(f, w, Q) - base == pytest.approx(float(-a[i] + b[j] - gamma), abs=1e-9)


@pytest.mark.parametrize("blocks", [None, [(0, 5), (5, 12)]])
def test_cbs_update_equals_lagrangian_form_and_zeroes_pruned(blocks):
    lam = 1e-2
    f, G = rand_fisher(4, 12, lam, blocks=blocks)  # N < |R|: the Woodbury path
    F = dense_f(G, lam, blocks)
    Finv = torch.linalg.inv(F)
    w = torch.randn(12, dtype=D, generator=torch.Generator().manual_seed(5))
    P = torch.zeros(12, dtype=torch.bool)
    P[[0, 3, 6, 10]] = True
    new = CBS.cbs_update(f, w, P)
    assert (new[P] == 0).all()
    torch.testing.assert_close(new, CBS.cbs_update_lagrangian(Finv, w, P), rtol=1e-7, atol=1e-9)
    # the resulting loss is w_Pᵀ[(F⁻¹)_PP]⁻¹w_P and no other feasible update does better
    dw = new - w
    p = P.nonzero().squeeze(1)
    assert float(dw @ F @ dw) == pytest.approx(float(w[p] @ torch.linalg.solve(Finv[p][:, p], w[p])), rel=1e-7)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        other = dw + torch.where(P, torch.zeros(12, dtype=D), 0.01 * torch.randn(12, dtype=D, generator=g))
        assert float(other @ F @ other) > float(dw @ F @ dw)


def test_random_magnitude_starts():
    w = torch.tensor([0.5, -0.1, 0.3, 0.05, -0.4, 0.2, 0.6, -0.7])
    units = [(0, 4), (4, 8)]
    p0 = CBS.random_magnitude_pruned(w, units, [2, 1], trial=0)
    assert p0.tolist() == [False, True, False, True, False, True, False, False]
    fixed = torch.zeros(8, dtype=torch.bool)
    fixed[0] = True
    for t in range(1, 6):
        p = CBS.random_magnitude_pruned(w, units, [2, 3], trial=t, chunks=2, fixed=fixed)
        assert int(p[:4].sum()) == 2 and int(p[4:].sum()) == 3 and p[0]
    big = torch.randn(40, generator=torch.Generator().manual_seed(0))
    base = CBS.random_magnitude_pruned(big, [(0, 40)], [20], trial=0)
    assert torch.equal(base, big.abs() <= big.abs().sort().values[19])
    others = [CBS.random_magnitude_pruned(big, [(0, 40)], [20], trial=t, chunks=4) for t in (1, 2)]
    assert all(int(p.sum()) == 20 for p in others) and not any(torch.equal(p, base) for p in others)
    assert torch.equal(others[0], CBS.random_magnitude_pruned(big, [(0, 40)], [20], trial=1, chunks=4))
    with pytest.raises(ValueError, match="already-pruned"):
        CBS.random_magnitude_pruned(w, units, [0, 1], trial=0, fixed=fixed)


@given(st.integers(0, 10_000), st.sampled_from(["global", "layer"]))
def test_cbs_never_ends_above_its_start_and_keeps_counts(seed, scope):
    d = 30
    f, G = rand_fisher(8, d, 1e-2, seed=seed)
    w = torch.randn(d, dtype=D, generator=torch.Generator().manual_seed(seed + 7))
    units, counts = ([(0, d)], [18]) if scope == "global" else ([(0, 12), (12, 30)], [7, 11])
    fixed = torch.zeros(d, dtype=torch.bool)
    fixed[[2, 20]] = True
    res = CBS.cbs_select(f, w, units, counts, trials=3, window=5, max_swaps=50, epsilon=1e-6, fixed=fixed)
    assert res.objective <= res.start_objective + 1e-12
    assert res.objective == pytest.approx(CBS.cbs_objective(f, w, res.pruned))
    assert all(int(res.pruned[s:e].sum()) == k for (s, e), k in zip(units, counts))
    assert res.pruned[2] and res.pruned[20]


def test_cbs_improves_on_a_case_where_magnitude_is_bad():
    """Two large weights that cancel each other (perfectly correlated gradients) are cheaper to remove together
    than a small weight: CBS finds the pair, magnitude does not. Hand values: F = λI + GᵀG/4, the (0, 1) block is
    1.25 everywhere, F_22 = F_33 = 2.25; magnitude prunes {0, 2, 3} (tie 0/1 to the first): Obj = 1.25 + 2·0.25·2.25
    (+ λ terms); swapping 2 out and 1 in gives 0.25·2.25 + 2λ."""
    G = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0]],
                     dtype=D)
    f = FI.EmpiricalFisher(G, 1e-3)
    w = torch.tensor([1.0, -1.0, 0.5, 0.5])  # w_0 + w_1 = 0: removing both changes no gradient direction
    res = CBS.cbs_select(f, w, [(0, 4)], [3], trials=1, window=4, epsilon=1e-6)
    assert res.start_objective == pytest.approx(1.25 + 2 * 0.25 * 2.25 + 1e-3 * 1.5)
    assert res.pruned[0] and res.pruned[1] and res.swaps == 1
    assert res.objective == pytest.approx(0.25 * 2.25 + 1e-3 * 2.25)


def test_cbs_keeps_the_lowest_loss_mask():
    f, _ = rand_fisher(8, 20, 1e-2, seed=1)
    w = torch.randn(20, dtype=D, generator=torch.Generator().manual_seed(2))
    start = CBS.random_magnitude_pruned(w, [(0, 20)], [10], trial=0)
    # a loss that prefers the magnitude start over anything the swaps reach
    res = CBS.cbs_select(f, w, [(0, 20)], [10], trials=1, eval_every=1, epsilon=1e-9,
                       loss_fn=lambda p: float((p ^ start).sum()))
    assert torch.equal(res.pruned, start) and res.loss == 0.0
    with pytest.raises(ValueError, match="count 21"):
        CBS.cbs_select(f, w, [(0, 20)], [21])


# ------------------------------------------------------------------------------------------- layerwise OBS
def _xh(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, c, generator=g, dtype=D) @ torch.randn(c, c, generator=g, dtype=D)  # correlated inputs
    return X, 2 * X.T @ X / n


@pytest.mark.parametrize("k,block_columns", [(0, 128), (13, 128), (30, 4), (47, 3)])
def test_layerwise_obs_reconstruction_not_worse_than_masking(k, block_columns):
    X, H = _xh(200, 12)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    mask, new = LW.obs_layerwise(W, H, k, block_columns=block_columns, damp=1e-6)
    assert mask.dtype == torch.bool and mask.shape == W.shape and int((~mask).sum()) == k
    assert (new[~mask] == 0).all() and new.dtype == W.dtype
    err_obs = ((W.to(D) - new.to(D)) @ X.T).norm()
    err_mask = ((W.to(D) - (W * mask).to(D)) @ X.T).norm()
    assert err_obs <= err_mask * (1 + 1e-6) + 1e-9
    if 0 < k < 50:
        assert err_obs < 0.9 * err_mask  # correlated inputs: the update really helps


def test_layerwise_obs_with_identity_hessian_is_magnitude_without_update():
    W = torch.tensor([[0.3, -0.1, 0.8], [0.05, 0.9, -0.2]])
    mask, new = LW.obs_layerwise(W, torch.eye(3), 3)
    assert mask.tolist() == [[True, False, True], [False, True, False]]
    torch.testing.assert_close(new, W * mask)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_layerwise_obs_nm_masks_valid(n, m):
    X, H = _xh(100, 16, seed=2)
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    mask, new = LW.obs_layerwise(W, H, nm=(n, m), block_columns=5)
    kept = mask.reshape(6, 16 // m, m).sum(-1)
    assert (kept == n).all()
    assert (new[~mask] == 0).all()
    assert ((W - new) @ X.T.float()).norm() <= ((W - W * mask) @ X.T.float()).norm() * (1 + 1e-5)


def test_layerwise_obs_errors():
    H = torch.eye(4)
    W = torch.ones(2, 4)
    with pytest.raises(ValueError, match="exactly one"):
        LW.obs_layerwise(W, H)
    with pytest.raises(ValueError, match="multiple of 3"):
        LW.obs_layerwise(W, H, nm=(1, 3))
    with pytest.raises(ValueError, match=r"n_pruned must be in \[0, 8\], got 9"):
        LW.obs_layerwise(W, H, 9)
    with pytest.raises(ValueError, match=r"H must be \(4, 4\)"):
        LW.obs_layerwise(W, torch.eye(3), 1)
    with pytest.raises(ValueError, match="'2:4'"):
        LW.parse_nm("2-4")
    with pytest.raises(ValueError, match="0 < N < M"):
        LW.parse_nm("4:2")


def test_layer_hessians_from_hooks_linear_and_conv():
    torch.manual_seed(0)
    net = randomize_bn(SmallConvNet().eval())
    weights = {n: p.detach() for n, p in net.named_parameters() if n.endswith("weight")}
    x = torch.randn(5, 1, 8, 8)
    H = LW.layer_inputs_hessian(net, weights, ["c2.weight", "fc2.weight"], x, batch_size=2)
    assert all(not m._forward_pre_hooks for m in net.modules())  # hooks removed
    seen = {}
    handles = [net.c2.register_forward_pre_hook(lambda m, i: seen.setdefault("c2", []).append(i[0])),
               net.fc2.register_forward_pre_hook(lambda m, i: seen.setdefault("fc2", []).append(i[0]))]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    a = seen["fc2"][0].to(D)
    torch.testing.assert_close(H["fc2.weight"], 2 * a.T @ a / 5)
    cols = nn.functional.unfold(seen["c2"][0], 3, padding=1).transpose(1, 2).reshape(-1, 36).to(D)
    torch.testing.assert_close(H["c2.weight"], 2 * cols.T @ cols / cols.shape[0])
    # the unfold order matches the conv weight's flattening: W_flat @ cols reproduces the conv output
    out = (net.c2.weight.reshape(6, -1).to(D) @ cols.T).T.reshape(5, 64, 6).permute(0, 2, 1).reshape(5, 6, 8, 8)
    ref = nn.functional.conv2d(seen["c2"][0], net.c2.weight, padding=1).to(D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        LW.layer_inputs_hessian(net, weights, ["b1.weight"], x)


def test_layerwise_saliency_formula():
    X, H = _xh(50, 6, seed=4)
    W = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=D)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(6, dtype=D)
    expected = W ** 2 / torch.linalg.inv(Hd).diagonal() ** 2
    torch.testing.assert_close(LW.obs_layerwise_saliency(W, H, 0.01), expected)
    assert math.isfinite(float(LW.obs_layerwise_saliency(W, torch.zeros(6, 6, dtype=D)).sum()))


def test_layerwise_obs_keeps_fixed_weights_pruned():
    X, H = _xh(100, 8, seed=6)
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    fixed = torch.zeros(4, 8, dtype=torch.bool)
    fixed[0, 0] = fixed[3, 7] = fixed[1, 4] = True
    W = W.masked_fill(fixed, 0.0)  # already pruned: zero, yet the updates of earlier columns would revive them
    mask, new = LW.obs_layerwise(W, H, 12, block_columns=3, fixed=fixed)
    assert not (mask & fixed).any() and int((~mask).sum()) == 12 and (new[fixed] == 0).all()
    mask, _ = LW.obs_layerwise(W, H, nm=(2, 4), fixed=fixed)
    assert not (mask & fixed).any() and (mask.reshape(4, 2, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="below the 3"):
        LW.obs_layerwise(W, H, 2, fixed=fixed)


# ---------------------------------------------------------------------------------------------------------------
# layerwise OBS streams the layer Hessians
# ---------------------------------------------------------------------------------------------------------------
def _obs_setup():
    import prune_lab as pl

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(),
                        nn.Linear(10, 5))
    data = pl.data.synthetic(n_train=64, n_test=16, input_shape=(12,), num_classes=5)
    return pl, net, data


@pytest.fixture
def live_hessians(monkeypatch):
    """Tracks every Hessian the capture returns until it is freed (weakref finalizers): ``peak`` = the most alive
    at once, measured right after each capture."""
    import weakref

    state = {"live": set(), "peak": 0, "made": 0}
    original = LW._capture_hessians

    def tracking(*a, **k):
        got = original(*a, **k)
        for h in got.values():
            token = state["made"] = state["made"] + 1
            state["live"].add(token)
            weakref.finalize(h, state["live"].discard, token)
        state["peak"] = max(state["peak"], len(state["live"]))
        return got

    monkeypatch.setattr(LW, "_capture_hessians", tracking)
    return state


def test_layerwise_obs_holds_one_hessian_at_a_time_beyond_the_budget(live_hessians, monkeypatch):
    """With no room for Hessians (``max_bytes = 0``) the method computes one layer's Hessian, uses it and frees it
    before the next: at most one alive, whatever the number of layers. Holding them all would make it 4."""
    pl, net, data = _obs_setup()
    monkeypatch.setattr(LW.LayerHessians, "max_bytes", 0)
    session = pl.PruneSession(net, data, device="cpu")
    streamed = session.prune("obs_layerwise", 0.6, n_samples=32)
    _ = streamed.masks
    assert live_hessians["peak"] == 1
    assert live_hessians["made"] >= 2 * 4  # scores, then masks: each layer's Hessian made again (not kept)
    monkeypatch.setattr(LW.LayerHessians, "max_bytes", 1 << 30)  # room for all: one pass, all kept, same results
    live_hessians.update(peak=0, made=0, live=set())
    kept = pl.PruneSession(net, data, device="cpu").prune("obs_layerwise", 0.6, n_samples=32)
    assert live_hessians["peak"] == 4 and live_hessians["made"] == 4
    assert all(torch.equal(streamed.masks[n], kept.masks[n]) for n in kept.layers)
    assert all(torch.equal(streamed.weights[n], kept.weights[n]) for n in kept.layers)


def test_layer_hessians_budget_groups_layers_into_passes():
    _, net, _ = _obs_setup()
    weights = {n: p.detach() for n, p in net.named_parameters() if n.endswith("weight")}
    names = list(weights)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    full = LW.layer_inputs_hessian(net, weights, names, x, batch_size=16)
    # Hessian bytes: 12²·8, 20²·8, 16²·8, 10²·8; a budget of 20²·8 + 16²·8 takes layers 1, 2 and 4 in the first
    # pass (the 3rd no longer fits) and the 3rd in a second pass, not kept
    for budget, passes in ((10**9, 1), (0, 4), (20 * 20 * 8 + 16 * 16 * 8, 2)):
        H = LW.LayerHessians(net, weights, names, x, batch_size=16, max_bytes=budget)
        for n in names:
            assert torch.equal(H[n], full[n])  # the same numbers as one pass for all
        assert H.passes == passes
        assert sum(h.numel() * 8 for h in H.kept.values()) <= budget
    assert all(not m._forward_pre_hooks for m in net.modules())


# ---------------------------------------------------------------------------------------------------------------
# causal LMs: a sample is a sequence, its loss the mean next-token loss (prune_lab.core.losses)
# ---------------------------------------------------------------------------------------------------------------
def _hf_sequence_grads(lm, names, ids, mask):
    """Each sequence's gradient of transformers' own next-token loss (positions with a padded input or target
    ignored), by plain autograd one sequence at a time."""
    params = dict(lm.named_parameters())
    rows = []
    for i in range(ids.shape[0]):
        x, m = ids[i:i + 1], mask[i:i + 1]
        labels = torch.full_like(x, -100)
        labels[:, 1:] = torch.where((m[:, :-1] > 0) & (m[:, 1:] > 0), x[:, 1:], -100)
        loss = lm(x, attention_mask=m, labels=labels, use_cache=False).loss
        g = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([t.reshape(-1) for t in g]).double())
    return torch.stack(rows)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_per_sample_gradients_of_a_causal_lm_are_each_sequences_next_token_loss(padding):
    from tests.lm_helpers import pattern_ids, tiny_llama

    lm = tiny_llama(1)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    weights = {n: p.detach() for n, p in lm.named_parameters() if n in names}
    ids = pattern_ids(3, 10, seed=4)
    mask = torch.ones_like(ids)
    if padding == "right":  # batched with vmap, without the attention mask: causal attention never sees the padding
        mask[1, 6:] = 0
    elif padding == "left":  # one sequence at a time, with the attention mask
        mask[0, :3] = 0
    g = FI.per_sample_gradients(lm, weights, names, ids, mask, chunk_size=2)
    ref = _hf_sequence_grads(lm, names, ids, mask)
    assert g.shape == (3, sum(weights[n].numel() for n in names))
    assert torch.allclose(g, ref, rtol=1e-4, atol=1e-7)
    assert (g[0] - g[1]).abs().max() > 1e-4  # per sequence, not one shared gradient


def test_layer_hessians_of_a_causal_lm_leave_padding_out():
    from tests.lm_helpers import pattern_ids, tiny_llama

    lm = tiny_llama(3)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    weights = {n: p.detach() for n, p in lm.named_parameters() if n in names}
    ids = pattern_ids(2, 10, seed=6)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    H = LW.layer_inputs_hessian(lm, weights, names, ids, mask=mask)
    lengths = [10, 6]  # each sequence alone, without its padding: the same real-token activations
    parts = [LW.layer_inputs_hessian(lm, weights, names, ids[i:i + 1, :k]) for i, k in enumerate(lengths)]
    for n in names:
        ref = sum(p[n] * k for p, k in zip(parts, lengths)) / sum(lengths)
        assert torch.allclose(H[n], ref, rtol=1e-6, atol=1e-9)
    unmasked = LW.layer_inputs_hessian(lm, weights, names, ids)  # the padding rows counted: a different H
    assert not torch.allclose(unmasked[names[0]], H[names[0]], rtol=1e-3)
    lazy = LW.LayerHessians(lm, weights, names, ids, mask=mask, max_bytes=0)
    assert torch.allclose(lazy[names[1]], H[names[1]], rtol=1e-9)
