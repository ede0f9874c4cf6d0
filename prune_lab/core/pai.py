"""Pruning at initialization: SNIP, GraSP and SynFlow scores (pure functions), and the initialisers of robust pruning
at initialization (Hayou et al., ICLR 2021): edge-of-chaos and ordered-phase init, and the rescaling trick.

Score functions never change the model: they evaluate it with ``torch.func.functional_call`` on detached copies of
its parameters and buffers (BatchNorm running statistics updated during the pass land in the copies), so the model's
tensors stay bit for bit what they were. Weights are ``(out, in)`` for Linear and ``(out, in // groups, *kernel)``
for Conv; every score has the shape of its weight, higher = keep.

The three functions with a trailing underscore (``eoc_init_``, ``ordered_init_``, ``rescale_``) are deliberate
in-place initialisers, like ``torch.nn.init``: a user calls them on their own model.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .capture import eval_mode
from .graph import PRUNABLE_TYPES, build_graph
from .losses import batch_loss, is_token_batch, lm_forward_kwargs, output_logits
from .validation import check_choice, check_labels, input_error, match_input_dtype, round_half_up

__all__ = [
    "snip_scores", "grasp_scores", "synflow_scores", "synflow_masks", "synflow_schedule",
    "eoc_sigma_w", "eoc_init_", "ordered_init_", "rescale_",
]

ACTIVATIONS = ("relu", "tanh")


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")


def _names(model: nn.Module, names) -> list:
    if names is None:
        names = build_graph(model).prunable
    names = list(names)
    params = dict(model.named_parameters())
    for n in names:
        if n not in params:
            raise ValueError(f"names: {n!r} is not a parameter of the model (its parameters: "
                             f"{', '.join(list(params)[:6])}{', …' if len(params) > 6 else ''}).")
    return names


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _state(model: nn.Module, weights: dict | None, *, device=None, dtype=None, absolute=False) -> dict:
    """Detached copies of every parameter and buffer (``weights`` override parameters by name), optionally on
    ``device``, cast to ``dtype`` (floating tensors only) and made non-negative."""
    weights = weights or {}
    params = dict(model.named_parameters())
    for n in weights:
        if n not in params:
            raise ValueError(f"weights: {n!r} is not a parameter of the model.")
    out = {}
    for n, t in list(params.items()) + list(model.named_buffers()):
        v = weights.get(n, t).detach()
        if device is not None:
            v = v.to(device)
        if v.is_floating_point():
            if dtype is not None:
                v = v.to(dtype)
            if absolute:
                v = v.abs()
        out[n] = v.clone()
    return out


def _check_batch(inputs, targets):
    """A classifier's batch (``inputs (N, ...)`` floating point, ``targets (N,)`` labels) or a causal LM's token
    batch (``inputs (N, L)`` integer ids, ``targets (N, L)`` their attention mask)."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"inputs and targets must be tensors, got {type(inputs).__name__} and "
                        f"{type(targets).__name__}.")
    if is_token_batch(inputs, targets):
        if inputs.shape[0] == 0 or inputs.shape[1] < 2:
            raise ValueError(f"a token batch needs at least one sequence of at least 2 tokens, got "
                             f"{tuple(inputs.shape)}.")
        return
    if inputs.dim() < 2 or targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"inputs must be (N, ...) and targets (N,) with the same N (or, for a causal LM, token ids "
                         f"(N, L) with their attention mask (N, L)), got {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}.")
    if inputs.shape[0] == 0:
        raise ValueError("inputs and targets are empty (N = 0): scoring needs at least one sample; all-zero "
                         "gradients would rank every weight alike.")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating point, got dtype {inputs.dtype}; token ids of a causal LM go "
                        f"with their attention mask of the same shape as targets.")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class labels, got dtype {targets.dtype}.")


def _loss_and_leaves(model, inputs, targets, weights, names, temperature=1.0, seed=0, double_backward=False):
    """The loss of :func:`prune_lab.core.losses.batch_loss` on the batch, with the weights ``names`` as leaves.
    ``double_backward``: attention runs on the math kernel of ``scaled_dot_product_attention`` (the fused kernels
    have no second derivative), as GraSP's Hessian-gradient product needs."""
    dev = _device(model)
    state = _state(model, weights, device=dev)
    leaves = []
    for n in names:
        state[n] = state[n].requires_grad_(True)
        leaves.append(state[n])
    tokens = is_token_batch(inputs, targets)
    # float32 data for a half-precision model: the inputs are cast to the model's precision
    x = inputs.to(dev) if tokens else match_input_dtype(inputs.to(dev), [state[n] for n in names])
    y = targets.to(dev)
    kw = lm_forward_kwargs(model, y) if tokens else {}
    kernel = sdpa_kernel([SDPBackend.MATH]) if double_backward else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), kernel:  # dropout, if any, draws from a fixed stream; RNG kept
        torch.manual_seed(int(seed))
        try:
            out = functional_call(model, state, (x,), kw)
        except RuntimeError as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError) or tokens:
                raise
            raise input_error(exc, x, what="data") from exc
    if not tokens:
        check_labels(targets, output_logits(out), what="data")
    loss = batch_loss(out, x, y, temperature=temperature)
    return loss, leaves


# --------------------------------------------------------------------------------------------------------------
# SNIP and GraSP
# --------------------------------------------------------------------------------------------------------------
def snip_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, weights: dict | None = None,
                names=None) -> dict:
    """SNIP (Lee et al. 2019), the sensitivity-based pruning of RPI: ``|w · ∂L/∂w|`` with ``L`` the mean
    cross-entropy on the batch ``inputs: (N, ...)``, ``targets: (N,)`` (or the mean next-token loss of a causal LM
    on token ids ``inputs: (N, L)`` with their attention mask ``targets: (N, L)``).

    ``weights``: ``{name: Tensor}`` used instead of the model's parameters (e.g. already-masked weights);
    ``names``: the weights to score (default: the prunable Linear/Conv weights). The model runs in its current
    train/eval mode on copies of its tensors; it is never modified.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> s = snip_scores(net, torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]))
    >>> s["0.weight"].shape, bool((s["2.weight"] >= 0).all())
    (torch.Size([3, 4]), True)
    """
    _check_model(model)
    _check_batch(inputs, targets)
    names = _names(model, names)
    loss, leaves = _loss_and_leaves(model, inputs, targets, weights, names)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return {n: (w.detach() * (g if g is not None else torch.zeros_like(w))).abs()
            for n, w, g in zip(names, leaves, grads)}


def grasp_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, weights: dict | None = None,
                 names=None, temperature: float = 1.0) -> dict:
    """GraSP (Wang et al. 2020) in prune_lab's keep-the-highest convention: ``w · (H g)``, with ``g = ∂L/∂w`` and
    ``H g`` the Hessian-gradient product over all scored weights together, computed by double backpropagation
    (``H g = ∂(gᵀ stop_grad(g))/∂w``). Wang et al. remove the weights with the highest ``−w · (H g)``, i.e. the
    lowest scores here. ``temperature`` divides the logits (Wang et al.'s code uses 200; 1 = plain loss).

    ``inputs: (N, ...)``, ``targets: (N,)`` (or a token batch, as in :func:`snip_scores`); ``weights``/``names`` as
    in :func:`snip_scores`. Scores are signed.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> s = grasp_scores(net, torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]))
    >>> s["0.weight"].shape
    torch.Size([3, 4])
    """
    _check_model(model)
    _check_batch(inputs, targets)
    if not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
    names = _names(model, names)
    loss, leaves = _loss_and_leaves(model, inputs, targets, weights, names, temperature=float(temperature),
                                    double_backward=True)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    pairs = [(w, g) for w, g in zip(leaves, grads) if g is not None and g.requires_grad]
    out = {n: torch.zeros_like(w.detach()) for n, w in zip(names, leaves)}
    if not pairs:
        return out
    z = sum((g * g.detach()).sum() for _, g in pairs)
    hg = torch.autograd.grad(z, [w for w, _ in pairs], allow_unused=True)
    by_id = {id(w): h for (w, _), h in zip(pairs, hg)}
    for n, w in zip(names, leaves):
        h = by_id.get(id(w))
        if h is not None:
            out[n] = w.detach() * h.detach()
    return out


# --------------------------------------------------------------------------------------------------------------
# SynFlow
# --------------------------------------------------------------------------------------------------------------
def check_input_shape(input_shape) -> tuple:
    """One sample's shape (without the batch dimension) as a tuple of positive ints; ``TypeError`` / ``ValueError``
    otherwise.

    >>> check_input_shape([1, 28, 28])
    (1, 28, 28)
    """
    try:
        shape = tuple(int(d) for d in input_shape)
    except TypeError as exc:
        raise TypeError(f"input_shape must be a sequence of positive ints (one sample, without the batch "
                        f"dimension, e.g. (1, 28, 28)), got {input_shape!r}.") from exc
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a sequence of positive ints (one sample, without the batch "
                         f"dimension, e.g. (1, 28, 28)), got {input_shape!r}.")
    return shape


def _synflow_pass(model, state, names, masks, input_shape, dtype):
    leaves = []
    for n in names:
        w = state[n] if masks is None or n not in masks else state[n] * masks[n].to(state[n].device, state[n].dtype)
        w = w.detach().requires_grad_(True)
        state[n] = w
        leaves.append(w)
    x = torch.ones((1, *input_shape), dtype=dtype, device=leaves[0].device if leaves else None)
    with eval_mode(model):
        try:
            r = functional_call(model, state, (x,)).sum()
        except RuntimeError as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            raise ValueError(f"input_shape {tuple(input_shape)} does not fit the model: it could not run on an input "
                             f"of shape {tuple(x.shape)}. input_shape is the shape of one sample without the batch "
                             f"dimension, e.g. (3, 224, 224) for an ImageNet model, (1, 28, 28) for MNIST. "
                             f"({exc})") from exc
    grads = torch.autograd.grad(r, leaves, allow_unused=True)
    scores = {n: (w.detach() * (g if g is not None else torch.zeros_like(w))).abs()
              for n, w, g in zip(names, leaves, grads)}
    return scores, r.detach()


def synflow_scores(model: nn.Module, input_shape: Sequence[int], *, weights: dict | None = None, names=None,
                   masks: dict | None = None, normalize: bool = False, dtype=torch.float64) -> dict:
    """One SynFlow scoring pass (Tanaka et al. 2020), data-free: every parameter and buffer replaced by its absolute
    value (copies), the model in eval mode, an all-ones input ``(1, *input_shape)``, ``R = 1ᵀ f(1)``; the score is
    ``|w · ∂R/∂w|``. ``masks`` (``{name: BoolTensor}``) zero pruned weights first. Computed in ``dtype`` (float64
    by default: ``R`` grows geometrically with depth). ``normalize`` divides every score by ``R`` (the ranking is
    unchanged; values stay in float32 range for deep nets).

    Property (conservation of synaptic flow): without biases, every layer's scores sum to ``R``.

    >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    >>> s = synflow_scores(net, (3,), normalize=True)
    >>> [round(float(v.sum()), 6) for v in s.values()]
    [1.0, 1.0]
    """
    _check_model(model)
    shape = check_input_shape(input_shape)
    names = _names(model, names)
    state = _state(model, weights, dtype=dtype, absolute=True)
    scores, r = _synflow_pass(model, state, names, masks, shape, dtype)
    if normalize:
        scores = {n: s / r if r > 0 else s for n, s in scores.items()}
    return scores


def synflow_schedule(rounds: int, density: float) -> list:
    """SynFlow's exponential schedule: the density after round ``k`` is ``density^(k / rounds)``, ``k = 1..rounds``.

    >>> [round(d, 4) for d in synflow_schedule(2, 0.01)]
    [0.1, 0.01]
    """
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}.")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}.")
    return [density ** (k / rounds) for k in range(1, int(rounds) + 1)]


def synflow_masks(model: nn.Module, input_shape: Sequence[int], counts: dict, *, rounds: int = 100,
                  scope: str = "layerwise", weights: dict | None = None, masks: dict | None = None,
                  dtype=torch.float64, progress: bool = False) -> dict:
    """Iterative SynFlow: prune in ``rounds`` rounds on the exponential schedule, rescoring (:func:`synflow_scores`)
    with the current masks before every round.

    ``counts``: ``{name: weights to prune}`` (the final budget). ``scope="layerwise"``: layer ``l`` follows its own
    schedule ``n_l · d_l^(k/rounds)`` down to exactly ``counts[l]`` pruned; ``scope="global"`` (Tanaka et al.'s
    setting): one threshold over all layers each round, down to ``Σ counts`` pruned in total (the per-layer split
    is then SynFlow's own). ``masks``: starting masks (their pruned weights stay pruned). Ties go to the earlier
    position (a stable sort). Returns ``{name: BoolTensor}`` (True = kept) of the weights' shapes.

    >>> net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    >>> m = synflow_masks(net, (6,), {"0.weight": 20, "2.weight": 9}, rounds=5)
    >>> [int((~v).sum()) for v in m.values()]
    [20, 9]
    """
    from tqdm.auto import tqdm

    _check_model(model)
    shape = check_input_shape(input_shape)
    check_choice(scope, ("layerwise", "global"), what="scope")
    if not isinstance(counts, dict) or not counts:
        raise TypeError(f"counts must be a non-empty dict {{name: number of weights to prune}}, got {counts!r}.")
    names = _names(model, list(counts))
    params = dict(model.named_parameters())
    sizes = {n: params[n].numel() for n in names}
    for n in names:
        c = counts[n]
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= sizes[n]:
            raise ValueError(f"counts[{n!r}] must be an int in [0, {sizes[n]}], got {c!r}.")
    schedule_rounds = synflow_schedule(rounds, 1.0)  # validates rounds
    del schedule_rounds
    base = _state(model, weights, dtype=dtype, absolute=True)
    dev = base[names[0]].device
    current = {n: torch.ones(params[n].shape, dtype=torch.bool, device=dev) for n in names}
    if masks is not None:
        for n in names:
            if n in masks:
                current[n] = current[n] & masks[n].to(dev, torch.bool)
    total_n = sum(sizes.values())
    total_c = sum(int(counts[n]) for n in names)
    for k in tqdm(range(1, int(rounds) + 1), desc="synflow", unit="round", disable=not progress, leave=False):
        scores, _ = _synflow_pass(model, dict(base), names, current, shape, dtype)
        flat = {n: torch.where(current[n], scores[n], torch.full_like(scores[n], -math.inf)).reshape(-1)
                for n in names}
        if scope == "layerwise":
            for n in names:
                keep_final = sizes[n] - int(counts[n])
                keep = keep_final if k == rounds else round_half_up(sizes[n] * (keep_final / sizes[n]) ** (k / rounds))
                keep = min(keep, int(current[n].sum()))
                order = torch.sort(flat[n], stable=True).indices
                m = torch.ones(sizes[n], dtype=torch.bool, device=dev)
                m[order[: sizes[n] - keep]] = False
                current[n] = m.reshape(current[n].shape)
        else:
            keep_final = total_n - total_c
            keep = keep_final if k == rounds else round_half_up(total_n * (keep_final / total_n) ** (k / rounds))
            keep = min(keep, sum(int(current[n].sum()) for n in names))
            allv = torch.cat([flat[n] for n in names])
            order = torch.sort(allv, stable=True).indices
            m = torch.ones(total_n, dtype=torch.bool, device=dev)
            m[order[: total_n - keep]] = False
            start = 0
            for n in names:
                current[n] = m[start:start + sizes[n]].reshape(current[n].shape)
                start += sizes[n]
    return current


# --------------------------------------------------------------------------------------------------------------
# Edge of chaos, ordered phase, rescaling
# --------------------------------------------------------------------------------------------------------------
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(101)  # ∫ f(z) φ(z) dz ≈ Σ w f(x) / √(2π)
_GH_W = _GH_W / math.sqrt(2 * math.pi)


def _tanh_chi(sigma_w: float, sigma_b: float) -> float:
    """``χ = σ_w² E[tanh'(√q* Z)²]`` at the variance fixed point ``q* = σ_w² E[tanh(√q* Z)²] + σ_b²``."""
    q = 1.0
    for _ in range(2000):
        q_new = sigma_w ** 2 * float(np.sum(_GH_W * np.tanh(math.sqrt(q) * _GH_X) ** 2)) + sigma_b ** 2
        if abs(q_new - q) < 1e-13:
            q = q_new
            break
        q = q_new
    d = 1.0 - np.tanh(math.sqrt(max(q, 0.0)) * _GH_X) ** 2
    return sigma_w ** 2 * float(np.sum(_GH_W * d ** 2))


def eoc_sigma_w(activation: str = "relu", sigma_b: float = 0.0) -> float:
    """The edge-of-chaos ``σ_w`` for ``activation`` and bias scale ``σ_b`` (Schoenholz et al. 2017; Hayou et al.
    2019): ReLU: ``√2`` (only with ``σ_b = 0``); tanh: the ``σ_w`` with ``χ = σ_w² E[tanh'(√q* Z)²] = 1`` at the
    variance fixed point ``q*``, found by bisection with Gauss-Hermite quadrature (``σ_b = 0`` gives 1).

    >>> round(eoc_sigma_w("relu"), 6), round(eoc_sigma_w("tanh", 0.0), 4)
    (1.414214, 1.0)
    """
    check_choice(activation, ACTIVATIONS, what="activation")
    if not isinstance(sigma_b, numbers.Real) or sigma_b < 0:
        raise ValueError(f"sigma_b must be a non-negative number, got {sigma_b!r}.")
    if activation == "relu":
        if sigma_b != 0:
            raise ValueError(f"sigma_b must be 0 for ReLU: its edge of chaos is (sigma_b, sigma_w) = (0, √2); "
                             f"got sigma_b={sigma_b!r}.")
        return math.sqrt(2.0)
    if sigma_b == 0:
        return 1.0
    lo, hi = 1.0, 5.0  # χ(1) < 1 for σ_b > 0, χ grows with σ_w
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _tanh_chi(mid, float(sigma_b)) < 1.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _gaussian_init_(model: nn.Module, sigma_w: float, sigma_b: float, generator=None) -> nn.Module:
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no Linear or Conv1d/2d/3d layer to initialise.")
    with torch.no_grad():
        for m in layers:
            fan_in = m.weight[0].numel()  # in (/ groups) × kernel taps
            w = torch.randn(m.weight.shape, generator=generator, dtype=torch.float32) * (sigma_w / math.sqrt(fan_in))
            m.weight.copy_(w)
            if m.bias is not None:
                b = torch.randn(m.bias.shape, generator=generator, dtype=torch.float32) * sigma_b
                m.bias.copy_(b)
    return model


def _check_sigma(value, what, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
            (value <= 0 if positive else value < 0):
        rule = "a positive" if positive else "a non-negative"
        raise ValueError(f"{what} must be {rule} finite number, got {value!r}.")
    return float(value)


def eoc_init_(model: nn.Module, activation: str = "relu", sigma_b: float = 0.0, *, seed: int | None = None) -> nn.Module:
    """Initialise every Linear/Conv layer of ``model`` **in place** on the edge of chaos: ``W ~ N(0, σ_w²/fan_in)``
    (``fan_in`` = inputs × kernel taps), ``b ~ N(0, σ_b²)`` with ``σ_w = eoc_sigma_w(activation, σ_b)`` (ReLU:
    ``√2`` and zero biases). ``seed`` draws from a private generator (the global RNG is untouched); ``None`` uses the
    global RNG. Returns ``model``.

    >>> net = eoc_init_(nn.Sequential(nn.Linear(400, 300)), seed=0)
    >>> round(float(net[0].weight.detach().var() * 400), 1), float(net[0].bias.detach().abs().max())
    (2.0, 0.0)
    """
    _check_model(model)
    sigma_b = _check_sigma(sigma_b, "sigma_b", positive=False)
    sigma_w = eoc_sigma_w(activation, sigma_b)
    g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return _gaussian_init_(model, sigma_w, sigma_b, g)


def ordered_init_(model: nn.Module, sigma_w: float, sigma_b: float = 0.0, *, seed: int | None = None) -> nn.Module:
    """Initialise every Linear/Conv layer **in place** with ``W ~ N(0, sigma_w²/fan_in)``, ``b ~ N(0, sigma_b²)``:
    with ``sigma_w`` below the edge of chaos (ReLU: ``< √2``) this is the ordered phase, where signals and
    gradients shrink geometrically with depth. ``seed`` as in :func:`eoc_init_`. Returns ``model``.

    >>> net = ordered_init_(nn.Sequential(nn.Linear(400, 300)), 1.0, seed=0)
    >>> round(float(net[0].weight.detach().var() * 400), 1)
    1.0
    """
    _check_model(model)
    sigma_w = _check_sigma(sigma_w, "sigma_w")
    sigma_b = _check_sigma(sigma_b, "sigma_b", positive=False)
    g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return _gaussian_init_(model, sigma_w, sigma_b, g)


def rescale_(model: nn.Module, masks: dict, sigma_w2: float = 2.0) -> nn.Module:
    """The rescaling trick of Hayou et al., **in place**: for every masked weight, each output unit's kept incoming
    weights are scaled so that their squared sum is ``sigma_w2`` (the pre-pruning expectation of
    ``Σ_j W_ij²`` under ``W ~ N(0, σ_w²/fan_in)``): ``W_i· ← ρ_i (δ_i· ⊙ W_i·)``,
    ``ρ_i = sqrt(σ_w² / Σ_j δ_ij W_ij²)`` (conv: sums over input channels and kernel taps). Pruned weights become
    exactly 0; a unit with no kept weight (or only zeros) stays 0. ``masks``: ``{name: BoolTensor}``, True = kept.
    Returns ``model``.

    >>> net = nn.Sequential(nn.Linear(4, 2))
    >>> m = {"0.weight": torch.tensor([[True, True, False, False], [True, False, False, False]])}
    >>> [round(float(v), 4) for v in rescale_(net, m)[0].weight.detach().pow(2).sum(1)]
    [2.0, 2.0]
    """
    _check_model(model)
    sigma_w2 = _check_sigma(sigma_w2, "sigma_w2")
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{name: BoolTensor}}, got {type(masks).__name__}.")
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in params:
            raise ValueError(f"masks: {n!r} is not a parameter of the model.")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != params[n].shape:
            got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"masks[{n!r}] must be a bool tensor of shape {tuple(params[n].shape)}, got {got}.")
        if params[n].dim() < 2:
            raise ValueError(f"masks[{n!r}]: rescaling needs a weight with an output-unit axis (dim >= 2).")
    with torch.no_grad():
        for n, m in masks.items():
            p = params[n]
            kept = p * m.to(p.device)
            sq = kept.double().pow(2).reshape(p.shape[0], -1).sum(1)
            rho = torch.where(sq > 0, torch.sqrt(sigma_w2 / sq.clamp_min(1e-300)), torch.zeros_like(sq))
            p.copy_((kept.double() * rho.reshape((-1,) + (1,) * (p.dim() - 1))).to(p.dtype))
    return model
