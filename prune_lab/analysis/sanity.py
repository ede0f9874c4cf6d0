"""Sanity checks for pruning methods (Frankle et al., ICLR 2021): does a method's gain come from which weights it
keeps, or only from how many it keeps per layer?"""
from __future__ import annotations

import pandas as pd
import torch


def _controls(result, scores: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(int(seed))
    shuffled, rand, inverted = {}, {}, {}
    for i, n in enumerate(result.layers):
        m = result.masks[n]
        flat = m.reshape(-1).cpu()
        shuffled[n] = flat[torch.randperm(flat.numel(), generator=g)].reshape(m.shape).to(m.device)
        k = result.pruned[i]
        r = torch.ones(flat.numel(), dtype=torch.bool)
        r[torch.randperm(flat.numel(), generator=g)[:k]] = False
        rand[n] = r.reshape(m.shape).to(m.device)
        inv = torch.ones(flat.numel(), dtype=torch.bool)
        inv[torch.sort(scores[n].reshape(-1).cpu().float(), descending=True, stable=True).indices[:k]] = False
        inverted[n] = inv.reshape(m.shape).to(m.device)
    return {"layerwise shuffle": shuffled, "random, same layer counts": rand, "inverted scores": inverted}


def sanity_checks(session, method: str, sparsity: float, *, allocation=None, seed: int = 0, data=None, **hp
                  ) -> pd.DataFrame:
    """The method's accuracy beside three controls with the same per-layer counts: its mask shuffled within each
    layer, a random mask, and the highest-scoring weights pruned instead (inverted scores).

    Columns: ``variant, accuracy, loss, sparsity``; ``attrs["layer_counts"]`` holds the shared per-layer counts.
    """
    from ..training import evaluate

    res = session.prune(method, sparsity, allocation=allocation, seed=seed, **hp)
    data = data if data is not None else session.data
    if data is None:
        raise ValueError("sanity checks need data: pass data=... here or when creating the session.")
    scores = session.scores(method, seed=seed, **hp)
    rows = [{"variant": f"{method} ({res.allocation})", **session.evaluate(res, data), "sparsity": res.sparsity}]
    for name, masks in _controls(res, scores, seed).items():
        counts = [int((~masks[n]).sum()) for n in res.layers]
        assert counts == list(res.pruned)
        rows.append({"variant": name, **evaluate(session.model, data, masks=masks), "sparsity": res.sparsity})
    df = pd.DataFrame(rows)
    df.attrs["layer_counts"] = dict(zip(res.layers, res.pruned))
    return df
