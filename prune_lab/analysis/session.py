"""PruneSession: score once, threshold many — one class, built from small parts.

A session is a composition; each part has one job and a public interface:

- ``session.snapshot`` (:class:`~prune_lab.engine.weights.WeightSnapshot`): the model's prunable structure, the
  cheap check whether the weights changed, the content fingerprint;
- ``session.cache`` (:class:`~prune_lab.engine.cache.RankingCache`): rankings and mask sets keyed by the query,
  bounded by ``max_cached``, with its own file format (:meth:`PruneSession.save_cache`);
- ``session.memo`` (:class:`~prune_lab.analysis.measures.Memo`): evaluations, calibration batches and
  fine-tunings keyed by content (weights fingerprint, data identity, query), and ``session.points``: finished sweep
  and sensitivity points;
- ``session.lock``: held by every call that evaluates or swaps weights in, shared by the lab and notebook cells.

Pruning is :func:`prune_lab.engine.prune.prune_query` on these parts (``pl.prune`` runs the same function on parts
of its own); the analysis operations are functions of a session in :mod:`prune_lab.analysis`
(:func:`~prune_lab.analysis.measures.distortion`, :func:`~prune_lab.analysis.sweeps.sweep`,
:func:`~prune_lab.analysis.sensitivity.sensitivity`, …), which the methods of the same names call. The class sits in
the analysis layer because its methods reach that far; the engine has no session class, so imports point one way.

The user's model is never changed: weights are read (detached), never written. When the model's weights change after
the session was made (training, loading a checkpoint), the next call notices, takes a new fingerprint and scores
again (see :mod:`prune_lab.engine.weights`); call :meth:`PruneSession.clear_cache` after editing a few entries
through ``.data``.
"""
from __future__ import annotations

import copy
import threading

import pandas as pd
import torch
from torch import nn

from ..core.allocation import SensitivityTable, get_allocation
from ..core.device import resolve_device
from ..core.ranking import Ranking
from ..data import data_identity
from ..engine.cache import RankingCache
from ..engine.prune import prune_query, ranking_for, score_context, scores_for
from ..engine.query import Query
from ..engine.result import PruneResult
from ..engine.weights import WeightSnapshot, masks_key
from ..methods import get_method
from ..methods.registry import ScoreContext
from ..training import evaluate, train
from ..training import recalibrate_bn as recalibrate
from . import measures
from . import sensitivity as _sens
from . import sweeps as _sweeps

MODEL_ROW = measures.MODEL_ROW


def _score_dtype(value):
    """``None`` / float32: the scores' own precision; bfloat16: rounded to bfloat16."""
    if value is None or value in ("float32", torch.float32):
        return None
    if value in ("bfloat16", torch.bfloat16):
        return torch.bfloat16
    raise ValueError(f"score_dtype must be None, 'float32' or 'bfloat16', got {value!r}.")


class PruneSession:
    """Prune one model many times, fast; measure and evaluate what was pruned.

    ``model``: any ``nn.Module`` (never modified); ``data``: a prune_lab data bundle, a DataLoader or an
    ``(inputs, targets)`` batch, for methods that need data and for :meth:`evaluate`; ``device``: ``"auto"`` (CUDA
    when present), ``"cpu"``, ``"cuda"``; ``include`` / ``exclude``: glob patterns on weight names narrowing the
    prunable set; ``score_dtype``: ``None`` (default) ranks every method's scores at their own precision (float32
    at most; ``|w|`` of bfloat16 weights stays bfloat16), ``torch.bfloat16`` (or ``"bfloat16"``) rounds every
    method's scores to bfloat16 first: a coarser ranking (ties broken by position) whose keys take no memory per
    weight.

    Device: with ``device="cuda"`` the weights' copies, scores, orders, cumulative sums and masks stay on the GPU
    and :meth:`evaluate` runs there; the sorted score keys alone live in host memory, so a sparsity change (the
    bisection) needs no device synchronisation: a warm :meth:`prune` makes two transfers in all (the weights'
    64-entry change check and every layer's distortion), never one per layer. The first call on new weights reads
    them once on the host (the fingerprint).

    >>> import torch, prune_lab as pl
    >>> s = pl.PruneSession(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    >>> [round(s.prune("lamp", x).sparsity, 3) for x in (0.5, 0.9)]
    [0.5, 0.9]
    >>> list(s.distortion(s.prune("lamp", 0.5)).columns[:4])
    ['layer', 'n_weights', 'sparsity', 'frobenius']

    Memory: the session keeps at most ``max_cached`` rankings (one per method × hyperparameters × seed × starting
    masks; about 6 bytes per prunable weight each for float32 scores, 4 for bfloat16 scores, and LAMP adds only its
    keys to magnitude's ranking: see :mod:`prune_lab.core.ranking`) and at most ``max_cached`` mask sets of
    sparsity-dependent methods, each evicting its least recently used entry first. Set ``session.max_cached``
    (default :attr:`DEFAULT_MAX_CACHED`, 32) lower for big models; :meth:`cache_nbytes` tells what is held and
    :meth:`clear_cache` frees it. :meth:`save_cache` / :meth:`load_cache` keep the rankings across restarts.

    Tied (shared) weights are pruned once, under the first name ``named_parameters()`` gives; the other names are
    listed in ``session.tied_weights`` (and a warning says so).
    """

    DEFAULT_MAX_CACHED = 32

    def __init__(self, model: nn.Module, data=None, *, device="auto", include=None, exclude=None, score_dtype=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.data = data
        self.device = resolve_device(device)
        self.score_dtype = _score_dtype(score_dtype)
        #: the keyword arguments the session was made with (sweep workers rebuild it with these)
        self.options = dict(device=device, include=include, exclude=exclude, score_dtype=score_dtype)
        self.snapshot = WeightSnapshot(model, self.device, include=include, exclude=exclude)
        self.cache = RankingCache(max_cached=self.DEFAULT_MAX_CACHED, score_dtype=self.score_dtype,
                                  device=self.device)
        self.memo = measures.Memo()
        self.points: dict = {}  # finished sweep and sensitivity points: content key → rows
        #: every evaluating call holds it; a dashboard or a cell running several calls as one step shares it
        #: (``with session.lock: ...``)
        self.lock = threading.RLock()
        self._table: SensitivityTable | None = None  # the table of allocation "sensitivity" (use_sensitivity)
        self._identities: dict = {}  # id(data) → (data, identity)

    def __repr__(self):
        return (f"PruneSession({type(self.model).__name__}, {len(self.layer_names)} prunable layers, "
                f"device={str(self.device)!r})")

    # ------------------------------------------------------------------------------------------------------------
    # the parts' state, as users know it
    # ------------------------------------------------------------------------------------------------------------
    @property
    def graph(self):
        """The model's layer graph (:class:`~prune_lab.core.graph.LayerGraph`)."""
        return self.snapshot.graph

    @property
    def layer_names(self) -> list:
        """The prunable weights' names, in data-flow order."""
        return self.snapshot.layer_names

    @property
    def tied_weights(self) -> dict:
        """``{name: [other names of the same Parameter]}`` for shared weights (pruned once, under ``name``)."""
        return self.snapshot.tied_weights

    @property
    def fingerprint(self) -> str:
        """A content hash of the model's Linear/Conv weights and BatchNorm factors."""
        return self.snapshot.fingerprint

    @property
    def max_cached(self) -> int:
        """How many rankings (and how many mask sets) the session keeps at most."""
        return self.cache.max_cached

    @max_cached.setter
    def max_cached(self, n: int):
        self.cache.max_cached = int(n)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    def data_id(self, data=None) -> str:
        """The content identity of ``data`` (default: the session's), computed once per data object: the data's
        part of every evaluation and sweep key (see :func:`prune_lab.data.data_identity`)."""
        data = data if data is not None else self.data
        hit = self._identities.get(id(data))
        if hit is None or hit[0] is not data:
            hit = (data, data_identity(data))
            self._identities[id(data)] = hit
        return hit[1]

    # ------------------------------------------------------------------------------------------------------------
    # pruning
    # ------------------------------------------------------------------------------------------------------------
    def query(self, method: str, sparsity: float, *, allocation: str | None = None, seed: int = 0, masks=None,
              update=False, overrides: dict | None = None, **hp) -> Query:
        """The :class:`~prune_lab.engine.query.Query` :meth:`prune` answers for these arguments: the key of the
        session's caches (and of the lab's lookups). ``masks`` enter as their content key, the installed
        sensitivity table (allocation ``sensitivity``) as its key.

        >>> import torch, prune_lab as pl
        >>> s = pl.PruneSession(torch.nn.Linear(4, 2))
        >>> s.query("lamp", 0.5) == s.prune("lamp", 0.5).query
        True
        """
        with self.lock:
            return self._make_query(method, sparsity, allocation, seed, masks, update, overrides, hp)[0]

    def _make_query(self, method, sparsity, allocation, seed, masks, update, overrides, hp) -> tuple:
        """``(query, checked starting masks, sensitivity table)``; argument errors before the masks are read."""
        # the installed table (which checks the weights' fingerprint) only when the allocation reads one
        alloc = get_allocation(allocation if allocation is not None else get_method(method).default_allocation)
        table = self.sensitivity_table if "sensitivity" in alloc.needs else None
        q = Query.make(method, sparsity, allocation=allocation, seed=seed, overrides=overrides, update=update,
                       table="" if table is None else table.key, **hp)
        start = self.snapshot.check_masks(masks)
        if start is not None:
            q = q.replace(start=masks_key(start))
        return q, start, table

    def prune(self, method: str, sparsity: float, *, allocation: str | None = None, seed: int = 0, masks=None,
              update=False, overrides: dict | None = None, **hp) -> PruneResult:
        """Prune at ``sparsity`` (fraction removed, in [0, 1)) with ``method`` and ``allocation`` (default: the
        method's paper's allocation). ``masks``: start from these (already-pruned weights stay pruned; the result
        nests inside them). ``update``: ``False``, ``True`` (the first registered weight update) or an update's
        name: after selection, update the kept weights (``result.weights``). ``overrides``: ``{layer: sparsity}``
        locks those layers at their own sparsity (``0.0`` excludes a layer: it stays dense); the allocation shares
        the rest of the model's budget among the other layers (``uniform`` keeps them at ``sparsity``).
        ``hp``: the method's hyperparameters. Repeat calls at other sparsities are lookups; ``result.query`` is
        the key the result's masks and evaluations are cached under.
        """
        with self.lock:
            q, start, table = self._make_query(method, sparsity, allocation, seed, masks, update, overrides, hp)
            return prune_query(q, self.snapshot, self.cache, data=self.data, start=start, sensitivity=table,
                               update_given=None if update is False else update)

    def prune_query(self, query: Query, *, masks=None) -> PruneResult:
        """:meth:`prune` for a :class:`~prune_lab.engine.query.Query` (e.g. one kept as a key); ``masks``: the
        starting masks whose key is ``query.start``."""
        with self.lock:
            start = self.snapshot.check_masks(masks)
            if masks_key(start) != query.start:
                raise ValueError("masks do not match the query's starting-masks key (query.start); pass the masks "
                                 "the query was made with.")
            table = self.sensitivity_table if query.table else None  # only an allocation that reads one has a key
            if query.table and (table is None or table.key != query.table):
                raise ValueError("the query was made with another sensitivity table than the session's "
                                 "(query.table); install it with session.use_sensitivity(table).")
            return prune_query(query, self.snapshot, self.cache, data=self.data, start=start, sensitivity=table)

    def scores(self, method: str, *, seed: int = 0, masks=None, **hp) -> dict:
        """Raw per-weight scores ``{name: Tensor}`` of ``method`` (higher = keep), shapes of the weights."""
        with self.lock:
            spec = get_method(method)
            hpo = spec.make_hyperparameters(**hp)
            start = self.snapshot.check_masks(masks)
            return scores_for(spec, hpo, self.snapshot, self.cache, self.snapshot.current(), seed=seed, start=start,
                              data=self.data)

    def ranking(self, method: str, *, seed: int = 0, **hp) -> Ranking:
        """The cached :class:`~prune_lab.core.ranking.Ranking` of ``method``'s scores (computed on first use)."""
        with self.lock:
            q = Query.make(method, 0.0, seed=seed, **hp)
            return ranking_for(q, self.snapshot, self.cache, self.snapshot.current(), data=self.data)

    def score_context(self, *, seed: int = 0, masks=None) -> ScoreContext:
        """What a method's score function sees for the current weights
        (:class:`~prune_lab.methods.registry.ScoreContext`; its ``cache`` is the session's scratch for these
        weights): to call a method's pieces by hand."""
        with self.lock:
            start = self.snapshot.check_masks(masks)
            return score_context(self.snapshot, self.cache, self.snapshot.current(), seed=seed, start=start,
                                 data=self.data)

    # ------------------------------------------------------------------------------------------------------------
    # caches
    # ------------------------------------------------------------------------------------------------------------
    def cache_nbytes(self) -> int:
        """Bytes held by the cached rankings and masks (tensors shared between rankings counted once)."""
        return self.cache.nbytes()

    def clear_cache(self):
        """Drop every cached ranking, mask set and lookahead factor and the weights' fingerprint (the next call
        takes a new one and scores again): after editing a few weights through ``.data``, which the session's
        checks may miss."""
        with self.lock:
            self.cache.clear()
            self.snapshot.forget()
            self.memo.drop("lookahead")

    def save_cache(self, path) -> int:
        """Write the cached rankings to ``path`` (format: :mod:`prune_lab.engine.cache`); returns how many were
        written."""
        return self.cache.save(path, self.layer_names)

    def load_cache(self, path) -> int:
        """Load rankings written by :meth:`save_cache`; entries computed on other weights are skipped. Returns how
        many were loaded."""
        with self.lock:
            return self.cache.load(path, self.snapshot.current(), self.layer_names)

    # ------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------
    def _data(self, data, what: str):
        data = data if data is not None else self.data
        if data is None:
            raise ValueError(f"{what} needs data: pass data=... here or when creating the session.")
        return data

    def result_key(self, result: PruneResult | None):
        """What an evaluation of ``result`` is cached under, beside the weights and the data: its query, the masks'
        content for a result without one (loaded), ``None`` for the dense model; ``False`` when it cannot be keyed
        (updated weights without a query: never cached)."""
        if result is None:
            return None
        if result.query is not None:
            return result.query
        if result.weights is not None:
            return False
        return ("masks", masks_key(result.masks))

    def _eval_key(self, result, data, kw):
        key = self.result_key(result)
        if key is False:
            return None
        return ("eval", self.fingerprint, self.data_id(data), key, tuple(sorted(kw.items())))

    def cached_evaluation(self, result: PruneResult | None = None, data=None, *, recalibrate_bn: bool = False
                          ) -> dict | None:
        """The cached :meth:`evaluate` of ``result`` if it has been evaluated, else ``None`` (never evaluates)."""
        data = data if data is not None else self.data
        if data is None:
            return None
        recal = bool(recalibrate_bn) and result is not None and self.has_batchnorm
        key = self._eval_key(result, data, {"recalibrate_bn": True} if recal else {})
        hit = None if key is None else self.memo.get(key)
        return None if hit is None else dict(hit)

    def evaluate(self, result: PruneResult | None = None, data=None, *, recalibrate_bn: bool = False, **kw) -> dict:
        """``{"accuracy", "loss"}`` on held-out data with ``result`` applied (dense for ``None``), cached by content.
        ``recalibrate_bn``: re-estimate the BatchNorm statistics of the pruned network first (on a copy; a no-op
        for models without BatchNorm). The model is not modified: pruned weights go through ``functional_call``."""
        with self.lock:
            data = self._data(data, "evaluate")
            recal = bool(recalibrate_bn) and result is not None and self.has_batchnorm
            key = self._eval_key(result, data, {**kw, "recalibrate_bn": True} if recal else kw)
            hit = None if key is None else self.memo.get(key)
            kw = {"device": self.device, **kw}  # on the session's device (copies of the weights when not there)
            if hit is None and recal:
                model = self.pruned_copy(result)
                recalibrate(model, data, masks=result.masks, inplace=True)
                hit = evaluate(model, data, masks=result.masks, **kw)
            if hit is None:
                hit = evaluate(self.model, data, masks=None if result is None else result.masks,
                               weights=None if result is None else result.weights, **kw)
            if key is not None:
                self.memo.put(key, hit)
            return dict(hit)

    def finetuned_evaluation(self, result: PruneResult, data=None, *, seed: int = 0, **finetune) -> dict:
        """``{"accuracy", "loss"}`` of a copy of the pruned model fine-tuned with ``finetune`` (keyword arguments of
        :func:`prune_lab.train`, masks kept), cached by content."""
        with self.lock:
            data = self._data(data, "fine-tuning")
            key = ("finetune", self.fingerprint, self.data_id(data), self.result_key(result), int(seed),
                   tuple(sorted((k, repr(v)) for k, v in finetune.items())))
            hit = self.memo.get(key)
            if hit is None:
                model = self.pruned_copy(result)
                train(model, data, masks=result.masks, seed=seed, **{"progress": False, **finetune})
                hit = self.memo.put(key, evaluate(model, data, masks=result.masks))
            return dict(hit)

    def pruned_copy(self, result: PruneResult) -> torch.nn.Module:
        """A copy of the model holding ``result``'s updated weights, if any (its masks still to apply)."""
        model = copy.deepcopy(self.model)
        if result.weights is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, w in result.weights.items():
                    params[n].copy_(w)
        return model

    # ------------------------------------------------------------------------------------------------------------
    # analysis: functions of a session (prune_lab.analysis), here as methods
    # ------------------------------------------------------------------------------------------------------------
    def distortion(self, result: PruneResult, *, data=None, lookahead: bool = True, output: bool = True,
                   n_calibration: int = 256, stop: threading.Event | None = None) -> pd.DataFrame:
        """Per-layer distortion table of ``result``: :func:`prune_lab.analysis.measures.distortion`."""
        return measures.distortion(self, result, data=data, lookahead=lookahead, output=output,
                                   n_calibration=n_calibration, stop=stop)

    def output_distortion(self, result: PruneResult, *, data=None, n: int = 256) -> dict:
        """``{"output_distortion", "loss_change"}``: :func:`prune_lab.analysis.measures.output_distortion`."""
        return measures.output_distortion(self, result, data=data, n=n)

    def distortion_curve(self, method: str, sparsities, *, allocation: str | None = None, seed: int = 0, **hp
                         ) -> pd.DataFrame:
        """Single-layer distortion over a sparsity grid: :func:`prune_lab.analysis.measures.distortion_curve`."""
        return measures.distortion_curve(self, method, sparsities, allocation=allocation, seed=seed, **hp)

    def sweep(self, methods, sparsities, *, allocations=None, seeds=(0,), finetune: dict | None = None, data=None,
              recalibrate_bn: bool = False, progress: bool = True, backend: str = "local", workers: int | None = None,
              cache_dir=None, address: str | None = None, retries: int = 3, **hp) -> pd.DataFrame:
        """Accuracy and loss over methods × allocations × sparsities × seeds, every point cached by content:
        :func:`prune_lab.analysis.sweeps.sweep`."""
        return _sweeps.sweep(self, methods, sparsities, allocations=allocations, seeds=seeds, finetune=finetune,
                             data=data, recalibrate_bn=recalibrate_bn, progress=progress, backend=backend,
                             workers=workers, cache_dir=cache_dir, address=address, retries=retries, **hp)

    def sensitivity(self, method: str = "magnitude", grid=_sens.DEFAULT_GRID, *, metric: str | None = None,
                    install: bool = True, **kw) -> pd.DataFrame:
        """Layer sensitivity: each prunable layer pruned alone at each sparsity of ``grid`` (the rest dense), the
        network evaluated; a tidy DataFrame, one row per (layer, sparsity). See
        :func:`prune_lab.analysis.sensitivity.sensitivity` for the columns and keyword arguments (``layers``,
        ``data``, ``batch``, ``callback``, ``stop``, ``cache_dir``, ``backend``, …). Points are cached in this
        session by content. A complete run over every layer becomes the table of allocation ``sensitivity`` for
        these weights (``install=False``: not; :meth:`use_sensitivity` chooses another)."""
        df = _sens.sensitivity(self, method, grid, metric=metric, memo=self.points, **kw)
        complete = not df.attrs["interrupted"] and set(df["layer"]) == set(self.layer_names)
        if install and complete:
            self.use_sensitivity(_sens.sensitivity_table(df))
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
        self._table = table
        return table

    @property
    def sensitivity_table(self) -> SensitivityTable | None:
        """The table allocation ``sensitivity`` uses now (``None`` when there is none for the current weights)."""
        t = self._table
        return t if t is not None and t.fingerprint in ("", self.fingerprint) else None

    def compare_allocations(self, sparsities, *, method: str = "magnitude", allocations=_sens.COMPARED,
                            **kw) -> pd.DataFrame:
        """``method`` under allocation ``sensitivity`` and the others (uniform, global, lamp, uniform_plus, erk)
        at each sparsity, evaluated; see :func:`prune_lab.analysis.sensitivity.compare_allocations`."""
        return _sens.compare_allocations(self, sparsities, method=method, allocations=allocations, **kw)
