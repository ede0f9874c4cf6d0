"""Distortion measures of a pruned network, as functions of a session: per-layer tables, the model's output
distortion, single-layer distortion curves. ``session.distortion(result)`` and the like call these.

Each takes the session first and uses only its public parts: ``session.snapshot`` (the weights and their
fingerprint), ``session.memo`` (content-keyed results), ``session.data_id(data)``, ``session.prune`` and
``session.lock``. Everything returns long-format pandas DataFrames or plain dicts, headless.
"""
from __future__ import annotations

import math
import threading

import pandas as pd
import torch
import torch.nn.functional as F

from ..core.lookahead import Interrupted, LookaheadCache
from ..data import as_tokens, calibration_batch
from ..engine.result import PruneResult
from ..methods import get_method
from ..training import next_token_stats
from .outputs import model_output as _forward

MODEL_ROW = "(model)"

__all__ = ["MODEL_ROW", "Memo", "distortion", "distortion_curve", "lookahead_cache", "output_distortion",
           "pruned_parameters"]


class Memo:
    """Content-keyed results of one session: evaluations, calibration batches, fine-tunings (kept until
    :meth:`clear`), and a single slot per kind for large intermediates (dense outputs, lookahead factors: only the
    latest key is kept).

    >>> m = Memo(); _ = m.put(("eval", 1), {"accuracy": 1.0}); m.get(("eval", 1))
    {'accuracy': 1.0}
    >>> m.slot("dense", "a", lambda: 1), m.slot("dense", "b", lambda: 2), m.slot("dense", "a", lambda: 3)
    (1, 2, 3)
    """

    def __init__(self):
        self._kept: dict = {}
        self._slots: dict = {}

    def get(self, key, default=None):
        return self._kept.get(key, default)

    def put(self, key, value):
        self._kept[key] = value
        return value

    def __contains__(self, key):
        return key in self._kept

    def __len__(self):
        return len(self._kept)

    def slot(self, kind: str, key, make):
        """The value of slot ``kind`` for ``key``; ``make()`` (replacing what the slot held) when it holds another
        key. ``make`` may return ``None``: nothing is kept then."""
        hit = self._slots.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = make()
        if value is None:
            self._slots.pop(kind, None)
        else:
            self._slots[kind] = (key, value)
        return value

    def peek(self, kind: str, key):
        """The slot's value for ``key`` if it holds that key, else ``None`` (never computes)."""
        hit = self._slots.get(kind)
        return hit[1] if hit is not None and hit[0] == key else None

    def drop(self, kind: str):
        """Empty slot ``kind``."""
        self._slots.pop(kind, None)

    def clear(self):
        self._kept.clear()
        self._slots.clear()


def pruned_parameters(session, result: PruneResult) -> dict:
    """``{name: pruned (and updated) weight}`` of ``result`` for ``torch.func.functional_call`` on the model."""
    params = dict(session.model.named_parameters())
    if result.weights is not None:
        return {n: result.weights[n].to(params[n].device, params[n].dtype) for n in result.layers}
    return {n: params[n].detach() * result.masks[n].to(params[n].device) for n in result.layers}


def lookahead_cache(session) -> LookaheadCache:
    """The lookahead factors of the session's current weights (see :mod:`prune_lab.core.lookahead`), built once per
    weights fingerprint, layer by layer on first use."""
    w = session.snapshot.current()
    return session.memo.slot("lookahead", w.fingerprint,
                             lambda: LookaheadCache(session.snapshot.graph, w.weights, w.scales))


def _interrupted(rows: list) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df.attrs.update(interrupted=True)
    return df


def distortion(session, result: PruneResult, *, data=None, lookahead: bool = True, output: bool = True,
               n_calibration: int = 256, stop: threading.Event | None = None) -> pd.DataFrame:
    """One row per prunable layer: ``layer, n_weights, sparsity, frobenius, relative_frobenius, lookahead,
    relative_lookahead`` (÷ the lookahead distortion of removing the whole layer, ``‖W₊ W W₋‖``); with data (given
    here or to the session), a ``(model)`` row adds ``output_distortion`` (``mean_x ‖f(x;W) − f(x;W̃)‖ /
    ‖f(x;W)‖`` on a calibration batch) and ``loss_change``. Updated weights are used when the method provides them.
    ``stop``: a ``threading.Event`` checked between layers (and between the slices of a large dense product);
    once set, the table so far is returned with ``df.attrs["interrupted"] = True`` (a dashboard whose slider moved
    on)."""
    with session.lock:
        if lookahead:
            session.graph.warn_unresolved("the lookahead distortion", stacklevel=4)
        cache = lookahead_cache(session) if lookahead else None
        rows = []
        for i, n in enumerate(result.layers):
            if stop is not None and stop.is_set():
                return _interrupted(rows)
            row = {"layer": n, "n_weights": result.numel[i], "sparsity": result.layer_sparsity[n],
                   "frobenius": result.frobenius[n], "relative_frobenius": result.relative_frobenius[n]}
            if lookahead:
                order = result.orders.get(n) if result.orders and result.weights is None else None
                try:
                    row["lookahead"] = cache.distortion(
                        n, None if order is not None else result.masks[n],
                        None if result.weights is None else result.weights[n], n_removed=result.pruned[i],
                        order=order, stop=stop)
                except Interrupted:  # stopped inside a large layer's dense product
                    return _interrupted(rows)
                full = cache.full(n)
                row["relative_lookahead"] = row["lookahead"] / full if full > 0 else 0.0
            rows.append(row)
        df = pd.DataFrame(rows)
        frob = math.sqrt(float((df["frobenius"] ** 2).sum()))
        total = {"layer": MODEL_ROW, "n_weights": int(df["n_weights"].sum()), "sparsity": result.sparsity,
                 "frobenius": frob,
                 "relative_frobenius": frob / max(math.sqrt(sum(v ** 2 for v in result.weight_norms.values())),
                                                  1e-30)}
        if lookahead:
            total["lookahead"] = math.sqrt(float((df["lookahead"] ** 2).sum()))
            full = math.sqrt(sum(cache.full(n) ** 2 for n in result.layers))
            total["relative_lookahead"] = total["lookahead"] / full if full > 0 else 0.0
        data = data if data is not None else session.data
        if data is not None and output:
            total.update(output_distortion(session, result, data=data, n=n_calibration))
        df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
        df.attrs.update(method=result.method, allocation=result.allocation, target_sparsity=result.target_sparsity,
                        interrupted=False)
        return df


def _calibration(session, data, n: int):
    key = ("calib", session.data_id(data), n)
    hit = session.memo.get(key)
    return hit if hit is not None else session.memo.put(key, calibration_batch(data, n=n))


def output_distortion(session, result: PruneResult, *, data=None, n: int = 256) -> dict:
    """``{"output_distortion", "loss_change"}`` of ``result`` on a calibration batch of ``data``.

    Token data (a causal LM): the relative distortion of the logits at the real tokens of each of ``n``
    calibration sequences (mean over sequences), and the change of the mean next-token loss; run in batches of
    the data's ``batch_size``, the dense logits kept between calls only when they are small (≤ 2²⁶ values)."""
    with session.lock:
        data = data if data is not None else session.data
        if data is None:
            raise ValueError("output distortion needs data: pass data=... here or when creating the session.")
        x, y = _calibration(session, data, n)
        key = (session.fingerprint, session.data_id(data), n)
        tokens = as_tokens(data, split="train")
        pruned_params = pruned_parameters(session, result)
        if tokens is not None:
            cached, kept = session.memo.peek("dense_out", key), []
            per, nll_dense, nll_pruned, count = [], 0.0, 0.0, 0
            for i, a in enumerate(range(0, x.shape[0], tokens.batch_size)):
                ids, mask = x[a:a + tokens.batch_size], y[a:a + tokens.batch_size]
                d = cached[i] if cached is not None else _forward(session.model, ids, None, mask)
                p = _forward(session.model, ids, pruned_params, mask)
                real = mask.bool().unsqueeze(-1)
                per.append(((d - p) * real).flatten(1).norm(dim=1) /
                           (d * real).flatten(1).norm(dim=1).clamp_min(1e-30))
                nll, _, c = next_token_stats(d, ids, mask)
                nll_dense, nll_pruned, count = nll_dense + float(nll), nll_pruned + float(
                    next_token_stats(p, ids, mask)[0]), count + c
                if kept is not None:
                    kept.append(d)
                    kept = kept if sum(t.numel() for t in kept) <= 2 ** 26 else None
            if cached is None and kept is not None:
                session.memo.slot("dense_out", key, lambda: kept)
            return {"output_distortion": float(torch.cat(per).mean()),
                    "loss_change": (nll_pruned - nll_dense) / max(count, 1)}
        dense = session.memo.slot("dense_out", key, lambda: _forward(session.model, x, None))
        pruned = _forward(session.model, x, pruned_params)
        per = (dense - pruned).flatten(1).norm(dim=1) / dense.flatten(1).norm(dim=1).clamp_min(1e-30)
        out = {"output_distortion": float(per.mean())}
        if y is not None and dense.dim() == 2 and y.dtype in (torch.int64, torch.int32):
            out["loss_change"] = float(F.cross_entropy(pruned, y) - F.cross_entropy(dense, y))
        return out


def distortion_curve(session, method: str, sparsities, *, allocation: str | None = None, seed: int = 0, **hp
                     ) -> pd.DataFrame:
    """Single-layer distortion at every sparsity of a grid: ``sparsity, layer, n_weights, layer_sparsity,
    frobenius, relative_frobenius``. For score methods the whole curve comes from one sort (cached) and the
    cumulative sums: no masks are built."""
    rows = []
    for s in sparsities:
        res = session.prune(method, s, allocation=allocation, seed=seed, **hp)
        for i, n in enumerate(res.layers):
            rows.append({"sparsity": float(s), "layer": n, "n_weights": res.numel[i],
                         "layer_sparsity": res.pruned[i] / res.numel[i], "frobenius": res.frobenius[n],
                         "relative_frobenius": res.relative_frobenius[n]})
    df = pd.DataFrame(rows)
    df.attrs.update(method=method, allocation=allocation or get_method(method).default_allocation)
    return df
