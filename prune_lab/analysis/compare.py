"""Comparing pruning results: mask overlap, per-layer sparsity side by side, score rank correlation."""
from __future__ import annotations

import pandas as pd
import torch

from ..engine.result import PruneResult


def _masks(x) -> dict:
    return x.masks if isinstance(x, PruneResult) else x


def mask_overlap(a, b) -> pd.DataFrame:
    """Per layer (and a ``(model)`` row): Jaccard index of the kept sets and the share of weights kept by exactly
    one of ``a`` and ``b`` (PruneResults or ``{name: BoolTensor}``).

    >>> import torch
    >>> a = {"w": torch.tensor([True, True, False, False])}; b = {"w": torch.tensor([True, False, True, False])}
    >>> mask_overlap(a, b)[["jaccard", "exactly_one"]].iloc[0].tolist()
    [0.3333333333333333, 0.5]
    """
    ma, mb = _masks(a), _masks(b)
    if list(ma) != list(mb):
        missing = next(iter(set(ma) ^ set(mb)), None)
        raise ValueError(f"the two mask sets cover different layers (e.g. {missing!r}); compare results of one model.")
    rows, inter_t, union_t, one_t, n_t = [], 0, 0, 0, 0
    for n in ma:
        x, y = ma[n].reshape(-1).cpu(), mb[n].reshape(-1).cpu()
        if x.shape != y.shape:
            raise ValueError(f"masks of {n!r} differ in size: {tuple(ma[n].shape)} vs {tuple(mb[n].shape)}.")
        inter, union, one = int((x & y).sum()), int((x | y).sum()), int((x ^ y).sum())
        rows.append({"layer": n, "n_weights": x.numel(), "kept_a": int(x.sum()), "kept_b": int(y.sum()),
                     "jaccard": inter / union if union else 1.0, "exactly_one": one / x.numel()})
        inter_t, union_t, one_t, n_t = inter_t + inter, union_t + union, one_t + one, n_t + x.numel()
    rows.append({"layer": "(model)", "n_weights": n_t, "kept_a": sum(r["kept_a"] for r in rows),
                 "kept_b": sum(r["kept_b"] for r in rows), "jaccard": inter_t / union_t if union_t else 1.0,
                 "exactly_one": one_t / n_t})
    return pd.DataFrame(rows)


def layer_table(results) -> pd.DataFrame:
    """Per-layer sparsity of several results side by side (long format): ``label, method, allocation, layer,
    n_weights, sparsity``. ``results``: a list of PruneResults or ``{label: PruneResult}``."""
    items = results.items() if isinstance(results, dict) else ((r.label, r) for r in results)
    rows = []
    for label, r in items:
        for i, n in enumerate(r.layers):
            rows.append({"label": label, "method": r.method, "allocation": r.allocation, "layer": n,
                         "n_weights": r.numel[i], "sparsity": r.pruned[i] / r.numel[i]})
    return pd.DataFrame(rows)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.sort(x.reshape(-1).double(), stable=True).indices
    r = torch.empty_like(order, dtype=torch.float64)
    r[order] = torch.arange(order.numel(), dtype=torch.float64)
    return r


def score_rank_correlation(session, methods, *, seed: int = 0) -> pd.DataFrame:
    """Spearman rank correlation of the scores of every pair of ``methods``, per layer: ``layer, method_a,
    method_b, spearman`` (ties ranked by position)."""
    scores = {m: session.scores(m, seed=seed) for m in methods}
    rows = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            for n in session.layer_names:
                ra, rb = _ranks(scores[a][n]), _ranks(scores[b][n])
                ra, rb = ra - ra.mean(), rb - rb.mean()
                denom = float(ra.norm() * rb.norm())
                rows.append({"layer": n, "method_a": a, "method_b": b,
                             "spearman": float((ra * rb).sum()) / denom if denom > 0 else float("nan")})
    return pd.DataFrame(rows)
