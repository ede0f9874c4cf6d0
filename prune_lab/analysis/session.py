"""The analysis session: the engine's PruneSession plus distortion tables, distortion curves and cached sweeps.

``pl.PruneSession`` is this class. Everything returns long-format pandas DataFrames, headless (no plotting here).
Evaluations are cached by content — weights fingerprint, method, hyperparameters, allocation, sparsity, seed, data
identity, fine-tuning settings — so a repeated sweep, or a slider moved back to a visited point, costs nothing.
"""
from __future__ import annotations

import copy
import functools
import math
import threading
import warnings

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.allocation import SensitivityTable
from ..core.lookahead import LookaheadCache
from ..core.validation import check_sparsity
from ..data import calibration_batch, data_identity
from ..engine.result import PruneResult
from ..engine.session import PruneSession as EngineSession
from ..methods import get_method
from ..training import evaluate, train
from ..training import recalibrate_bn as recalibrate
from . import sensitivity as _sens
from .outputs import model_output as _forward
from .sweeps import ResultStore, SweepPoint, check_backend, compute_point, make_payload, run_local_pool, run_ray

MODEL_ROW = "(model)"


def _locked(fn):
    """Serialise calls on one session: evaluation swaps parameters in through ``functional_call``, so two threads
    (a dashboard's debounced refresh and a running cell) must never evaluate the same model at once."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper


class PruneSession(EngineSession):
    """:class:`prune_lab.engine.PruneSession` with analysis: :meth:`distortion`, :meth:`distortion_curve`,
    :meth:`sweep` and cached :meth:`evaluate`.

    >>> import torch, prune_lab as pl
    >>> s = pl.PruneSession(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    >>> list(s.distortion(s.prune("lamp", 0.5)).columns[:4])
    ['layer', 'n_weights', 'sparsity', 'frobenius']
    """

    def __init__(self, model, data=None, **kw):
        super().__init__(model, data, **kw)
        self._init_kw = dict(kw)  # sweep workers rebuild the session with these
        self._points: dict = {}  # finished sweep points: content key → rows
        self._lock = threading.RLock()
        self._evals: dict = {}
        self._identities: dict = {}
        self._dense_out: dict = {}
        self._lookahead = None  # (fingerprint, LookaheadCache)

    # ------------------------------------------------------------------------------------------------------------
    @_locked
    def prune(self, *args, **kwargs) -> PruneResult:
        return super().prune(*args, **kwargs)

    prune.__doc__ = EngineSession.prune.__doc__

    @_locked
    def scores(self, *args, **kwargs) -> dict:
        return super().scores(*args, **kwargs)

    scores.__doc__ = EngineSession.scores.__doc__

    @property
    def lock(self) -> threading.RLock:
        """The session's lock: every evaluating call holds it, and a dashboard or a cell that runs several calls
        as one step (``with session.lock: ...``) shares it."""
        return self._lock

    def _data_id(self, data) -> str:
        hit = self._identities.get(id(data))
        if hit is None or hit[0] is not data:
            hit = (data, data_identity(data))
            self._identities[id(data)] = hit
        return hit[1]

    def _data(self, data, what: str):
        data = data if data is not None else self.data
        if data is None:
            raise ValueError(f"{what} needs data: pass data=... here or when creating the session.")
        return data

    def _overrides(self, result: PruneResult) -> dict:
        """Pruned (and updated) weights to pass to ``functional_call``."""
        params = dict(self.model.named_parameters())
        if result.weights is not None:
            return {n: result.weights[n].to(params[n].device, params[n].dtype) for n in result.layers}
        return {n: params[n].detach() * result.masks[n].to(params[n].device) for n in result.layers}

    def _pruned_copy(self, result: PruneResult) -> torch.nn.Module:
        """A copy of the model holding ``result``'s updated weights, if any (its masks still to apply)."""
        model = copy.deepcopy(self.model)
        if result.weights is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, w in result.weights.items():
                    params[n].copy_(w)
        return model

    def _eval_key(self, result, data, kw) -> tuple:
        return ("eval", self.fingerprint, self._data_id(data), _result_key(result), tuple(sorted(kw.items())))

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    def cached_evaluation(self, result: PruneResult | None = None, data=None, *, recalibrate_bn: bool = False
                          ) -> dict | None:
        """The cached :meth:`evaluate` of ``result`` if it has been evaluated, else ``None`` (never evaluates)."""
        data = data if data is not None else self.data
        if data is None:
            return None
        recal = bool(recalibrate_bn) and result is not None and self.has_batchnorm
        hit = self._evals.get(self._eval_key(result, data, {"recalibrate_bn": True} if recal else {}))
        return None if hit is None else dict(hit)

    @_locked
    def evaluate(self, result: PruneResult | None = None, data=None, *, recalibrate_bn: bool = False, **kw) -> dict:
        """``{"accuracy", "loss"}`` on held-out data with ``result`` applied (dense for ``None``), cached by content.
        ``recalibrate_bn``: re-estimate the BatchNorm statistics of the pruned network first (on a copy; a no-op
        for models without BatchNorm). The model is not modified."""
        data = self._data(data, "evaluate")
        recal = bool(recalibrate_bn) and result is not None and self.has_batchnorm
        key = self._eval_key(result, data, {**kw, "recalibrate_bn": True} if recal else kw)
        hit = self._evals.get(key)
        kw = {"device": self.device, **kw}  # on the session's device (copies of the weights when not already there)
        if hit is None and recal:
            model = self._pruned_copy(result)
            recalibrate(model, data, masks=result.masks, inplace=True)
            hit = evaluate(model, data, masks=result.masks, **kw)
            self._evals[key] = hit
        if hit is None:
            hit = evaluate(self.model, data, masks=None if result is None else result.masks,
                           weights=None if result is None else result.weights, **kw)
            self._evals[key] = hit
        return dict(hit)

    # ------------------------------------------------------------------------------------------------------------
    @_locked
    def distortion(self, result: PruneResult, *, data=None, lookahead: bool = True, output: bool = True,
                   n_calibration: int = 256, stop: threading.Event | None = None) -> pd.DataFrame:
        """One row per prunable layer: ``layer, n_weights, sparsity, frobenius, relative_frobenius, lookahead,
        relative_lookahead`` (÷ the lookahead distortion of removing the whole layer, ``‖W₊ W W₋‖``);
        with data (given here or to the session), a ``(model)`` row adds ``output_distortion``
        (``mean_x ‖f(x;W) − f(x;W̃)‖ / ‖f(x;W)‖`` on a calibration batch) and ``loss_change``.
        Updated weights are used when the method provides them. ``stop``: a ``threading.Event`` checked between
        layers; once set, the table so far is returned with ``df.attrs["interrupted"] = True`` (a dashboard whose
        slider moved on)."""
        state = self._snapshot()
        if lookahead:
            self.graph.warn_unresolved("the lookahead distortion", stacklevel=4)
        cache = self._lookahead_cache(state) if lookahead else None
        rows = []
        for i, n in enumerate(result.layers):
            if stop is not None and stop.is_set():
                df = pd.DataFrame(rows)
                df.attrs.update(interrupted=True)
                return df
            row = {"layer": n, "n_weights": result.numel[i], "sparsity": result.layer_sparsity[n],
                   "frobenius": result.frobenius[n], "relative_frobenius": result.relative_frobenius[n]}
            if lookahead:
                order = result.orders.get(n) if result.orders and result.weights is None else None
                row["lookahead"] = cache.distortion(
                    n, None if order is not None else result.masks[n],
                    None if result.weights is None else result.weights[n], n_removed=result.pruned[i], order=order)
                full = cache.full(n)
                row["relative_lookahead"] = row["lookahead"] / full if full > 0 else 0.0
            rows.append(row)
        df = pd.DataFrame(rows)
        total = {"layer": MODEL_ROW, "n_weights": int(df["n_weights"].sum()), "sparsity": result.sparsity,
                 "frobenius": math.sqrt(float((df["frobenius"] ** 2).sum())),
                 "relative_frobenius": math.sqrt(float((df["frobenius"] ** 2).sum())) /
                 max(math.sqrt(sum(v ** 2 for v in result.weight_norms.values())), 1e-30)}
        if lookahead:
            total["lookahead"] = math.sqrt(float((df["lookahead"] ** 2).sum()))
            full = math.sqrt(sum(cache.full(n) ** 2 for n in result.layers))
            total["relative_lookahead"] = total["lookahead"] / full if full > 0 else 0.0
        data = data if data is not None else self.data
        if data is not None and output:
            total.update(self.output_distortion(result, data=data, n=n_calibration))
        df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
        df.attrs.update(method=result.method, allocation=result.allocation, target_sparsity=result.target_sparsity,
                        interrupted=False)
        return df

    def _lookahead_cache(self, state) -> LookaheadCache:
        """The lookahead factors of the current weights (see :mod:`prune_lab.core.lookahead`), built once per
        weights fingerprint, layer by layer on first use."""
        if self._lookahead is None or self._lookahead[0] != state.fingerprint:
            self._lookahead = (state.fingerprint, LookaheadCache(self.graph, state.weights, state.scales))
        return self._lookahead[1]

    def clear_cache(self):
        super().clear_cache()
        self._lookahead = None

    @_locked
    def output_distortion(self, result: PruneResult, *, data=None, n: int = 256) -> dict:
        """``{"output_distortion", "loss_change"}`` of ``result`` on a calibration batch of ``data``.

        Token data (a causal LM): the relative distortion of the logits at the real tokens of each of ``n``
        calibration sequences (mean over sequences), and the change of the mean next-token loss; run in batches of
        the data's ``batch_size``, the dense logits kept between calls only when they are small (≤ 2²⁶ values)."""
        from ..data import as_tokens
        from ..training import next_token_stats

        data = self._data(data, "output distortion")
        x, y = self._calibration(data, n)
        key = (self.fingerprint, self._data_id(data), n)
        tokens = as_tokens(data, split="train")
        if tokens is not None:
            cached, kept, overrides = self._dense_out.get(key), [], self._overrides(result)
            per, nll_dense, nll_pruned, count = [], 0.0, 0.0, 0
            for i, a in enumerate(range(0, x.shape[0], tokens.batch_size)):
                ids, mask = x[a:a + tokens.batch_size], y[a:a + tokens.batch_size]
                d = cached[i] if cached is not None else _forward(self.model, ids, None, mask)
                p = _forward(self.model, ids, overrides, mask)
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
                self._dense_out = {key: kept}
            return {"output_distortion": float(torch.cat(per).mean()),
                    "loss_change": (nll_pruned - nll_dense) / max(count, 1)}
        dense = self._dense_out.get(key)
        if dense is None:
            dense = _forward(self.model, x, None)
            self._dense_out = {key: dense}
        pruned = _forward(self.model, x, self._overrides(result))
        per = (dense - pruned).flatten(1).norm(dim=1) / dense.flatten(1).norm(dim=1).clamp_min(1e-30)
        out = {"output_distortion": float(per.mean())}
        if y is not None and dense.dim() == 2 and y.dtype in (torch.int64, torch.int32):
            out["loss_change"] = float(F.cross_entropy(pruned, y) - F.cross_entropy(dense, y))
        return out

    def _calibration(self, data, n: int):
        key = ("calib", self._data_id(data), n)
        hit = self._evals.get(key)
        if hit is None:
            hit = calibration_batch(data, n=n)
            self._evals[key] = hit
        return hit

    # ------------------------------------------------------------------------------------------------------------
    def distortion_curve(self, method: str, sparsities, *, allocation: str | None = None, seed: int = 0, **hp
                         ) -> pd.DataFrame:
        """Single-layer distortion at every sparsity of a grid: ``sparsity, layer, n_weights, layer_sparsity,
        frobenius, relative_frobenius``. For score methods the whole curve comes from one sort (cached) and the
        cumulative sums: no masks are built."""
        rows = []
        for s in sparsities:
            res = self.prune(method, s, allocation=allocation, seed=seed, **hp)
            for i, n in enumerate(res.layers):
                rows.append({"sparsity": float(s), "layer": n, "n_weights": res.numel[i],
                             "layer_sparsity": res.pruned[i] / res.numel[i], "frobenius": res.frobenius[n],
                             "relative_frobenius": res.relative_frobenius[n]})
        df = pd.DataFrame(rows)
        df.attrs.update(method=method, allocation=allocation or get_method(method).default_allocation)
        return df

    # ------------------------------------------------------------------------------------------------------------
    def sensitivity(self, method: str = "magnitude", grid=_sens.DEFAULT_GRID, *, metric: str | None = None,
                    install: bool = True, **kw) -> pd.DataFrame:
        """Layer sensitivity: each prunable layer pruned alone at each sparsity of ``grid`` (the rest dense), the
        network evaluated; a tidy DataFrame, one row per (layer, sparsity). See
        :func:`prune_lab.analysis.sensitivity.sensitivity` for the columns and keyword arguments (``layers``,
        ``data``, ``batch``, ``callback``, ``stop``, ``cache_dir``, ``backend``, …). Points are cached in this
        session by content. A complete run over every layer becomes the table of allocation ``sensitivity`` for
        these weights (``install=False``: not; :meth:`use_sensitivity` chooses another)."""
        df = _sens.sensitivity(self, method, grid, metric=metric, memo=self._points, **kw)
        complete = not df.attrs["interrupted"] and set(df["layer"]) == set(self.layer_names)
        if install and complete:
            super().use_sensitivity(_sens.sensitivity_table(df))
        df.attrs["installed"] = bool(install and complete)
        return df

    def use_sensitivity(self, table) -> SensitivityTable | None:
        """Set the table allocation ``sensitivity`` uses in this session: a :meth:`sensitivity` DataFrame (its
        loss increase, else its metric's increase), a :class:`~prune_lab.core.allocation.SensitivityTable`, or
        ``None``. It applies while the weights are those it was measured on."""
        if isinstance(table, pd.DataFrame):
            table = _sens.sensitivity_table(table)
        if table is not None and not isinstance(table, SensitivityTable):
            raise TypeError(f"use_sensitivity takes a session.sensitivity(...) DataFrame, a SensitivityTable or "
                            f"None, got {type(table).__name__}.")
        return super().use_sensitivity(table)

    def compare_allocations(self, sparsities, *, method: str = "magnitude", allocations=_sens.COMPARED,
                            **kw) -> pd.DataFrame:
        """``method`` under allocation ``sensitivity`` and the others (uniform, global, lamp, uniform_plus, erk)
        at each sparsity, evaluated; see :func:`prune_lab.analysis.sensitivity.compare_allocations`."""
        return _sens.compare_allocations(self, sparsities, method=method, allocations=allocations, **kw)

    # ------------------------------------------------------------------------------------------------------------
    @_locked
    def sweep(self, methods, sparsities, *, allocations=None, seeds=(0,), finetune: dict | None = None, data=None,
              recalibrate_bn: bool = False, progress: bool = True, backend: str = "local", workers: int | None = None,
              cache_dir=None, address: str | None = None, retries: int = 3, **hp) -> pd.DataFrame:
        """Accuracy and loss over methods × allocations × sparsities × seeds: a row per point with ``method,
        allocation, sparsity, seed, achieved_sparsity, accuracy, loss, finetuned`` (a second row per point with
        ``finetuned=True`` when ``finetune`` — keyword arguments of :func:`prune_lab.train`, e.g.
        ``{"epochs": 1}`` — is given). ``recalibrate_bn``: evaluate each pruned network after re-estimating its
        BatchNorm statistics. ``allocations``: ``None`` (each method's paper default), a name, or a list of names.

        Every point is cached by content (weights fingerprint, data identity, the point's settings): in this
        session, and with ``cache_dir`` in a folder (:class:`~prune_lab.analysis.sweeps.ResultStore`) that later
        runs, other processes and other machines reuse. An interrupted sweep returns what it finished and keeps it.

        ``backend``: ``"local"`` (this process; a process pool with ``workers`` > 1) or ``"ray"`` (a Ray task per
        point on the cluster at ``address``, see :mod:`prune_lab.analysis.sweeps`; a task lost with its worker is
        retried up to ``retries`` times). ``df.attrs`` tells ``computed`` and ``cached`` point counts.
        """
        methods = [methods] if isinstance(methods, str) else list(methods)
        if allocations is None or isinstance(allocations, str):
            allocations = [allocations]
        sparsities = [check_sparsity(s) for s in sparsities]
        for m in methods:
            get_method(m)
        workers = check_backend(backend, workers)
        if backend == "ray" and workers != 1:
            raise ValueError("workers applies to backend='local'; under Ray each point is a task using one CPU of "
                             "the cluster.")
        data = self._data(data, "sweep")
        if "sensitivity" in allocations and self.sensitivity_table is not None:
            raise ValueError("sweep points are not keyed by the session's sensitivity table yet: compare allocation "
                             "'sensitivity' with session.compare_allocations(sparsities), or drop the table first "
                             "(session.use_sensitivity(None)).")
        points = [SweepPoint.make(m, a, s, seed, finetune, hp, recalibrate_bn)
                  for m in methods for a in allocations for seed in seeds for s in sparsities]
        store = ResultStore(cache_dir) if cache_dir is not None else None
        fingerprint, data_id = self.fingerprint, self._data_id(data)
        keys = [p.key(fingerprint, data_id) for p in points]
        todo = {}  # key → point, in order, once each
        for p, k in zip(points, keys):
            if k not in self._points and store is not None and (hit := store.get(k)) is not None:
                self._points[k] = hit
            if k not in self._points:
                todo.setdefault(k, p)
        cached = len(set(keys)) - len(todo)
        computed, interrupted = 0, False
        bar = tqdm(total=len(set(keys)), initial=cached, desc=f"sweep ({backend})", disable=not progress)
        try:
            if backend == "local" and workers == 1:
                finished = ((p, *compute_point(self, p, data, store)) for p in todo.values())
            else:
                payload = make_payload(self, data)
                finished = (run_ray(payload, list(todo.values()), store, address=address, retries=retries)
                            if backend == "ray" else run_local_pool(payload, list(todo.values()), store, workers))
            for p, rows, was_computed in finished:
                self._points[p.key(fingerprint, data_id)] = rows
                computed += bool(was_computed)
                bar.set_postfix_str(p.label())
                bar.update()
        except KeyboardInterrupt:
            interrupted = True
            warnings.warn(f"sweep interrupted after {computed} computed points; finished points stay cached.",
                          stacklevel=2)
        finally:
            bar.close()
        rows = [{**r, "seed": p.seed} for p, k in zip(points, keys) for r in self._points.get(k, [])]
        columns = ["method", "allocation", "sparsity", "seed", "achieved_sparsity", "accuracy", "loss", "finetuned"]
        columns += sorted({c for r in rows for c in r} - set(columns))  # e.g. perplexity for language models
        df = pd.DataFrame(rows, columns=columns)
        df.attrs.update(interrupted=interrupted, computed=computed, cached=cached)
        return df

    def _sweep_point(self, method, alloc, s, seed, finetune, data, hp, recalibrate_bn=False) -> list:
        spec = get_method(method)
        alloc_name = alloc or spec.default_allocation
        res = self.prune(method, s, allocation=alloc, seed=seed, **hp)
        base = {"method": method, "allocation": alloc_name, "sparsity": s,
                "seed": seed, "achieved_sparsity": res.sparsity}
        rows = [{**base, **self.evaluate(res, data, recalibrate_bn=recalibrate_bn), "finetuned": False}]
        if finetune:
            key = ("finetune", self.fingerprint, self._data_id(data), _result_key(res),
                   tuple(sorted((k, repr(v)) for k, v in finetune.items())))
            hit = self._evals.get(key)
            if hit is None:
                model = self._pruned_copy(res)
                train(model, data, masks=res.masks, seed=seed, **{"progress": False, **finetune})
                hit = evaluate(model, data, masks=res.masks)
                self._evals[key] = hit
            rows.append({**base, **hit, "finetuned": True})
        return rows


def _result_key(result: PruneResult | None):
    if result is None:
        return None
    return (result.method, result.allocation, result.target_sparsity, repr(sorted(result.hyperparameters.items())),
            result.seed, result.pruned)
