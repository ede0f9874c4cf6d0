"""The Combinatorial Brain Surgeon (Yu et al., ICML 2022) on an empirical Fisher
(:class:`~prune_lab.core.fisher.EmpiricalFisher`): the objective ``Obj(P) = w_Pᵀ F_PP w_P``, the swap terms,
randomised magnitude starts, the CBS-S swap search and the CBS-U weight update (and its Lagrangian form, for
checks). Same flat index space as the Fisher; pure functions of their inputs (tensors are read, never written).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .fisher import EmpiricalFisher
from .obs_common import DT, progress_bar, split_counts

__all__ = ["CBSResult", "cbs_objective", "cbs_select", "cbs_update", "cbs_update_lagrangian",
           "random_magnitude_pruned", "swap_terms"]


def cbs_objective(fisher: EmpiricalFisher, w: torch.Tensor, pruned: torch.Tensor) -> float:
    """``Obj(P) = w_Pᵀ F_PP w_P`` (twice the modelled loss increase of removing P without update).

    >>> f = EmpiricalFisher(torch.zeros(1, 2, dtype=torch.float64), 1.0)
    >>> cbs_objective(f, torch.tensor([3.0, 4.0]), torch.tensor([True, False]))
    9.0
    """
    wp = torch.where(pruned, w.to(DT), torch.zeros((), dtype=DT))
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
    w = w.to(DT)
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
    w = w.to(DT)
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
    w = w.to(DT)
    p = pruned.nonzero().squeeze(1)
    lam = torch.linalg.solve(f_inv[p][:, p], w[p])
    return w - f_inv[:, p] @ lam


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
    w = w.to(DT)
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
        extra = split_counts(k - n_fixed, [p.numel() - f for p, f in zip(parts, fixed_per)])
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
    w = w.to(DT)
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
    bar = progress_bar(total=max_swaps, desc="CBS swaps", disable=not progress or None, leave=False)
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

