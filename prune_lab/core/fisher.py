"""The damped empirical Fisher and what is read from it without a ``d×d`` matrix: per-sample gradients, the
Fisher's products, inverse products and inverse diagonal, and the OBS / WoodFisher saliency and update.

Flat index space: the prunable weights flattened (row-major) and concatenated in the given layer order, ``d``
entries in all. The empirical Fisher is ``F = λI + GᵀG/N`` with ``G: (N, d)`` the per-sample gradients; it is
block-diagonal over contiguous ranges of the flat index space (one block for the full Fisher, one per layer, or
chunks of at most ``B`` weights). ``F`` is never formed as a ``d×d`` matrix unless a block is smaller than ``N``:
products are ``F·v = Gᵀ(Gv)/N + λv`` and the inverse goes through Woodbury,
``F⁻¹ = (1/λ)(I − Gᵀ(NλI + GGᵀ)⁻¹G)``, with one ``N×N`` Cholesky factor per block.

Everything here is a pure function of its inputs (tensors are read, never written).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .capture import eval_mode
from .losses import is_token_batch, model_loss, output_logits, right_padded
from .obs_common import DT, progress_bar
from .validation import input_error, match_input_dtype

__all__ = ["EmpiricalFisher", "fisher_blocks", "obs_saliency", "per_sample_gradients", "woodfisher_update"]


# ---------------------------------------------------------------------------------------------------------------
# per-sample gradients
# ---------------------------------------------------------------------------------------------------------------
def per_sample_gradients(model: nn.Module, weights: dict, names: list, x: torch.Tensor, y: torch.Tensor, *,
                         chunk_size: int = 256, progress: bool = False) -> torch.Tensor:
    """Per-sample gradients of the loss (:func:`prune_lab.core.losses.batch_loss`: cross-entropy of a classifier,
    or the mean next-token loss of one sequence of a causal LM) w.r.t. the weights ``names``, as one ``(N, d)``
    float64 matrix (row n: the flattened gradients of sample n, layers concatenated in ``names`` order).

    ``model`` is evaluated with ``torch.func.functional_call`` in eval mode (its modes are restored; its
    parameters are never touched); ``weights``: ``{name: tensor}`` overriding the model's parameters (must hold
    every name of ``names``; other entries are used as fixed values); ``x: (N, ...)``, ``y: (N,)`` int labels, or
    a token batch: ``x: (N, L)`` token ids with ``y: (N, L)`` their attention mask (a sample is a sequence).
    Computed with ``vmap(grad(...))`` in chunks of ``chunk_size`` samples so memory stays bounded (token batches
    that are not right-padded: one sequence at a time, with its attention mask).

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
    tokens = is_token_batch(x, y)
    # right-padded sequences: a causal LM's logits at real tokens do not see the padding, so the attention mask
    # (data-dependent control flow, which vmap cannot run) is left out; other padding: one sequence at a time
    batched = not tokens or right_padded(y)

    def loss_one(var, xi, yi):
        return model_loss(model, {**fixed, **var}, xi.unsqueeze(0), yi.unsqueeze(0), mask_kwargs=not batched)

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0)) if batched else grad(loss_one)
    sizes = [variables[n].numel() for n in names]
    out = torch.empty(x.shape[0], sum(sizes), dtype=DT, device=dev)
    with eval_mode(model):
        x = match_input_dtype(x, list(variables.values()))  # float32 data, half-precision model: cast
        if not tokens:
            with torch.no_grad():
                try:
                    n_out = output_logits(functional_call(model, {**fixed, **variables}, (x[:1].to(dev),))).shape[-1]
                except RuntimeError as exc:
                    if isinstance(exc, torch.cuda.OutOfMemoryError):
                        raise
                    raise input_error(exc, x, what="data") from exc
            if int(y.min()) < 0 or int(y.max()) >= n_out:
                raise ValueError(f"data: labels must be class indices in [0, {n_out}) for a model with {n_out} "
                                 f"outputs; got labels from {int(y.min())} to {int(y.max())}. Do the data and the "
                                 f"model match?")
        step = chunk_size if batched else 1
        starts = range(0, x.shape[0], step)
        with warnings.catch_warnings():  # vmap over attention kernels without a batching rule: slower, still exact
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            for a in progress_bar(starts, desc="per-sample gradients", disable=not progress or None, leave=False):
                xb, yb = x[a:a + step].to(dev), y[a:a + step].to(dev)
                if batched:
                    g = per_sample(variables, xb, yb)
                    row = [g[n].reshape(xb.shape[0], -1) for n in names]
                else:
                    g = per_sample(variables, xb[0], yb[0])
                    row = [g[n].reshape(1, -1) for n in names]
                out[a:a + xb.shape[0]] = torch.cat(row, dim=1).to(DT)
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
        self.grads = self.grads.to(DT)
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
        v = v.to(DT)
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
        out = torch.zeros(self.d, idx.numel(), dtype=DT, device=self.grads.device)
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
        v = v.to(DT)
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
        out = torch.empty(self.d, dtype=DT, device=self.grads.device)
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
        out = torch.zeros(self.d, self.d, dtype=DT, device=self.grads.device)
        for b, (s, e) in enumerate(self.blocks):
            g = self._g(b)
            out[s:e, s:e] = g.T @ g / self.n
        out.diagonal().add_(self.damping)
        return out

    def restricted_solve(self, keep: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``F_RR⁻¹ · rhs`` for the index set ``keep`` (bool ``(d,)``) and ``rhs: (d,)`` (read on R; zero elsewhere
        in the result), block by block; Woodbury with ``G_R`` when a block keeps more than N weights."""
        rhs = rhs.to(DT)
        out = torch.zeros(self.d, dtype=DT, device=self.grads.device)
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
    return w.to(DT).pow(2) / (2 * inverse_diag.to(DT))


def woodfisher_update(fisher: EmpiricalFisher, w: torch.Tensor, pruned: torch.Tensor,
                      inverse_diag: torch.Tensor | None = None) -> torch.Tensor:
    """Weights after removing the set ``pruned`` (bool ``(d,)``) with the WoodFisher update
    ``δw = −F⁻¹ Σ_{q∈P} (w_q / [F⁻¹]_qq) e_q`` (single-weight OBS updates summed); pruned entries are exactly 0.
    Returns ``(d,)`` float64.

    >>> f = EmpiricalFisher(torch.eye(2, dtype=torch.float64), 1.0)
    >>> woodfisher_update(f, torch.tensor([1.0, 2.0]), torch.tensor([True, False])).tolist()
    [0.0, 2.0]
    """
    w = w.to(DT)
    if inverse_diag is None:
        inverse_diag = fisher.inverse_diag()
    u = torch.where(pruned, w / inverse_diag, torch.zeros_like(w))
    out = w - fisher.inverse_matvec(u)
    return torch.where(pruned, torch.zeros_like(out), out)

