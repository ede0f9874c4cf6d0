"""Layer sensitivity: every prunable layer pruned alone over a sparsity grid (the rest dense), the whole network
evaluated each time — the classic "sensitivity analysis" of compression toolkits — and the allocation it implies.

``session.sensitivity(method, grid, metric=...)`` (:func:`sensitivity`) returns a tidy DataFrame, one row per
(layer, sparsity). A point is a lookup in the session's cached ranking of ``method`` (one sort for every point) plus
one evaluation with a single layer's mask applied through ``functional_call``; sparsity-dependent methods (sequential
LAP, SynFlow, the OBS family) go through ``session.prune_query`` with every other layer locked dense (``overrides``).

Points are cached by content like sweep points (weights fingerprint, data identity, the point's
:class:`~prune_lab.engine.query.Query`, layer, what is measured), in the session and, with ``cache_dir``, in a
:class:`~prune_lab.analysis.sweeps.ResultStore` folder; an interrupted run (Ctrl-C, or ``stop.set()`` from another
thread) returns what it finished and a second call computes only the rest. ``backend="local"`` with ``workers`` > 1
and ``backend="ray"`` run the points on the sweep backends.

For a live panel: :func:`iter_sensitivity` yields each finished row, and ``callback(row, done, total)`` is called
after each point; :func:`sensitivity_frame` turns any list of rows (a partial run) into the same DataFrame.

The implied allocation (:func:`sensitivity_table`, :func:`sensitivity_allocation`, and the registered
``sensitivity`` allocation of :mod:`prune_lab.core.allocation`) gives every layer the same loss increase at a
target sparsity; :func:`compare_allocations` sets it beside the other allocations.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.allocation import SensitivityTable, equalise_counts, list_allocations
from ..core.validation import check_choice, check_int, check_sparsity, round_half_up
from ..data import calibration_batch
from ..engine.query import Query
from ..methods import get_method
from ..training import evaluate
from .outputs import model_output as _forward
from .sweeps import ResultStore, check_backend, make_payload, run_local_pool, run_ray

SCHEMA = 2  # bump when what a point computes or how it is keyed changes
METRICS = ("accuracy", "loss", "perplexity", "output_distortion")
HIGHER_IS_BETTER = frozenset({"accuracy"})
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
COMPARED = ("sensitivity", "uniform", "global", "lamp", "uniform_plus", "erk")
VIAS = ("ranking", "prune")
COLUMNS = ["layer", "order", "n_weights", "sparsity", "layer_sparsity", "pruned", "method", "metric", "value",
           "dense", "increase"]


@dataclass(frozen=True)
class SensitivityPoint:
    """One layer pruned alone to one sparsity: ``query`` is that pruning as a
    :class:`~prune_lab.engine.query.Query` (the method at the point's sparsity, allocation ``uniform``, every other
    layer locked dense by ``overrides``), ``layer`` the layer pruned; ``kind``: ``"evaluate"`` (accuracy and loss,
    perplexity for token data, on held-out data) or ``"output_distortion"`` (on a batch of inputs); ``via``:
    ``"ranking"`` (the cached ranking, one layer's mask) or ``"prune"`` (``session.prune_query(query)``): both give
    the same masks, so the key leaves it out."""

    query: Query
    layer: str
    kind: str
    via: str = "ranking"

    @classmethod
    def make(cls, method: str, layer: str, sparsity: float, kind: str, layers, *, seed: int = 0, hp=None,
             via: str = "ranking") -> "SensitivityPoint":
        """The point of ``layer`` (one of ``layers``, the model's prunable layers) at ``sparsity``."""
        others = {n: 0.0 for n in layers if n != layer}
        query = Query.make(method, sparsity, allocation="uniform", seed=seed, overrides=others, **(hp or {}))
        return cls(query, layer, kind, via)

    @property
    def method(self) -> str:
        return self.query.method

    @property
    def sparsity(self) -> float:
        return self.query.sparsity

    def key(self, fingerprint: str, data_id: str) -> str:
        """The content address of this point on these weights and this data (or batch)."""
        blob = json.dumps({"schema": SCHEMA, "kind_of_point": "sensitivity", "model": fingerprint, "data": data_id,
                           "query": self.query.key, "layer": self.layer, "kind": self.kind}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def label(self) -> str:
        return f"{_short(self.layer)} @ {self.sparsity:g}"

    def run(self, session, data) -> list:
        """The point's row, computed on ``session`` (the sweep backends call this in their workers)."""
        return [compute_sensitivity_point(session, self, data)]


def _short(name: str) -> str:
    return name[:-7] if name.endswith(".weight") else name


# ----------------------------------------------------------------------------------------------------------------
# one point
# ----------------------------------------------------------------------------------------------------------------
def _layer_mask(session, point: SensitivityPoint) -> tuple:
    """``(masks, weights, pruned, n)`` for ``point``: only the pruned layer's mask (``via="ranking"``), or the
    engine's result with every other layer locked dense (``via="prune"``)."""
    q = point.query
    if point.via == "ranking":
        lr = session.ranking(q.method, seed=q.seed or 0, **q.hp).subset([point.layer])
        n = lr.layers[point.layer].numel
        c = round_half_up(q.sparsity * n)
        return lr.masks([c]), None, c, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a layer emptied on purpose is not news here
        res = session.prune_query(q)
    i = res.layers.index(point.layer)
    return res.masks, res.weights, res.pruned[i], res.numel[i]


def compute_sensitivity_point(session, point: SensitivityPoint, data) -> dict:
    """Evaluate one point: ``data`` is the evaluation data (``kind="evaluate"``) or the batch of inputs
    (``kind="output_distortion"``). Holds the session's lock while it evaluates (a dashboard refresh may run
    between points)."""
    with session.lock:
        masks, weights, pruned, n = _layer_mask(session, point)
        row = {"method": point.method, "layer": point.layer, "n_weights": n, "sparsity": point.sparsity,
               "layer_sparsity": pruned / n if n else 0.0, "pruned": int(pruned)}
        if point.kind == "evaluate":
            row.update(evaluate(session.model, data, masks=masks, weights=weights, device=session.device))
            return row
        params = dict(session.model.named_parameters())
        overrides = {}
        for name, m in masks.items():
            w = weights[name] if weights is not None else params[name].detach()
            overrides[name] = w.to(params[name].device, params[name].dtype) * m.to(params[name].device)
        key = (session.fingerprint, session.data_id(data))
        dense = session.memo.slot("sensitivity_dense_out", key, lambda: _forward(session.model, data, None))
        out = _forward(session.model, data, overrides)
        per = (dense - out).flatten(1).norm(dim=1) / dense.flatten(1).norm(dim=1).clamp_min(1e-30)
        row["output_distortion"] = float(per.mean())
        return row


# ----------------------------------------------------------------------------------------------------------------
# a whole run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    points: list
    keys: list
    metric: str
    data: object  # evaluation data or the batch of inputs
    data_id: str
    dense: float
    fingerprint: str
    layers: list
    order: dict


def _resolve(session, method, grid, metric, layers, data, batch, n_calibration, seed, via, hp) -> _Plan:
    spec = get_method(method)
    grid = sorted({check_sparsity(s, what="grid") for s in (grid if not np.isscalar(grid) else [grid])})
    if not grid:
        raise ValueError("grid must hold at least one sparsity in [0, 1), e.g. (0.5, 0.7, 0.9).")
    seed = check_int(seed, what="seed")
    all_layers = list(session.layer_names)
    if layers is None:
        layers = all_layers
    else:
        layers = [layers] if isinstance(layers, str) else list(layers)
        for n in layers:
            if n not in all_layers:
                raise ValueError(f"layers: {n!r} is not a prunable layer of this model; valid layers: "
                                 f"{', '.join(map(repr, all_layers[:8]))}{', …' if len(all_layers) > 8 else ''}.")
        layers = [n for n in all_layers if n in set(layers)]  # data-flow order
    data = data if data is not None else session.data
    if metric is None:
        metric = "loss" if data is not None else "output_distortion" if batch is not None else None
        if metric is None:
            raise ValueError("sensitivity needs data to evaluate the pruned network: pass data=... (here or to the "
                             "session) for metric 'accuracy', 'loss' or 'perplexity', or, without labelled data, "
                             "batch=<a tensor of inputs> for metric='output_distortion'.")
    metric = check_choice(metric, METRICS, what="metric")
    if via is None:
        via = "prune" if spec.sparsity_dependent else "ranking"
    via = check_choice(via, VIAS, what="via")
    if via == "ranking" and spec.sparsity_dependent:
        raise ValueError(f"method {method!r} depends on the sparsity (no cached ranking to look up); use via='prune' "
                         f"(the default for it).")
    if metric == "output_distortion":
        if batch is None and data is None:
            raise ValueError("metric='output_distortion' needs a batch of inputs: pass batch=<tensor (N, ...)> (or "
                             "an (inputs, targets) pair), or data=... to draw a calibration batch from.")
        if batch is None:
            batch = calibration_batch(data, n=n_calibration)[0]
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() < 1 or batch.shape[0] == 0:
            raise ValueError(f"batch must be a non-empty tensor of inputs (N, ...), got "
                             f"{type(batch).__name__}{tuple(batch.shape) if isinstance(batch, torch.Tensor) else ''}.")
        data, kind, dense = batch, "output_distortion", 0.0
    else:
        if data is None:
            raise ValueError(f"metric={metric!r} needs data with labels: pass data=... here or to the session. "
                             f"Without data, use metric='output_distortion' with batch=<a tensor of inputs>.")
        kind = "evaluate"
        ref = session.evaluate(None, data)
        if metric not in ref:
            raise ValueError(f"metric {metric!r} is not measured on this data (the evaluation gives "
                             f"{', '.join(sorted(ref))}); 'perplexity' needs token data (a causal LM).")
        dense = float(ref[metric])
    points = [SensitivityPoint.make(spec.name, n, s, kind, all_layers, seed=seed, hp=hp, via=via)
              for n in layers for s in grid]  # the first one validates the hyperparameters
    fingerprint, data_id = session.fingerprint, session.data_id(data)
    return _Plan(points, [p.key(fingerprint, data_id) for p in points], metric, data, data_id, dense, fingerprint,
                 layers, {n: i for i, n in enumerate(all_layers)})


def _complete(row: dict, plan: _Plan, dense_stats: dict | None) -> dict:
    """A point's raw row with the columns every row has: ``order, metric, value, dense, increase`` (the harm:
    higher = worse for every metric), ``loss_increase`` when the loss was measured."""
    value = float(row[plan.metric])
    increase = plan.dense - value if plan.metric in HIGHER_IS_BETTER else value - plan.dense
    out = {**row, "order": plan.order[row["layer"]], "metric": plan.metric, "value": value, "dense": plan.dense,
           "increase": increase}
    if dense_stats is not None and "loss" in row:
        out["loss_increase"] = float(row["loss"]) - float(dense_stats["loss"])
    return out


def iter_sensitivity(session, method: str = "magnitude", grid=DEFAULT_GRID, *, metric: str | None = None,
                     layers=None, data=None, batch=None, n_calibration: int = 256, seed: int = 0, via=None,
                     memo: dict | None = None, cache_dir=None, backend: str = "local", workers: int | None = None,
                     address: str | None = None, retries: int = 3, stop: threading.Event | None = None, **hp):
    """Yield ``(row, computed)`` for every (layer, sparsity) point of a sensitivity run, as each finishes (cached
    points first, in order). ``row`` holds the final columns (see :func:`sensitivity`); ``computed`` is False for
    points found in ``memo`` (a dict, e.g. the session's) or the store at ``cache_dir``. Stops between points when
    ``stop`` (a ``threading.Event``) is set. Arguments as for :func:`sensitivity`."""
    plan = _resolve(session, method, grid, metric, layers, data, batch, n_calibration, seed, via, hp)
    yield from _run(session, plan, memo, cache_dir, backend, workers, address, retries, stop)


def _run(session, plan: _Plan, memo, cache_dir, backend, workers, address, retries, stop):
    workers = check_backend(backend, workers)
    if backend == "ray" and workers != 1:
        raise ValueError("workers applies to backend='local'; under Ray each point is a task using one CPU.")
    memo = {} if memo is None else memo
    store = ResultStore(cache_dir) if cache_dir is not None else None
    dense_stats = session.evaluate(None, plan.data) if plan.metric != "output_distortion" else None
    todo = {}
    for p, k in zip(plan.points, plan.keys):
        if k not in memo and store is not None and (hit := store.get(k)) is not None:
            memo[k] = hit
        if k in memo:
            yield _complete(memo[k][0], plan, dense_stats), False
        else:
            todo.setdefault(k, p)
    if not todo:
        return
    if backend == "local" and workers == 1:
        def local():
            for k, p in todo.items():
                if stop is not None and stop.is_set():
                    return
                if store is not None and (hit := store.get(k)) is not None:
                    yield p, hit, False
                    continue
                claim = store.claim(k) if store is not None else None
                try:
                    t0 = time.perf_counter()
                    rows = p.run(session, plan.data)
                    if store is not None:
                        store.put(k, rows, p, time.perf_counter() - t0)
                finally:
                    if claim is not None:
                        store.release(claim)
                yield p, rows, True
        finished = local()
    else:
        payload = make_payload(session, plan.data)
        finished = (run_ray(payload, list(todo.values()), store, address=address, retries=retries)
                    if backend == "ray" else run_local_pool(payload, list(todo.values()), store, workers))
    try:
        for p, rows, computed in finished:
            memo[p.key(plan.fingerprint, plan.data_id)] = rows
            yield _complete(rows[0], plan, dense_stats), bool(computed)
            if stop is not None and stop.is_set():
                return
    finally:
        close = getattr(finished, "close", None)
        if close is not None:
            close()


def sensitivity(session, method: str = "magnitude", grid=DEFAULT_GRID, *, metric: str | None = None, layers=None,
                data=None, batch=None, n_calibration: int = 256, seed: int = 0, via=None, memo: dict | None = None,
                cache_dir=None, backend: str = "local", workers: int | None = None, address: str | None = None,
                retries: int = 3, progress: bool = True, callback=None, stop: threading.Event | None = None,
                **hp) -> pd.DataFrame:
    """Prune each layer alone at each sparsity of ``grid`` (the rest dense) and evaluate the whole network.

    Returns a tidy DataFrame, one row per (layer, sparsity), layers in data-flow order: ``layer, order, n_weights,
    sparsity`` (the grid point), ``layer_sparsity`` (achieved: ``round(s·n)/n``), ``pruned, method, metric, value``
    (the metric's value), ``dense`` (its dense value), ``increase`` (the harm: ``value − dense``, or
    ``dense − value`` for accuracy), and every measured statistic as its own column (``accuracy, loss`` — and
    ``perplexity`` for token data — plus ``loss_increase``; or ``output_distortion``).

    ``metric``: ``"accuracy"``, ``"loss"``, ``"perplexity"`` (token data) or ``"output_distortion"``
    (``mean_x ‖f(x;W) − f(x;W̃)‖/‖f(x;W)‖`` on ``batch``, a tensor of inputs, or on a calibration batch of
    ``n_calibration`` samples of ``data``: data-free models supply ``batch``). Default: ``"loss"`` with data, else
    ``"output_distortion"`` with a batch. ``layers``: a subset (names). ``via``: ``"ranking"`` (default for score
    methods) or ``"prune"`` (``session.prune`` with ``overrides`` locking every other layer at 0.0; the default
    for sparsity-dependent methods).

    ``progress``: a tqdm bar; ``callback(row, done, total)`` after each point; ``stop``: a ``threading.Event``
    checked between points. Interrupted (Ctrl-C or ``stop``), it returns the rows it has, with
    ``df.attrs["interrupted"] = True``; finished points stay cached. ``df.attrs`` also tells ``computed``,
    ``cached``, ``total``, ``dense`` (the dense statistics), ``fingerprint`` and ``seconds``.

    >>> import torch, prune_lab as pl
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> s = pl.PruneSession(net)
    >>> df = s.sensitivity(grid=[0.5], batch=torch.randn(16, 4), progress=False)
    >>> df[["layer", "sparsity", "metric"]].values.tolist()
    [['0.weight', 0.5, 'output_distortion'], ['2.weight', 0.5, 'output_distortion']]
    """
    plan = _resolve(session, method, grid, metric, layers, data, batch, n_calibration, seed, via, hp)
    total = len(plan.points)
    rows, computed, interrupted = [], 0, False
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"sensitivity ({plan.metric})", disable=not progress)
    try:
        for row, was_computed in _run(session, plan, memo, cache_dir, backend, workers, address, retries, stop):
            rows.append(row)
            computed += was_computed
            bar.set_postfix_str(f"{_short(row['layer'])} @ {row['sparsity']:g}")
            bar.update()
            if callback is not None:
                callback(row, len(rows), total)
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(f"sensitivity interrupted after {computed} computed points; finished points stay cached.",
                      stacklevel=2)
    finally:
        bar.close()
    interrupted = interrupted or len(rows) < total
    df = sensitivity_frame(rows)
    df.attrs.update(interrupted=interrupted, computed=computed, cached=len(rows) - computed, total=total,
                    metric=plan.metric, method=plan.points[0].method, fingerprint=plan.fingerprint,
                    layers=list(plan.layers), seconds=time.perf_counter() - t0,
                    dense=dict(session.evaluate(None, plan.data)) if plan.metric != "output_distortion" else {})
    return df


def sensitivity_frame(rows) -> pd.DataFrame:
    """The tidy DataFrame of :func:`sensitivity` from rows (all, or those finished so far), sorted by layer order
    and sparsity; the fixed columns first."""
    rows = list(rows)
    extra = sorted({c for r in rows for c in r} - set(COLUMNS))
    df = pd.DataFrame(rows, columns=COLUMNS + extra)
    if len(df):
        df = df.sort_values(["order", "sparsity"], kind="stable").reset_index(drop=True)
    return df


# ----------------------------------------------------------------------------------------------------------------
# the implied allocation
# ----------------------------------------------------------------------------------------------------------------
def _check_frame(df):
    if not isinstance(df, pd.DataFrame) or not {"layer", "layer_sparsity", "increase"} <= set(df.columns):
        raise TypeError("expected the DataFrame of session.sensitivity(...) (columns layer, layer_sparsity, "
                        f"increase, …), got {type(df).__name__}.")
    if not len(df):
        raise ValueError("the sensitivity table is empty: run session.sensitivity(...) first.")


def sensitivity_table(df: pd.DataFrame, column: str | None = None) -> SensitivityTable:
    """The :class:`~prune_lab.core.allocation.SensitivityTable` of a :func:`sensitivity` DataFrame: per layer, the
    harm ``column`` at the achieved layer sparsities. ``column``: default ``"loss_increase"`` when the loss was
    measured (the allocation equalises the loss increase), else ``"increase"`` (the run's metric: accuracy drop,
    perplexity or output distortion)."""
    _check_frame(df)
    if column is None:
        column = "loss_increase" if "loss_increase" in df.columns and df["loss_increase"].notna().all() \
            else "increase"
    if column not in df.columns:
        raise ValueError(f"column {column!r} is not in the sensitivity table; choose one of "
                         f"{', '.join(repr(c) for c in df.columns if c.endswith('increase'))}.")
    order = df.drop_duplicates("layer").sort_values("order", kind="stable")["layer"].tolist() \
        if "order" in df.columns else list(dict.fromkeys(df["layer"]))
    groups = {n: g.sort_values("layer_sparsity") for n, g in df.groupby("layer", sort=False)}
    metric = "loss" if column == "loss_increase" else str(df["metric"].iloc[0]) if "metric" in df.columns else column
    return SensitivityTable.make(order, [groups[n]["layer_sparsity"].to_numpy() for n in order],
                                 [groups[n][column].to_numpy() for n in order], metric=metric,
                                 fingerprint=str(df.attrs.get("fingerprint", "")))


def sensitivity_allocation(df: pd.DataFrame, sparsity: float, *, column: str | None = None) -> pd.DataFrame:
    """The per-layer sparsities that give every measured layer the same harm at model ``sparsity`` (over the
    measured layers): ``layer, n_weights, pruned, sparsity, increase`` (the layer's curve read at its allocated
    sparsity, interpolated). ``pruned`` sums to ``round(sparsity · total)`` exactly; this is what the registered
    ``sensitivity`` allocation computes from the same table."""
    s = check_sparsity(sparsity)
    table = sensitivity_table(df, column)
    sizes = df.drop_duplicates("layer").set_index("layer")["n_weights"].reindex(list(table.names)).to_numpy()
    sizes = sizes.astype(np.int64)
    curves = [table.curve(n) for n in table.names]
    counts = equalise_counts(curves, sizes, round_half_up(s * int(sizes.sum())))
    rows = []
    for n, k, c, (x, y) in zip(table.names, sizes, counts, curves):
        rows.append({"layer": n, "n_weights": int(k), "pruned": int(c), "sparsity": c / k if k else 0.0,
                     "increase": float(np.interp(c / k if k else 0.0, x, y))})
    out = pd.DataFrame(rows)
    out.attrs.update(target_sparsity=s, metric=table.metric)
    return out


def compare_allocations(session, sparsities, *, method: str = "magnitude", allocations=COMPARED, data=None,
                        table: SensitivityTable | pd.DataFrame | None = None, recalibrate_bn: bool = False
                        ) -> pd.DataFrame:
    """``method``'s scores under each allocation at each sparsity, evaluated: ``sparsity, allocation,
    achieved_sparsity, accuracy, loss, empty_layers, min_layer_density, error`` (an allocation that cannot reach a
    sparsity, e.g. Uniform+, gets a row with the reason in ``error``). ``table``: the sensitivity table (or its
    DataFrame) for allocation ``sensitivity``; default: the session's (the latest complete
    ``session.sensitivity`` run on these weights); without one, allocation ``sensitivity`` gets its row with the
    reason in ``error``."""
    sparsities = [sparsities] if np.isscalar(sparsities) else list(sparsities)
    allocations = [allocations] if isinstance(allocations, str) else list(allocations)
    for a in allocations:
        check_choice(a, list_allocations(), what="allocation")
    if isinstance(table, pd.DataFrame):
        table = sensitivity_table(table)
    rows = []
    for s in sparsities:
        s = check_sparsity(s)
        for a in allocations:
            row = {"sparsity": s, "allocation": a}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # emptied layers are reported in the table
                    if table is not None and a == "sensitivity":
                        before = session.sensitivity_table
                        session.use_sensitivity(table)
                        try:
                            res = session.prune(method, s, allocation=a)
                        finally:
                            session.use_sensitivity(before)
                    else:
                        res = session.prune(method, s, allocation=a)
            except ValueError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            density = [1 - res.layer_sparsity[n] for n in res.layers]
            rows.append({**row, "achieved_sparsity": res.sparsity,
                         **session.evaluate(res, data, recalibrate_bn=recalibrate_bn),
                         "empty_layers": len(res.empty_layers), "min_layer_density": min(density), "error": ""})
    cols = ["sparsity", "allocation", "achieved_sparsity", "accuracy", "loss", "empty_layers", "min_layer_density",
            "error"]
    df = pd.DataFrame(rows)
    df = df.reindex(columns=cols + sorted(set(df.columns) - set(cols)))
    df.attrs.update(method=method, table=None if table is None else table.key)
    return df
