"""Second-order pruning math: per-sample gradients, the damped empirical Fisher, OBS / WoodFisher saliency and
update, the Combinatorial Brain Surgeon (CBS-S swap search, CBS-U update) and layerwise OBS (Cholesky-based,
unstructured and N:M).

Flat index space: the prunable weights flattened (row-major) and concatenated in the given layer order, ``d``
entries in all. The empirical Fisher is ``F = λI + GᵀG/N`` with ``G: (N, d)`` the per-sample gradients; it is
block-diagonal over contiguous ranges of the flat index space (one block for the full Fisher, one per layer, or
chunks of at most ``B`` weights). ``F`` is never formed as a ``d×d`` matrix unless a block is smaller than ``N``:
products are ``F·v = Gᵀ(Gv)/N + λv`` and the inverse goes through Woodbury,
``F⁻¹ = (1/λ)(I − Gᵀ(NλI + GGᵀ)⁻¹G)``, with one ``N×N`` Cholesky factor per block.

Everything here is a pure function of its inputs (tensors are read, never written).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .validation import input_error, match_input_dtype

__all__ = [
    "per_sample_gradients", "EmpiricalFisher", "fisher_blocks", "obs_saliency", "woodfisher_update",
    "cbs_objective", "swap_terms", "cbs_update", "cbs_update_lagrangian", "random_magnitude_pruned",
    "cbs_select", "CBSResult", "layer_inputs_hessian", "LayerHessians", "obs_layerwise", "obs_layerwise_saliency",
    "parse_nm",
]

_DT = torch.float64


def _tqdm(*args, **kw):
    from tqdm.auto import tqdm

    return tqdm(*args, **kw)


# ---------------------------------------------------------------------------------------------------------------
# per-sample gradients
# ---------------------------------------------------------------------------------------------------------------
def per_sample_gradients(model: nn.Module, weights: dict, names: list, x: torch.Tensor, y: torch.Tensor, *,
                         chunk_size: int = 256, progress: bool = False) -> torch.Tensor:
    """Per-sample gradients of the cross-entropy loss w.r.t. the weights ``names``, as one ``(N, d)`` float64
    matrix (row n: the flattened gradients of sample n, layers concatenated in ``names`` order).

    ``model`` is evaluated with ``torch.func.functional_call`` in eval mode (its modes are restored; its
    parameters are never touched); ``weights``: ``{name: tensor}`` overriding the model's parameters (must hold
    every name of ``names``; other entries are used as fixed values); ``x: (N, ...)``, ``y: (N,)`` int labels.
    Computed with ``vmap(grad(...))`` in chunks of ``chunk_size`` samples so memory stays bounded.

    >>> net = nn.Sequential(nn.Linear(3, 2, bias=False))
    >>> g = per_sample_gradients(net, {"0.weight": net[0].weight.detach()}, ["0.weight"], torch.randn(5, 3),
    ...                          torch.tensor([0, 1, 0, 1, 1]))
    >>> tuple(g.shape)
    (5, 6)
    """
    if not names:
        raise ValueError("names must list at least one weight to differentiate, got an empty list.")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"weights has no entry for {missing[0]!r}; it must hold every name in names.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}.")
    if x.shape[0] == 0:
        raise ValueError("x and y are empty (N = 0): the empirical Fisher needs at least one sample's gradient.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    fixed = {k: v.detach() for k, v in model.named_parameters()}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})
    fixed.update({k: v.detach() for k, v in weights.items() if k not in names})
    variables = {n: weights[n].detach() for n in names}
    dev = variables[names[0]].device

    def loss_one(var, xi, yi):
        out = functional_call(model, {**fixed, **var}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    sizes = [variables[n].numel() for n in names]
    out = torch.empty(x.shape[0], sum(sizes), dtype=_DT, device=dev)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        x = match_input_dtype(x, list(variables.values()))  # float32 data, half-precision model: cast
        with torch.no_grad():
            try:
                n_out = functional_call(model, {**fixed, **variables}, (x[:1].to(dev),)).shape[-1]
            except RuntimeError as exc:
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                raise input_error(exc, x, what="data") from exc
        if int(y.min()) < 0 or int(y.max()) >= n_out:
            raise ValueError(f"data: labels must be class indices in [0, {n_out}) for a model with {n_out} outputs; "
                             f"got labels from {int(y.min())} to {int(y.max())}. Do the data and the model match?")
        starts = range(0, x.shape[0], chunk_size)
        for a in _tqdm(starts, desc="per-sample gradients", disable=not progress or None, leave=False):
            xb, yb = x[a:a + chunk_size].to(dev), y[a:a + chunk_size].to(dev)
            g = per_sample(variables, xb, yb)
            out[a:a + xb.shape[0]] = torch.cat([g[n].reshape(xb.shape[0], -1) for n in names], dim=1).to(_DT)
    finally:
        for m, training in modes:
            m.training = training
    return out


# ---------------------------------------------------------------------------------------------------------------
# the empirical Fisher
# ---------------------------------------------------------------------------------------------------------------
def fisher_blocks(sizes: list, *, blocks: str = "full", block_size: int = 0) -> list:
    """Block boundaries ``[(start, stop), ...]`` over a flat index space made of layers of ``sizes`` weights.

    ``blocks="full"``: one block; ``"layer"``: one per layer; ``block_size`` > 0 further splits every block into
    contiguous chunks of at most that many weights.

    >>> fisher_blocks([4, 3], blocks="layer", block_size=2)
    [(0, 2), (2, 4), (4, 6), (6, 7)]
    """
    if blocks not in ("full", "layer"):
        raise ValueError(f"blocks must be one of 'full', 'layer', got {blocks!r}.")
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0 (0 = no split), got {block_size!r}.")
    bounds, a = [], 0
    for s in sizes:
        bounds.append((a, a + s))
        a += s
    if blocks == "full":
        bounds = [(0, a)]
    if block_size:
        bounds = [(s, min(s + block_size, e)) for b, e in bounds for s in range(b, e, block_size)]
    return [(s, e) for s, e in bounds if e > s]


@dataclass
class EmpiricalFisher:
    """The damped empirical Fisher ``F = λI + GᵀG/N``, block-diagonal over ``blocks``.

    ``grads: (N, d)`` per-sample gradients (float64), ``damping``: λ > 0, ``blocks``: ``[(start, stop)]`` covering
    ``0..d`` (default: one block). No ``d×d`` matrix is formed for a block larger than N; smaller blocks are
    factored densely. Factorisations are computed on first use and kept.

    >>> G = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    >>> f = EmpiricalFisher(G, 0.5)
    >>> torch.allclose(f.dense(), 0.5 * torch.eye(3, dtype=torch.float64) + G.T @ G / 2)
    True
    >>> torch.allclose(f.inverse_diag(), torch.linalg.inv(f.dense()).diagonal())
    True
    """

    grads: torch.Tensor
    damping: float
    blocks: list | None = None
    _factors: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.grads.dim() != 2:
            raise ValueError(f"grads must be a (N, d) matrix, got shape {tuple(self.grads.shape)}.")
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0 (the λ of F = λI + GᵀG/N), got {self.damping!r}.")
        self.grads = self.grads.to(_DT)
        d = self.grads.shape[1]
        if self.blocks is None:
            self.blocks = [(0, d)]
        covered = sorted(self.blocks)
        if covered[0][0] != 0 or covered[-1][1] != d or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise ValueError(f"blocks must be contiguous ranges covering 0..{d}, got {self.blocks[:4]}...")
        self.blocks = covered

    @property
    def n(self) -> int:
        return self.grads.shape[0]

    @property
    def d(self) -> int:
        return self.grads.shape[1]

    def block_index(self) -> torch.Tensor:
        """``(d,)`` long: the block number of every flat index."""
        out = torch.empty(self.d, dtype=torch.long, device=self.grads.device)
        for b, (s, e) in enumerate(self.blocks):
            out[s:e] = b
        return out

    def _g(self, b):
        s, e = self.blocks[b]
        return self.grads[:, s:e]

    def _factor(self, b):
        """``("dense", L)`` with ``L Lᵀ = F_b`` or ``("woodbury", L)`` with ``L Lᵀ = NλI + G_b G_bᵀ``."""
        hit = self._factors.get(b)
        if hit is None:
            g, lam, n = self._g(b), self.damping, self.n
            if g.shape[1] <= n:
                mat = g.T @ g / n
                mat.diagonal().add_(lam)
                hit = ("dense", torch.linalg.cholesky(mat))
            else:
                mat = g @ g.T
                mat.diagonal().add_(n * lam)
                hit = ("woodbury", torch.linalg.cholesky(mat))
            self._factors[b] = hit
        return hit

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F·v`` for ``v: (d,)`` or ``(d, k)``, as ``Gᵀ(Gv)/N + λv`` block by block."""
        v = v.to(_DT)
        out = self.damping * v
        for b, (s, e) in enumerate(self.blocks):
            g = self._g(b)
            out[s:e] += g.T @ (g @ v[s:e]) / self.n
        return out

    def diag(self) -> torch.Tensor:
        """``(d,)``: ``F_ii = λ + Σ_n G_ni² / N``."""
        return self.grads.pow(2).sum(0) / self.n + self.damping

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """``(d, k)``: the columns ``F[:, idx]`` (zero outside each index's block)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.grads.device)
        out = torch.zeros(self.d, idx.numel(), dtype=_DT, device=self.grads.device)
        bi = self.block_index()[idx]
        for b in bi.unique().tolist():
            s, e = self.blocks[b]
            sel = (bi == b).nonzero().squeeze(1)
            g = self._g(b)
            out[s:e, sel] = g.T @ self.grads[:, idx[sel]] / self.n
        out[idx, torch.arange(idx.numel(), device=idx.device)] += self.damping
        return out

    def submatrix(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``F[rows][:, cols]``: ``(len(rows), len(cols))``, zero between different blocks."""
        gi, gj = self.grads[:, rows], self.grads[:, cols]
        out = gi.T @ gj / self.n
        bidx = self.block_index()
        out = out * (bidx[rows][:, None] == bidx[cols][None, :])
        out = out + self.damping * (rows[:, None] == cols[None, :])
        return out

    def inverse_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F⁻¹·v`` for ``v: (d,)`` or ``(d, k)``; Woodbury for blocks larger than N."""
        v = v.to(_DT)
        squeeze = v.dim() == 1
        v = v.reshape(self.d, -1)
        out = torch.empty_like(v)
        for b, (s, e) in enumerate(self.blocks):
            kind, L = self._factor(b)
            if kind == "dense":
                out[s:e] = torch.cholesky_solve(v[s:e], L)
            else:
                g = self._g(b)
                out[s:e] = (v[s:e] - g.T @ torch.cholesky_solve(g @ v[s:e], L)) / self.damping
        return out.squeeze(1) if squeeze else out

    def inverse_diag(self, chunk: int = 8192) -> torch.Tensor:
        """``(d,)``: the diagonal of ``F⁻¹``, without a ``d×d`` inverse: ``(1/λ)(1 − Σ_n G_ni (K⁻¹G)_ni)`` with
        ``K = NλI + GGᵀ`` for blocks larger than N (in column chunks of ``chunk``)."""
        out = torch.empty(self.d, dtype=_DT, device=self.grads.device)
        for b, (s, e) in enumerate(self.blocks):
            kind, L = self._factor(b)
            if kind == "dense":
                out[s:e] = torch.cholesky_inverse(L).diagonal()
            else:
                g = self._g(b)
                for a in range(0, e - s, chunk):
                    gc = g[:, a:a + chunk]
                    out[s + a:s + a + gc.shape[1]] = (1 - (gc * torch.cholesky_solve(gc, L)).sum(0)) / self.damping
        return out

    def dense(self) -> torch.Tensor:
        """The ``(d, d)`` matrix (for tests and small problems only)."""
        out = torch.zeros(self.d, self.d, dtype=_DT, device=self.grads.device)
        for b, (s, e) in enumerate(self.blocks):
            g = self._g(b)
            out[s:e, s:e] = g.T @ g / self.n
        out.diagonal().add_(self.damping)
        return out

    def restricted_solve(self, keep: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``F_RR⁻¹ · rhs`` for the index set ``keep`` (bool ``(d,)``) and ``rhs: (d,)`` (read on R; zero elsewhere
        in the result), block by block; Woodbury with ``G_R`` when a block keeps more than N weights."""
        rhs = rhs.to(_DT)
        out = torch.zeros(self.d, dtype=_DT, device=self.grads.device)
        n, lam = self.n, self.damping
        for b, (s, e) in enumerate(self.blocks):
            r = keep[s:e].nonzero().squeeze(1) + s
            if r.numel() == 0:
                continue
            gr = self.grads[:, r]
            if r.numel() <= n:
                mat = gr.T @ gr / n
                mat.diagonal().add_(lam)
                out[r] = torch.cholesky_solve(rhs[r].unsqueeze(1), torch.linalg.cholesky(mat)).squeeze(1)
            else:
                mat = gr @ gr.T
                mat.diagonal().add_(n * lam)
                L = torch.linalg.cholesky(mat)
                y = rhs[r]
                out[r] = (y - gr.T @ torch.cholesky_solve((gr @ y).unsqueeze(1), L).squeeze(1)) / lam
        return out


# ---------------------------------------------------------------------------------------------------------------
# OBS / WoodFisher
# ---------------------------------------------------------------------------------------------------------------
def obs_saliency(w: torch.Tensor, inverse_diag: torch.Tensor) -> torch.Tensor:
    """OBS / WoodFisher saliency ``ρ_q = w_q² / (2 [F⁻¹]_qq)``: the modelled loss increase of removing weight q
    alone (with the optimal update of the others). ``w``, ``inverse_diag``: ``(d,)``.

    >>> obs_saliency(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 2.0])).tolist()
    [4.0, 0.25]
    """
    return w.to(_DT).pow(2) / (2 * inverse_diag.to(_DT))


def woodfisher_update(fisher: EmpiricalFisher, w: torch.Tensor, pruned: torch.Tensor,
                      inverse_diag: torch.Tensor | None = None) -> torch.Tensor:
    """Weights after removing the set ``pruned`` (bool ``(d,)``) with the WoodFisher update
    ``δw = −F⁻¹ Σ_{q∈P} (w_q / [F⁻¹]_qq) e_q`` (single-weight OBS updates summed); pruned entries are exactly 0.
    Returns ``(d,)`` float64.

    >>> f = EmpiricalFisher(torch.eye(2, dtype=torch.float64), 1.0)
    >>> woodfisher_update(f, torch.tensor([1.0, 2.0]), torch.tensor([True, False])).tolist()
    [0.0, 2.0]
    """
    w = w.to(_DT)
    if inverse_diag is None:
        inverse_diag = fisher.inverse_diag()
    u = torch.where(pruned, w / inverse_diag, torch.zeros_like(w))
    out = w - fisher.inverse_matvec(u)
    return torch.where(pruned, torch.zeros_like(out), out)


# ---------------------------------------------------------------------------------------------------------------
# CBS
# ---------------------------------------------------------------------------------------------------------------
def cbs_objective(fisher: EmpiricalFisher, w: torch.Tensor, pruned: torch.Tensor) -> float:
    """``Obj(P) = w_Pᵀ F_PP w_P`` (twice the modelled loss increase of removing P without update).

    >>> f = EmpiricalFisher(torch.zeros(1, 2, dtype=torch.float64), 1.0)
    >>> cbs_objective(f, torch.tensor([3.0, 4.0]), torch.tensor([True, False]))
    9.0
    """
    wp = torch.where(pruned, w.to(_DT), torch.zeros((), dtype=_DT))
    return float(wp @ fisher.matvec(wp))


def swap_terms(fisher: EmpiricalFisher, w: torch.Tensor, pruned: torch.Tensor, fwp: torch.Tensor | None = None,
               diag: torch.Tensor | None = None):
    """``(α, β)``, both ``(d,)``: with ``(Fw_P)_i = Σ_{m∈P} F_im w_m``, ``α_i = 2 w_i (Fw_P)_i − F_ii w_i²`` (the
    decrease of Obj when i leaves P; meaningful for i ∈ P) and ``β_j = 2 w_j (Fw_P)_j + F_jj w_j²`` (the increase
    when j joins P; meaningful for j ∉ P). Swapping i out and j in changes Obj by ``−α_i + β_j − γ_ij`` with
    ``γ_ij = 2 w_i F_ij w_j``.

    >>> f = EmpiricalFisher(torch.zeros(1, 2, dtype=torch.float64), 1.0)
    >>> [t.tolist() for t in swap_terms(f, torch.tensor([1.0, 2.0]), torch.tensor([True, False]))]
    [[1.0, -4.0], [3.0, 4.0]]
    """
    w = w.to(_DT)
    if fwp is None:
        fwp = fisher.matvec(torch.where(pruned, w, torch.zeros_like(w)))
    if diag is None:
        diag = fisher.diag()
    a = 2 * w * fwp
    w2f = diag * w * w
    return a - w2f, a + w2f


def cbs_update(fisher: EmpiricalFisher, w: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """CBS-U: the exact minimiser of ``δwᵀ F δw`` subject to ``δw_P = −w_P``: ``δw_R = F_RR⁻¹ F_RP w_P``
    (R = kept; setting the gradient ``2F_RR δw_R + 2F_RP δw_P`` to zero), the same as the Lagrangian form
    ``δw = −F⁻¹E_P[(F⁻¹)_PP]⁻¹w_P``. Returns the new weights ``w + δw``, ``(d,)`` float64, exactly 0 on P. ``F_RP w_P`` is
    ``G_Rᵀ(G_P w_P)/N`` (no λ term off the diagonal); ``F_RR⁻¹`` goes through Woodbury when R is larger than N.

    >>> f = EmpiricalFisher(torch.tensor([[1.0, 1.0]], dtype=torch.float64), 1.0)
    >>> [round(v, 4) for v in cbs_update(f, torch.tensor([1.0, 1.0]), torch.tensor([True, False])).tolist()]
    [0.0, 1.5]
    """
    w = w.to(_DT)
    wp = torch.where(pruned, w, torch.zeros_like(w))
    rhs = torch.zeros_like(w)
    for b, (s, e) in enumerate(fisher.blocks):
        g = fisher.grads[:, s:e]
        rhs[s:e] = g.T @ (g @ wp[s:e]) / fisher.n
    delta = fisher.restricted_solve(~pruned, rhs)
    out = w + delta
    return torch.where(pruned, torch.zeros_like(out), out)


def cbs_update_lagrangian(f_inv: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """The Lagrangian form of CBS-U from a dense ``F⁻¹: (d, d)``: ``δw = −F⁻¹ E_P [(F⁻¹)_PP]⁻¹ w_P``; returns
    ``w + δw`` (``(d,)`` float64). For checks on small problems.

    >>> cbs_update_lagrangian(torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 2.0]),
    ...                       torch.tensor([True, False])).tolist()
    [0.0, 2.0]
    """
    w = w.to(_DT)
    p = pruned.nonzero().squeeze(1)
    lam = torch.linalg.solve(f_inv[p][:, p], w[p])
    return w - f_inv[:, p] @ lam


def _split_counts(total: int, sizes: list) -> list:
    """Split ``total`` over parts of ``sizes`` proportionally, exactly (largest remainder, ties to the first)."""
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    raw = [total * s / n for s in sizes]
    base = [min(int(math.floor(r)), s) for r, s in zip(raw, sizes)]
    left = total - sum(base)
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order:
        if left == 0:
            break
        if base[i] < sizes[i]:
            base[i] += 1
            left -= 1
    while left:  # parts that were full: give to any part with room
        for i in range(len(sizes)):
            if left and base[i] < sizes[i]:
                base[i] += 1
                left -= 1
    return base


def random_magnitude_pruned(w: torch.Tensor, units: list, counts: list, *, trial: int, chunks: int = 10,
                            fixed: torch.Tensor | None = None) -> torch.Tensor:
    """A randomised magnitude selection (CBS's starting masks): for each unit (a ``(start, stop)`` range of the flat
    index space) prune ``counts[u]`` weights. Trial 0: the lowest ``|w|`` of the unit (stable order). Trial t > 0:
    shuffle the unit's weights with seed t, split them into ``chunks`` parts and prune the lowest ``|w|`` inside
    each part (the unit's count split proportionally). ``fixed`` (bool ``(d,)``): weights that must be pruned
    (already pruned before). Returns the pruned set, bool ``(d,)``.

    >>> random_magnitude_pruned(torch.tensor([0.3, -0.1, 0.2, 0.5]), [(0, 4)], [2], trial=0).tolist()
    [False, True, True, False]
    """
    w = w.to(_DT)
    d = w.numel()
    fixed = torch.zeros(d, dtype=torch.bool, device=w.device) if fixed is None else fixed
    key = torch.where(fixed, torch.full_like(w, -1.0), w.abs())
    pruned = torch.zeros(d, dtype=torch.bool, device=w.device)
    g = torch.Generator().manual_seed(int(trial))
    for (s, e), k in zip(units, counts):
        n_fixed = int(fixed[s:e].sum())
        if k < n_fixed:
            raise ValueError(f"count {k} for the unit [{s}, {e}) is below its {n_fixed} already-pruned weights.")
        if trial == 0:
            parts = [torch.arange(s, e, device=w.device)]
        else:
            perm = torch.randperm(e - s, generator=g).to(w.device) + s
            parts = [p for p in torch.tensor_split(perm, min(chunks, e - s)) if p.numel()]
        fixed_per = [int(fixed[p].sum()) for p in parts]
        extra = _split_counts(k - n_fixed, [p.numel() - f for p, f in zip(parts, fixed_per)])
        for p, f, x in zip(parts, fixed_per, extra):
            order = torch.sort(key[p], stable=True).indices
            pruned[p[order[:f + x]]] = True
    return pruned


@dataclass
class CBSResult:
    """Outcome of :func:`cbs_select`: ``pruned`` (bool ``(d,)``), the objective at the start and of the kept mask,
    the number of accepted swaps, the training loss of the kept mask and the per-trial start losses; the objective
    and loss of the magnitude start (trial 0), and ``fallback``: True when the search's mask was worse than that
    start on both and the magnitude start was returned instead."""

    pruned: torch.Tensor
    start_objective: float
    objective: float
    swaps: int
    loss: float | None = None
    start_losses: list = field(default_factory=list)
    history: list = field(default_factory=list)
    magnitude_objective: float | None = None
    magnitude_loss: float | None = None
    fallback: bool = False

    def info(self) -> dict:
        """Plain numbers for a result's ``info``: the kept mask's objective and loss beside the magnitude start's."""
        return {"cbs_objective": self.objective, "cbs_loss": self.loss, "magnitude_objective":
                self.magnitude_objective, "magnitude_loss": self.magnitude_loss, "start_objective":
                self.start_objective, "swaps": self.swaps, "magnitude_fallback": self.fallback}


def cbs_select(fisher: EmpiricalFisher, w: torch.Tensor, units: list, counts: list, *, trials: int = 5,
               chunks: int = 10, epsilon: float = 1e-4, window: int = 100, max_swaps: int = 1000,
               max_misses: int = 5, loss_fn=None, eval_every: int = 1, fixed: torch.Tensor | None = None,
               progress: bool = False) -> CBSResult:
    """CBS-S: choose the pruned set P (``counts[u]`` weights in each unit ``units[u] = (start, stop)``) minimising
    ``Obj(P) = w_Pᵀ F_PP w_P``.

    1. Start from the best of ``trials`` randomised magnitude selections (:func:`random_magnitude_pruned`; trial
       0 = magnitude), best = lowest ``loss_fn(pruned)`` (the training loss of the masked weights), or lowest Obj
       when ``loss_fn`` is None.
    2. Swap local search inside each unit: from ``α``/``β`` (:func:`swap_terms`) take the ``window`` weights of P
       with the largest α and a window of weights outside P with the smallest β, evaluate every pair's
       ``ΔObj = −α_i + β_j − γ_ij`` and accept the best swap when it lowers Obj by at least ``epsilon``; α and β
       are refreshed after each swap (``Fw_P`` is updated with two columns of F). When a window holds no improving
       swap the next window of β is tried; after ``max_misses`` windows without one (or ``max_swaps`` swaps) the
       search stops.
    3. After every ``eval_every`` swaps (default 1: after every outer iteration, as the reference code does) and at
       the end the training loss is taken; the mask with the lowest loss is kept (ties: the lower Obj).
    4. Never worse than magnitude: if the kept mask has both a higher Obj and a higher loss than the magnitude
       start (trial 0), the magnitude start is returned (``fallback``).

    ``fixed``: weights that must stay pruned. Returns a :class:`CBSResult`; its Obj never exceeds the start's.

    >>> G = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    >>> r = cbs_select(EmpiricalFisher(G, 1e-3), torch.tensor([0.5, 0.5, 0.3]), [(0, 3)], [1], trials=1)
    >>> r.objective <= r.start_objective
    True
    """
    w = w.to(_DT)
    d = w.numel()
    if len(units) != len(counts):
        raise ValueError(f"units and counts must have the same length, got {len(units)} and {len(counts)}.")
    for (s, e), k in zip(units, counts):
        if not 0 <= k <= e - s:
            raise ValueError(f"count {k} for the unit [{s}, {e}) must be in [0, {e - s}].")
    if trials < 1 or window < 1:
        raise ValueError(f"trials and window must be >= 1, got trials={trials!r}, window={window!r}.")
    fixed = torch.zeros(d, dtype=torch.bool, device=w.device) if fixed is None else fixed.to(w.device)
    diag = fisher.diag()

    def judge(p):
        return float(loss_fn(p)) if loss_fn is not None else cbs_objective(fisher, w, p)

    starts = [random_magnitude_pruned(w, units, counts, trial=t, chunks=chunks, fixed=fixed) for t in range(trials)]
    start_losses = [judge(p) for p in starts]
    best_t = min(range(trials), key=lambda t: (start_losses[t], t))
    pruned = starts[best_t].clone()
    fwp = fisher.matvec(torch.where(pruned, w, torch.zeros_like(w)))
    obj = float(torch.where(pruned, w, torch.zeros_like(w)) @ fwp)
    start_obj = obj
    best = (start_losses[best_t], pruned.clone(), obj)
    history = [obj]
    swaps, misses = 0, 0
    unit_idx = [torch.arange(s, e, device=w.device) for s, e in units]
    bar = _tqdm(total=max_swaps, desc="CBS swaps", disable=not progress or None, leave=False)
    try:
        while swaps < max_swaps:
            alpha, beta = swap_terms(fisher, w, pruned, fwp, diag)
            cand = None
            for idx in unit_idx:
                p_in = pruned[idx] & ~fixed[idx]
                p_out = ~pruned[idx]
                if not p_in.any() or not p_out.any():
                    continue
                a_u = torch.where(p_in, alpha[idx], torch.full_like(alpha[idx], -math.inf))
                b_u = torch.where(p_out, beta[idx], torch.full_like(beta[idx], math.inf))
                ki = min(window, int(p_in.sum()))
                n_out = int(p_out.sum())
                lo = misses * window
                if lo >= n_out:
                    continue
                ii = idx[torch.topk(a_u, ki).indices]
                jj = idx[torch.sort(b_u, stable=True).indices[lo:min(lo + window, n_out)]]
                gamma = 2 * w[ii][:, None] * fisher.submatrix(ii, jj) * w[jj][None, :]
                delta = -alpha[ii][:, None] + beta[jj][None, :] - gamma
                flat = int(torch.argmin(delta))
                val = float(delta.reshape(-1)[flat])
                if cand is None or val < cand[0]:
                    cand = (val, int(ii[flat // jj.numel()]), int(jj[flat % jj.numel()]))
            if cand is None:
                break
            if cand[0] > -epsilon:
                misses += 1
                if misses >= max_misses:
                    break
                continue
            misses = 0
            _, i, j = cand
            cols = fisher.columns(torch.tensor([i, j], device=w.device))
            fwp = fwp - cols[:, 0] * w[i] + cols[:, 1] * w[j]
            pruned[i], pruned[j] = False, True
            obj += cand[0]
            swaps += 1
            bar.update(1)
            history.append(obj)
            if eval_every and swaps % eval_every == 0:
                loss = judge(pruned)
                if (loss, obj) < best[:1] + best[2:]:
                    best = (loss, pruned.clone(), obj)
    finally:
        bar.close()
    final = judge(pruned)
    if (final, obj) <= best[:1] + best[2:]:
        best = (final, pruned.clone(), obj)
    loss, chosen, _ = best
    # recompute Obj exactly for the kept mask (the running sum accumulates rounding)
    objective = cbs_objective(fisher, w, chosen)
    mag_obj, mag_loss = cbs_objective(fisher, w, starts[0]), start_losses[0]
    fallback = objective > mag_obj and loss > mag_loss
    if fallback:
        chosen, objective, loss = starts[0].clone(), mag_obj, mag_loss
    return CBSResult(pruned=chosen, start_objective=start_obj, objective=objective,
                     swaps=swaps, loss=loss if loss_fn is not None else None, start_losses=start_losses,
                     history=history, magnitude_objective=mag_obj,
                     magnitude_loss=mag_loss if loss_fn is not None else None, fallback=fallback)


# ---------------------------------------------------------------------------------------------------------------
# layerwise OBS (OBC / SparseGPT style)
# ---------------------------------------------------------------------------------------------------------------
def _conv_unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module.padding, str):
        if module.padding != "valid":
            raise ValueError(f"layerwise OBS supports Conv2d padding given as numbers or 'valid', got "
                             f"{module.padding!r}.")
        pad = 0
    else:
        pad = module.padding
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _hessian_owners(model: nn.Module, names: list) -> dict:
    modules = dict(model.named_modules())
    owners = {}
    for n in names:
        mod_name = n.rsplit(".", 1)[0] if "." in n else ""
        mod = modules.get(mod_name)
        if not isinstance(mod, nn.Linear) and not (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            raise ValueError(f"layerwise OBS supports nn.Linear and nn.Conv2d (groups=1) weights; {n!r} belongs "
                             f"to {type(mod).__name__}{'' if not isinstance(mod, nn.Conv2d) else ' with groups > 1'}.")
        owners[n] = mod
    return owners


def _hessian_columns(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * math.prod(mod.kernel_size)


def _capture_hessians(model: nn.Module, weights: dict, owners: dict, x: torch.Tensor, batch_size: int) -> dict:
    """One pass of ``x`` through the model with forward pre-hooks on ``owners`` (``{name: module}``) only:
    ``{name: 2XᵀX / n}``. The hooks are always removed and the modules' train/eval modes restored."""
    sums = {n: None for n in owners}
    counts = {n: 0 for n in owners}

    def make_hook(n, mod):
        def hook(_m, inputs):
            inp = inputs[0].detach().to(_DT)
            rows = _conv_unfold(mod, inp) if isinstance(mod, nn.Conv2d) else inp.reshape(-1, inp.shape[-1])
            h = rows.T @ rows
            sums[n] = h if sums[n] is None else sums[n].add_(h)
            counts[n] += rows.shape[0]
        return hook

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    params.update({k: v.detach() for k, v in weights.items()})
    try:
        for n, mod in owners.items():
            handles.append(mod.register_forward_pre_hook(make_hook(n, mod)))
        model.eval()
        x = match_input_dtype(x, list(weights.values()))  # float32 data, half-precision model: cast
        with torch.no_grad():
            for a in range(0, x.shape[0], batch_size):
                xb = x[a:a + batch_size].to(next(iter(weights.values())).device)
                try:
                    functional_call(model, params, (xb,))
                except RuntimeError as exc:
                    if a or isinstance(exc, torch.cuda.OutOfMemoryError):
                        raise
                    raise input_error(exc, x, what="data") from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    out = {}
    for n in owners:
        h = sums.pop(n)
        if h is None:
            c = _hessian_columns(owners[n])
            h = torch.zeros(c, c, dtype=_DT, device=next(iter(weights.values())).device)
        out[n] = h.mul_(2).div_(max(counts[n], 1))  # (2·XᵀX) / n, rounded as always
    return out


def layer_inputs_hessian(model: nn.Module, weights: dict, names: list, x: torch.Tensor, *,
                         batch_size: int = 256) -> dict:
    """``{name: H}`` with ``H = 2XᵀX / n`` (``(c, c)`` float64; c = in_features, or in·kh·kw for a Conv2d) from
    the inputs each layer ``name`` sees on the batch ``x``, captured by forward pre-hooks that are always
    removed. The model runs through ``functional_call`` with ``weights`` (eval mode; modes restored). Every
    layer's Hessian at once, in one pass: :class:`LayerHessians` holds at most a memory budget of them.

    >>> net = nn.Sequential(nn.Linear(3, 2))
    >>> tuple(layer_inputs_hessian(net, {"0.weight": net[0].weight.detach()}, ["0.weight"], torch.randn(4, 3))
    ...       ["0.weight"].shape)
    (3, 3)
    """
    if x.shape[0] == 0:
        raise ValueError("x is empty (N = 0): layer Hessians need at least one calibration sample.")
    return _capture_hessians(model, weights, _hessian_owners(model, names), x, batch_size)


class LayerHessians:
    """The layer Hessians ``H = 2XᵀX / n`` of :func:`layer_inputs_hessian`, computed on demand and held within a
    memory budget: a mapping ``{name: (c, c) float64}``.

    ``H[name]`` returns the kept Hessian, or runs the calibration batch through the model once for ``name`` and
    the layers after it (in ``names`` order, not yet kept) whose Hessians fit in what is left of ``max_bytes``,
    keeps those that fit and returns ``name``'s. With the budget at least the sum of all Hessians this is one pass
    for all (as :func:`layer_inputs_hessian`); with a budget of 0 nothing is kept, every access makes a pass for one
    layer, and the caller that uses one layer's Hessian and drops it before asking for the next (layerwise OBS)
    holds one Hessian at a time: peak memory bounded by the largest layer, not the sum, at the cost of one
    forward pass of the calibration batch per layer. The class default ``max_bytes`` (1 GiB) can be changed on the
    class or per instance.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> w = {k: v.detach() for k, v in net.named_parameters() if k.endswith("weight")}
    >>> H = LayerHessians(net, w, ["0.weight", "2.weight"], torch.randn(8, 3), max_bytes=0)
    >>> tuple(H["2.weight"].shape), len(H.kept)
    ((4, 4), 0)
    """

    max_bytes = 1 << 30

    def __init__(self, model: nn.Module, weights: dict, names: list, x: torch.Tensor, *, batch_size: int = 256,
                 max_bytes: int | None = None):
        if x.shape[0] == 0:
            raise ValueError("x is empty (N = 0): layer Hessians need at least one calibration sample.")
        self.model, self.weights, self.names, self.x = model, weights, list(names), x
        self.batch_size = int(batch_size)
        if max_bytes is not None:
            self.max_bytes = int(max_bytes)
        self.owners = _hessian_owners(model, self.names)
        self.nbytes = {n: _hessian_columns(m) ** 2 * 8 for n, m in self.owners.items()}
        self.kept: dict = {}
        self.passes = 0  # forward passes of the calibration batch so far

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name):
        return name in self.owners

    def keys(self):
        return list(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        hit = self.kept.get(name)
        if hit is not None:
            return hit
        if name not in self.owners:
            raise KeyError(name)
        free = self.max_bytes - sum(self.nbytes[n] for n in self.kept)
        group, used = [name], self.nbytes[name]
        for n in self.names[self.names.index(name) + 1:]:
            if n not in self.kept and used + self.nbytes[n] <= free:
                group.append(n)
                used += self.nbytes[n]
        got = _capture_hessians(self.model, self.weights, {n: self.owners[n] for n in group}, self.x,
                                self.batch_size)
        self.passes += 1
        out = got.pop(name)
        if self.nbytes[name] <= free:
            self.kept[name] = out
        self.kept.update(got)  # the others were taken only as far as they fit
        return out


def _damped_hessian(H: torch.Tensor, W: torch.Tensor, damp: float):
    H = H.to(_DT).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    mean = float(H.diagonal().mean())
    H.diagonal().add_(damp * mean if mean > 0 else damp)
    return H, dead


def obs_layerwise_saliency(W: torch.Tensor, H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Layerwise OBS saliency ``w_rc² / [H⁻¹]_cc²`` (the SparseGPT criterion), ``W: (out, c)`` or a conv weight
    (flattened to ``(out, in·kh·kw)``), ``H: (c, c)`` damped by ``damp`` × mean diagonal; same shape as ``W``.

    >>> [round(v, 6) for v in obs_layerwise_saliency(torch.tensor([[1.0, 2.0]]), 2 * torch.eye(2), damp=0.0)[0].tolist()]
    [4.0, 16.0]
    """
    W2 = W.reshape(W.shape[0], -1).to(_DT)
    Hd, dead = _damped_hessian(H, W2, damp)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd)).diagonal()
    sal = W2.pow(2) / hinv.pow(2)[None, :]
    sal[:, dead] = 0.0
    return sal.reshape(W.shape)


def parse_nm(pattern: str):
    """``"2:4"`` → ``(2, 4)``: at most N nonzero weights in every M consecutive inputs of a row.

    >>> parse_nm("2:4")
    (2, 4)
    """
    try:
        n, m = (int(t) for t in str(pattern).split(":"))
    except ValueError as exc:
        raise ValueError(f"an N:M pattern must look like '2:4' (N kept of every M), got {pattern!r}.") from exc
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {pattern!r}.")
    return n, m


def obs_layerwise(W: torch.Tensor, H: torch.Tensor, n_pruned: int | None = None, *, nm: tuple | None = None,
                  block_columns: int = 128, damp: float = 0.01, fixed: torch.Tensor | None = None):
    """Layerwise OBS with Cholesky updates (SparseGPT's algorithm): prune ``n_pruned`` weights of ``W`` (exactly),
    or an N:M pattern (``nm=(N, M)``: N kept in every M consecutive input columns of each row), minimising
    ``‖WX − ŴX‖²`` for ``H = 2XᵀX``. Columns are processed left to right in blocks of ``block_columns``; in each
    block the mask is chosen by ``w² / [chol(H⁻¹)]_cc²`` on the current (updated) weights, then every pruned
    weight's error is spread over the later columns with the upper Cholesky factor of ``H⁻¹``.

    ``W: (out, c)`` (or a conv weight, flattened to ``(out, in·kh·kw)``), ``H: (c, c)``; ``fixed`` (bool, ``W``'s
    shape): weights that must end pruned (already pruned before; they count in ``n_pruned``). Returns
    ``(mask, W_new)``: bool kept mask and updated weights (zero where pruned), both of ``W``'s shape and dtype.

    >>> m, w = obs_layerwise(torch.tensor([[1.0, -0.2, 0.5, 0.1]]), torch.eye(4), 2)
    >>> m.tolist(), int((w == 0).sum())
    ([[True, False, True, False]], 2)
    """
    shape, dtype = W.shape, W.dtype
    W = W.detach().reshape(shape[0], -1).to(_DT).clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for a weight with {cols} input columns, got {tuple(H.shape)}.")
    if (n_pruned is None) == (nm is None):
        raise ValueError("give exactly one of n_pruned (unstructured) and nm (an N:M pattern).")
    if nm is not None:
        keep_n, m = nm
        if cols % m:
            raise ValueError(f"an {keep_n}:{m} pattern needs the input size ({cols}) to be a multiple of {m}.")
        block_columns = max(m, (block_columns // m) * m)
    elif not 0 <= n_pruned <= W.numel():
        raise ValueError(f"n_pruned must be in [0, {W.numel()}], got {n_pruned!r}.")
    if block_columns < 1:
        raise ValueError(f"block_columns must be >= 1, got {block_columns!r}.")
    fixed = (torch.zeros(rows, cols, dtype=torch.bool, device=W.device) if fixed is None
             else fixed.reshape(rows, cols).to(device=W.device, dtype=torch.bool))
    Hd, dead = _damped_hessian(H, W, damp)
    W[:, dead] = 0
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    bounds = [(a, min(a + block_columns, cols)) for a in range(0, cols, block_columns)]
    per_block = None
    if nm is None:
        n_fixed = int(fixed.sum())
        if n_pruned < n_fixed:
            raise ValueError(f"n_pruned ({n_pruned}) is below the {n_fixed} weights that fixed keeps pruned.")
        fb = [int(fixed[:, a:b].sum()) for a, b in bounds]
        extra = _split_counts(n_pruned - n_fixed, [rows * (b - a) - f for (a, b), f in zip(bounds, fb)])
        per_block = [f + x for f, x in zip(fb, extra)]
    elif (fixed.reshape(rows, -1, nm[1]).sum(-1) > nm[1] - nm[0]).any():
        raise ValueError(f"fixed prunes more than {nm[1] - nm[0]} weights in some group of {nm[1]}: no "
                         f"{nm[0]}:{nm[1]} mask contains it.")
    for bi, (i1, i2) in enumerate(bounds):
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        H1 = hinv[i1:i2, i1:i2]
        d1 = H1.diagonal()
        m1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
        f1 = fixed[:, i1:i2]
        if nm is None and per_block[bi]:
            tmp = (W1.pow(2) / d1.pow(2)[None, :]).masked_fill(f1, -1.0).reshape(-1)
            m1.view(-1)[torch.sort(tmp, stable=True).indices[:per_block[bi]]] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = (W1[:, i:i + nm[1]].pow(2) / d1[i:i + nm[1]].pow(2)[None, :]).masked_fill(
                    f1[:, i:i + nm[1]], -1.0)
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, :nm[1] - nm[0]]
                m1[:, i:i + nm[1]].scatter_(1, idx, True)
            w = W1[:, i]
            q = torch.where(m1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
            E1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = ~m1
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    W = torch.where(mask, W, torch.zeros_like(W))
    return mask.reshape(shape), W.to(dtype).reshape(shape)
