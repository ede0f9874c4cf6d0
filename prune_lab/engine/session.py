"""PruneSession: score once, threshold many.

A session keeps, per (method, hyperparameters, seed, starting masks, weights fingerprint), a
:class:`~prune_lab.core.ranking.Ranking` of the scores. A new sparsity is then a per-layer lookup (a bisection of
``searchsorted`` calls for global allocations): the result's per-layer counts, sparsities and Frobenius distortions
come without building masks or sorting again. Sparsity-dependent methods cache their masks per sparsity.

The user's model is never changed: weights are read (detached), never written. When the model's weights change
after the session was made (training, loading a checkpoint), the next call notices (tensor version counters, plus a
fixed sample of 64 entries per weight for changes made through ``.data``, which skip the counters), takes a new
fingerprint and scores again. A change through ``.data`` of only a few entries can escape the sample: call
:meth:`PruneSession.clear_cache` after such edits. Replaced Parameters (``load_state_dict(sd, assign=True)``,
``layer.weight = nn.Parameter(...)``) and swapped, added or removed modules (a new head, a parametrization) are
seen on every call too (the module sequence and each weight's registration are compared by identity): the session
then reads the model's structure again (graph, prunable layers) before fingerprinting.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..core.allocation import AllocationContext, SensitivityTable, allocate, get_allocation
from ..core.device import resolve_device
from ..core.graph import build_graph, bn_scales
from ..core.ranking import Ranking
from ..core.validation import check_int, check_sparsity, round_half_up
from ..methods.registry import MethodSpec, ScoreContext, get_method, get_updater, list_updaters
from .result import PruneResult


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _score_dtype(value):
    """``None`` / float32: the scores' own precision; bfloat16: rounded to bfloat16."""
    if value is None or value in ("float32", torch.float32):
        return None
    if value in ("bfloat16", torch.bfloat16):
        return torch.bfloat16
    raise ValueError(f"score_dtype must be None, 'float32' or 'bfloat16', got {value!r}.")


@dataclass
class _State:
    token: tuple
    fingerprint: str
    weights: dict  # every Linear/Conv weight of the graph, detached, on the session's device
    scales: dict  # BatchNorm factors


def _host_cat(parts: list) -> np.ndarray:
    """1-d tensors concatenated on the host: one transfer per device (not one per tensor)."""
    if not parts:
        return np.zeros(0)
    by_device: dict = {}
    for i, t in enumerate(parts):
        by_device.setdefault(t.device, []).append(i)
    if len(by_device) == 1:
        return torch.cat(parts).cpu().numpy()
    host = [None] * len(parts)
    for idx in by_device.values():
        joined = torch.cat([parts[i] for i in idx]).cpu()
        a = 0
        for i in idx:
            host[i] = joined[a:a + parts[i].numel()]
            a += parts[i].numel()
    return torch.cat(host).numpy()


def _say_empty(res: PruneResult) -> PruneResult:
    """Warn (``UserWarning``) when ``res`` prunes every weight of some layer, naming them (``res.empty_layers``):
    an emptied layer cuts the network there (or leaves only its bias)."""
    empty = res.empty_layers
    if empty:
        names = ", ".join(map(repr, empty[:8])) + (f", … ({len(empty) - 8} more)" if len(empty) > 8 else "")
        warnings.warn(f"{res.method!r} with allocation {res.allocation!r} at sparsity {res.target_sparsity:g} empties "
                      f"{len(empty)} of {len(res.layers)} layers (every weight pruned): {names}. The network is cut "
                      f"there; see result.empty_layers.", UserWarning, stacklevel=3)
    return res


def _pruned_counts(masks: dict, names) -> np.ndarray:
    """Per layer, how many entries of the bool masks are False: one transfer."""
    return _host_cat([(~masks[n]).sum().reshape(1) for n in names]).astype(np.int64)


class PruneSession:
    """Prune one model many times, fast.

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

    Memory: the session keeps at most ``max_cached`` rankings (one per method × hyperparameters × seed × starting
    masks; about 6 bytes per prunable weight each for float32 scores, 4 for bfloat16 scores, and LAMP adds only its
    keys to magnitude's ranking: see :mod:`prune_lab.core.ranking`) and at most ``max_cached`` mask
    sets of sparsity-dependent methods, each cache evicting its least recently used entry first. Set
    ``session.max_cached`` (class default 32) lower for big models; :meth:`cache_nbytes` tells what is held and
    :meth:`clear_cache` frees it. :meth:`save_cache` / :meth:`load_cache` keep the rankings across restarts.

    Tied (shared) weights are pruned once, under the first name ``named_parameters()`` gives; the other names are
    listed in ``session.tied_weights`` (and a warning says so).
    """

    max_cached = 32

    def __init__(self, model: nn.Module, data=None, *, device="auto", include=None, exclude=None, score_dtype=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.data = data
        self.device = resolve_device(device)
        self.score_dtype = _score_dtype(score_dtype)
        self._include, self._exclude = include, exclude
        self.tied_weights: dict = {}
        self._bind()
        self._state: _State | None = None
        self._rankings: OrderedDict = OrderedDict()
        self._masks: OrderedDict = OrderedDict()
        self._scratch: dict = {}  # methods' expensive intermediates for the current weights (ScoreContext.cache)
        self._sample_indices: dict = {}  # see _token
        self._sensitivity: SensitivityTable | None = None  # the table of allocation "sensitivity" (use_sensitivity)

    def _bind(self):
        """Read the model's structure: the layer graph, the prunable layers, the Parameters that hold their values
        (and the module and attribute where each is registered) and the BatchNorm modules. At construction, and
        again whenever :meth:`_refresh` sees replaced Parameters or changed modules."""
        model = self.model
        graph = build_graph(model, include=self._include, exclude=self._exclude)
        layer_names = list(graph.prunable)
        if not layer_names:
            what = "no Linear or Conv1d/2d/3d weight" if not graph.layers else \
                "no Linear or Conv weight left after include/exclude"
            raise ValueError(f"model {type(model).__name__} has nothing to prune: {what}. prune_lab prunes the "
                             f"weights used in matrix products and convolutions: nn.Linear and nn.Conv1d/2d/3d, "
                             f"nn.MultiheadAttention's projections, RNN/LSTM/GRU matrices, parameters passed to "
                             f"F.linear / F.conv*.")
        params = dict(model.named_parameters())
        new_params = {n: params[n] for n in graph.layers}
        for n, p in new_params.items():
            if p.device.type == "meta":
                raise ValueError(f"weight {n!r} is on the 'meta' device (a placeholder without values); load or "
                                 f"materialise the model's weights first (e.g. model.to_empty(device='cpu') and "
                                 f"load_state_dict).")
        modules = dict(model.named_modules())
        self.graph = graph
        self.layer_names = layer_names
        self._params = new_params
        # where each Parameter is registered: a replaced one (load_state_dict(assign=True)) is seen there
        self._owners = {n: (modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in new_params}
        self._modules = tuple(model.modules())  # a swapped, added or removed module changes this sequence
        tied = self._find_tied(model)
        if tied and tied != self.tied_weights:
            shared = "; ".join(f"{n!r} also as {', '.join(map(repr, o))}" for n, o in tied.items())
            warnings.warn(f"tied (shared) weights are pruned once, under their first name: {shared}.",
                          UserWarning, stacklevel=4)
        self.tied_weights = tied
        self._bn = {n: modules[n] for n in graph.bn_modules}
        self._shapes = tuple(tuple(self._params[n].shape) for n in self.layer_names)
        self._is_conv = tuple(self.graph.layers[n].is_conv for n in self.layer_names)
        self._sample_indices = {}

    def _refresh(self):
        """Re-read the structure (:meth:`_bind`) when a module was swapped, added or removed, or a weight's
        Parameter replaced (``load_state_dict(sd, assign=True)``, ``layer.weight = nn.Parameter(...)``): one pass
        over ``model.modules()`` and one dict lookup per layer (tens of µs on ResNet-50)."""
        mods = self._modules
        current = tuple(self.model.modules())
        changed = len(current) != len(mods) or any(a is not b for a, b in zip(current, mods))
        if not changed:
            params = self._params
            for n, (owner, attr) in self._owners.items():
                if owner._parameters.get(attr) is not params[n]:
                    changed = True
                    break
        if changed:
            self._bind()

    def _find_tied(self, model: nn.Module) -> dict:
        """``{prunable name: [other names of the same Parameter]}`` for weights shared by several modules."""
        first: dict = {}
        others: dict = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                others.setdefault(first[id(p)], []).append(name)
            else:
                first[id(p)] = name
        return {n: others[n] for n in self.layer_names if n in others}

    # ------------------------------------------------------------------------------------------------------------
    # weights and fingerprint
    # ------------------------------------------------------------------------------------------------------------
    _SAMPLE = 64  # entries per tensor compared on every call (changes through ``.data`` skip version counters)

    def _token(self) -> tuple:
        self._refresh()
        tensors = list(self._params.values())
        for bn in self._bn.values():
            tensors += [t for t in (bn.weight, bn.running_var) if t is not None]
        # Version counters see in-place changes and load_state_dict; ``p.data.mul_(…)`` / ``p.data.copy_(…)`` do
        # not bump them, so a fixed sample of each weight's entries is compared too (a few µs per weight).
        parts, on_device = [], []
        for i, t in enumerate(self._params.values()):  # the Linear/Conv weights (BatchNorm: counters only)
            t = t.detach()
            n = t.numel()
            if not n:
                continue
            if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS and t.is_contiguous():  # numpy views: ~µs
                parts.append(t.numpy().reshape(-1)[:: max(1, n // self._SAMPLE)][: self._SAMPLE].astype(np.float64))
            elif t.is_contiguous():
                on_device.append(t.view(-1)[:: max(1, n // self._SAMPLE)][: self._SAMPLE].to(torch.float64))
            else:
                on_device.append(t[self._sample_index(i, t)].reshape(-1).to(torch.float64))
        if on_device:  # one transfer for every tensor off the CPU
            parts.append(torch.cat(on_device).cpu().numpy())
        sample = np.concatenate(parts).tobytes() if parts else b""
        # the tensors themselves too (compared by identity): a replaced BatchNorm tensor may reuse a freed address
        return (tuple(tensors),) + tuple((t.data_ptr(), t._version, str(t.device)) for t in tensors) + (sample,)

    def _sample_index(self, i: int, t: torch.Tensor) -> tuple:
        """Index tensors of the fixed sample of a non-contiguous weight (e.g. channels-last), per device."""
        cache = self._sample_indices
        key = (i, tuple(t.shape), str(t.device))
        idx = cache.get(key)
        if idx is None:
            n = t.numel()
            flat = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, self._SAMPLE)).round().astype(np.int64))
            idx = tuple(torch.as_tensor(a, device=t.device) for a in np.unravel_index(flat, tuple(t.shape))) \
                if n else (torch.zeros(0, dtype=torch.long, device=t.device),) * t.dim()
            cache[key] = idx
        return idx

    @staticmethod
    def _same_token(a: tuple, b: tuple) -> bool:
        return len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0])) and a[1:] == b[1:]

    def _snapshot(self) -> _State:
        token = self._token()
        if self._state is not None and self._same_token(self._state.token, token):
            return self._state
        weights = {}
        h = hashlib.blake2b(digest_size=16)
        for n, p in self._params.items():
            w = p.detach()
            # The fingerprint reads every weight once on the host (one copy per layer for a GPU model, none on
            # the CPU); the finiteness check runs on that host copy: no device synchronisation of its own.
            host = w.cpu()
            # a float64 sum is finite exactly when every entry is (float32/16 values cannot overflow it): one pass
            # without a temporary; the exact test only to name the problem
            if not math.isfinite(float(host.sum(dtype=torch.float64))) and not torch.isfinite(host).all():
                bad = "NaN" if torch.isnan(host).any() else "Inf"
                raise ValueError(f"weight {n!r} contains {bad} values; prune_lab cannot rank them. Fix or "
                                 f"re-initialise that layer first.")
            h.update(n.encode())
            h.update(host.contiguous().numpy() if host.dtype != torch.bfloat16 else host.float().numpy())
            del host
            weights[n] = w.to(self.device)
        scales = {k: v.to(self.device) for k, v in bn_scales(self.model, self._bn).items()}
        for k in sorted(scales):
            h.update(k.encode())
            h.update(scales[k].cpu().numpy().tobytes())
        self._state = _State(token, h.hexdigest(), weights, scales)
        return self._state

    @property
    def fingerprint(self) -> str:
        """A content hash of the model's Linear/Conv weights and BatchNorm factors."""
        return self._snapshot().fingerprint

    # ------------------------------------------------------------------------------------------------------------
    # scores and rankings
    # ------------------------------------------------------------------------------------------------------------
    def _check_masks(self, masks) -> dict | None:
        self._refresh()  # masks are checked against the model's current layers
        if masks is None:
            return None
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict {{name: BoolTensor}}, got {type(masks).__name__}.")
        for n in masks:
            if n not in self.layer_names:
                raise ValueError(f"masks do not fit this model: {n!r} is not one of its prunable weights "
                                 f"({', '.join(self.layer_names[:5])}{', …' if len(self.layer_names) > 5 else ''}).")
        out = {}
        for n in self.layer_names:
            if n not in masks:
                raise ValueError(f"masks do not fit this model: no mask for prunable weight {n!r}.")
            m = torch.as_tensor(masks[n])
            if tuple(m.shape) != tuple(self._params[n].shape):
                raise ValueError(f"masks do not fit this model: the mask of {n!r} has shape {tuple(m.shape)}, "
                                 f"the weight {tuple(self._params[n].shape)}.")
            out[n] = m.to(device=self.device, dtype=torch.bool)
        return out

    @staticmethod
    def _masks_key(masks) -> str:
        if masks is None:
            return ""
        h = hashlib.blake2b(digest_size=16)
        names = sorted(masks)
        flat = _host_cat([masks[n].reshape(-1) for n in names])  # one transfer for all layers
        a = 0
        for n in names:
            size = masks[n].numel()
            h.update(n.encode())
            h.update(np.packbits(flat[a:a + size]).tobytes())
            a += size
        return h.hexdigest()

    def _context(self, state: _State, seed: int, start: dict | None) -> ScoreContext:
        weights = dict(state.weights)
        if start is not None:
            for n, m in start.items():
                weights[n] = weights[n] * m
        if self._scratch.get("fingerprint") != state.fingerprint:
            self._scratch = {"fingerprint": state.fingerprint}
        return ScoreContext(weights=weights, prunable=list(self.layer_names), graph=self.graph,
                            bn_scales=state.scales, seed=int(seed), model=self.model, data=self.data,
                            device=self.device, start_masks=start, fingerprint=state.fingerprint,
                            cache=self._scratch)

    def _check_needs(self, spec: MethodSpec):
        if "data" in spec.needs and self.data is None:
            raise ValueError(f"method {spec.name!r} needs data (a batch, a DataLoader or a prune_lab dataset); "
                             f"pass data=... to the session or to prune().")

    def _key(self, spec: MethodSpec, hp, seed: int, start_key: str, state: _State) -> tuple:
        # Keyed by the score function, not the name: methods that share scores (magnitude, global_magnitude) share
        # one ranking.
        return (spec.scores, tuple(sorted(asdict(hp).items())), int(seed) if spec.stochastic else None,
                start_key, state.fingerprint)

    def _remember(self, cache: OrderedDict, key, value):
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.max_cached:
            cache.popitem(last=False)

    def _raw_scores(self, spec: MethodSpec, hp, seed: int, start: dict | None, state: _State) -> dict:
        self._check_needs(spec)
        scores = spec.scores(self._context(state, seed, start), hp)
        if start is not None:  # already-pruned weights come first, so the new masks nest inside the old ones
            scores = {n: torch.where(start[n], s.float(), torch.full_like(s, float("-inf"), dtype=torch.float32))
                      for n, s in scores.items()}
        return scores

    def _ranking(self, spec: MethodSpec, hp, seed: int, start: dict | None, start_key: str,
                 state: _State | None = None) -> Ranking:
        state = state or self._snapshot()
        key = self._key(spec, hp, seed, start_key, state)
        hit = self._rankings.get(key)
        if hit is not None:
            self._rankings.move_to_end(key)
            return hit
        if spec.order_of is not None:
            base_spec = get_method(spec.order_of)
            base = self._ranking(base_spec, base_spec.make_hyperparameters(), seed, start, start_key, state)
            orders = {n: base.layers[n].order for n in self.layer_names}
            values = spec.sorted_values(self._context(state, seed, start), hp, orders)
            if start is not None:  # already-pruned weights lead the base order: keep them first
                for n, c in zip(self.layer_names, _pruned_counts(start, self.layer_names)):
                    values[n][: int(c)] = float("-inf")
            ranking = base.with_sorted_values(values, score_dtype=self.score_dtype, consume=True)
        else:
            scores = self._raw_scores(spec, hp, seed, start, state)
            # consume: each layer's scores are dropped once ranked, so scores and ranking are never both whole
            ranking = Ranking.from_scores(self.layer_names, scores, state.weights, score_dtype=self.score_dtype,
                                          consume=True)
        self._remember(self._rankings, key, ranking)
        return ranking

    def scores(self, method: str, *, seed: int = 0, masks=None, **hp) -> dict:
        """Raw per-weight scores ``{name: Tensor}`` of ``method`` (higher = keep), shapes of the weights."""
        spec = get_method(method)
        hpo = spec.make_hyperparameters(**hp)
        start = self._check_masks(masks)
        return self._raw_scores(spec, hpo, seed, start, self._snapshot())

    def ranking(self, method: str, *, seed: int = 0, **hp) -> Ranking:
        """The cached :class:`~prune_lab.core.ranking.Ranking` of ``method``'s scores (computed on first use)."""
        spec = get_method(method)
        return self._ranking(spec, spec.make_hyperparameters(**hp), seed, None, "")

    def cache_nbytes(self) -> int:
        """Bytes held by the cached rankings and masks (tensors shared between rankings counted once)."""
        seen, n = set(), 0
        arrays = [a for r in self._rankings.values() for lr in r.layers.values()
                  for a in (lr.order, lr.csum, lr.keys.plain, lr.keys.starts, lr.keys.lo) if a is not None]
        arrays += [m for built in self._masks.values() for part in built if part is not None for m in part.values()]
        for a in arrays:
            ptr = (a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data, a.device.type
                   if isinstance(a, torch.Tensor) else "host")
            if ptr not in seen:
                seen.add(ptr)
                n += a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes
        return n

    def use_sensitivity(self, table: SensitivityTable | None) -> SensitivityTable | None:
        """Set the measured table allocation ``sensitivity`` uses in this session (``None``: none); it applies while
        the weights are those it was measured on (its fingerprint)."""
        if table is not None and not isinstance(table, SensitivityTable):
            raise TypeError(f"use_sensitivity takes a SensitivityTable or None, got {type(table).__name__}.")
        self._sensitivity = table
        return table

    @property
    def sensitivity_table(self) -> SensitivityTable | None:
        """The table allocation ``sensitivity`` uses now (``None`` when there is none for the current weights)."""
        t = self._sensitivity
        return t if t is not None and t.fingerprint in ("", self.fingerprint) else None

    def clear_cache(self):
        """Drop every cached ranking and mask set and the weights' fingerprint (the next call takes a new one and
        scores again): after editing a few weights through ``.data``, which the session's checks may miss."""
        self._rankings.clear()
        self._masks.clear()
        self._state = None

    def save_cache(self, path) -> int:
        """Write the cached rankings to ``path`` (see :func:`prune_lab.engine.persist.save_cache`); returns how
        many were written."""
        from .persist import save_cache

        return save_cache(self, path)

    def load_cache(self, path) -> int:
        """Load rankings written by :meth:`save_cache`; entries computed on other weights are skipped. Returns how
        many were loaded."""
        from .persist import load_cache

        return load_cache(self, path)

    # ------------------------------------------------------------------------------------------------------------
    # pruning
    # ------------------------------------------------------------------------------------------------------------
    def prune(self, method: str, sparsity: float, *, allocation: str | None = None, seed: int = 0, masks=None,
              update=False, overrides: dict | None = None, **hp) -> PruneResult:
        """Prune at ``sparsity`` (fraction removed, in [0, 1)) with ``method`` and ``allocation`` (default: the
        method's paper's allocation). ``masks``: start from these (already-pruned weights stay pruned; the result
        nests inside them). ``update``: ``False``, ``True`` (the first registered weight update) or an update's
        name: after selection, update the kept weights (``result.weights``). ``overrides``: ``{layer: sparsity}``
        locks those layers at their own sparsity (``0.0`` excludes a layer: it stays dense); the allocation shares
        the rest of the model's budget among the other layers (``uniform`` keeps them at ``sparsity``).
        ``hp``: the method's hyperparameters. Repeat calls at other sparsities are lookups.
        """
        spec = get_method(method)
        s = check_sparsity(sparsity)
        seed = check_int(seed, what="seed")
        alloc = get_allocation(allocation if allocation is not None else spec.default_allocation).name
        hpo = spec.make_hyperparameters(**hp)
        self._check_needs(spec)
        start = self._check_masks(masks)
        start_key = self._masks_key(start)
        state = self._snapshot()  # once per call: the version check is the warm path's largest fixed cost
        ranking = self._ranking(spec, hpo, seed, start, start_key, state)

        def lamp_ranking():
            lamp = get_method("lamp")
            return self._ranking(lamp, lamp.make_hyperparameters(), 0, start, start_key, state)

        counts = self._allocate(alloc, s, ranking, lamp_ranking, overrides)
        counts = self._keep_or_refuse(spec, alloc, s, counts, overrides)
        if start is not None:
            already = _pruned_counts(start, self.layer_names)
            short = np.nonzero(counts < already)[0]
            if short.size:
                n = self.layer_names[short[0]]
                raise ValueError(
                    f"sparsity {s:g} with allocation {alloc!r} would prune {counts[short[0]]} weights of {n!r}, "
                    f"but the starting masks already prune {already[short[0]]} there; ask for a higher sparsity.")
        devices = {n: self._params[n].device for n in self.layer_names}  # masks go where each weight lives
        common = dict(method=spec.name, allocation=alloc, target_sparsity=s, hyperparameters=asdict(hpo),
                      seed=int(seed) if spec.stochastic else None, layers=tuple(self.layer_names),
                      numel=tuple(int(x) for x in ranking.sizes), pruned=tuple(int(c) for c in counts),
                      model_fingerprint=state.fingerprint)
        norms = dict(zip(self.layer_names, ranking.weight_norms().tolist()))
        updater = self._updater(update)
        if spec.sparsity_dependent or updater is not None:
            # keyed by the method's name too: methods sharing a score function (lap, lap_forward, lap_backward)
            # share a ranking but never their masks
            key = (spec.name,) + self._key(spec, hpo, seed, start_key, state) + (alloc, tuple(common["pruned"]),
                                                                               updater)
            built = self._masks.get(key)
            if built is None:
                ctx_s = self._context(state, seed, start)
                ctx_s.allocation = alloc if not overrides else None  # locked layers: follow the counts
                if spec.sparsity_dependent:
                    built = spec.masks(ctx_s, dict(zip(self.layer_names, counts.tolist())), hpo)
                else:
                    built = ranking.masks(counts)
                new_weights = None
                if isinstance(built, tuple):
                    built, new_weights = built
                if updater is not None:
                    new_weights = updater(ctx_s, built)
                built = (built, new_weights)
                self._remember(self._masks, key, built)
                # what the method reports about this mask (e.g. CBS: its objective and loss beside magnitude's),
                # kept with the session's other per-weights intermediates
                self._scratch[("result_info",) + key] = dict(ctx_s.info)
            kept, new_weights = built
            info = dict(self._scratch.get(("result_info",) + key, {}))
            # what the masks really prune, and the distortion: computed on the device, one transfer for all layers
            parts = []
            for n in self.layer_names:
                w = state.weights[n].float()
                after = (new_weights[n].to(w.device).float() if new_weights is not None else w) * kept[n]
                parts.append(torch.stack([(~kept[n]).sum().to(torch.float64),
                                          (w - after).pow(2).sum().sqrt().to(torch.float64)]))
            host = _host_cat(parts).reshape(-1, 2)
            common["pruned"] = tuple(int(c) for c in host[:, 0])
            frob = dict(zip(self.layer_names, host[:, 1].tolist()))
            if new_weights is not None:
                common["hyperparameters"] = {**common["hyperparameters"], "update": update}
            if overrides:
                common["hyperparameters"] = {**common["hyperparameters"], "overrides": dict(overrides)}
            return _say_empty(PruneResult(**common, frobenius=frob, weight_norms=norms, info=info,
                                          _masks={n: m.to(devices[n]) for n, m in kept.items()},
                                          weights=None if new_weights is None else
                                          {n: (new_weights[n] * kept[n]).to(devices[n]) for n in self.layer_names}))
        if overrides:
            common["hyperparameters"] = {**common["hyperparameters"], "overrides": dict(overrides)}
        frob = dict(zip(self.layer_names, ranking.frobenius(counts).tolist()))
        return _say_empty(PruneResult(**common, frobenius=frob, weight_norms=norms,
                                      _mask_builder=lambda: {n: m.to(devices[n])
                                                             for n, m in ranking.masks(counts).items()},
                                      orders={n: ranking.layers[n].order for n in self.layer_names}))

    def _keep_or_refuse(self, spec: MethodSpec, alloc: str, s: float, counts: np.ndarray, overrides) -> np.ndarray:
        """The budget at extreme sparsity. LAMP (the ``lamp`` allocation, or a global threshold on a method whose
        scores keep every layer, ``spec.keeps_every_layer``) keeps each layer's highest-scored weight: its count is
        capped at ``n − 1`` (a warning says so when that lowers the total). Otherwise counts that prune every weight
        of the model (``round(s·n) = n``: a sparsity that rounds to 1.0, which is not allowed) are refused."""
        sizes = np.asarray([int(np.prod(sh)) for sh in self._shapes], dtype=np.int64)
        locked = np.asarray([n in (overrides or {}) for n in self.layer_names], dtype=bool)
        if alloc == "lamp" or (alloc == "global" and spec.keeps_every_layer):
            cap = np.where(locked | (sizes == 0), sizes, sizes - 1)
            if (counts > cap).any():
                asked = int(counts.sum())
                counts = np.minimum(counts, cap)
                total = int(sizes.sum())
                warnings.warn(
                    f"{spec.name!r} with allocation {alloc!r} keeps the highest-scored weight of every layer (LAMP "
                    f"scores it 1, so no layer is emptied): sparsity {s:g} asks to prune {asked} of {total} weights; "
                    f"{int(counts.sum())} are pruned (sparsity {int(counts.sum()) / total:.6g}), one weight left in "
                    f"each layer.", UserWarning, stacklevel=3)
            return counts
        total = int(sizes.sum())
        if total and int(counts.sum()) >= total:
            bound = max((n - 0.5) / n for n in sizes if n) if alloc == "uniform" else (total - 0.5) / total
            raise ValueError(
                f"sparsity {s:g} with allocation {alloc!r} prunes every one of the model's {total} weights (the "
                f"budget round(s·n) rounds up to n): that is sparsity 1.0, which is not allowed. Ask for a sparsity "
                f"below {bound:.6g}, or use allocation 'lamp', which keeps one weight in every layer.")
        return counts

    def _allocate(self, alloc: str, s: float, ranking: Ranking, lamp_ranking, overrides) -> np.ndarray:
        """Per-layer pruned counts; with ``overrides``, locked layers first and the allocation over the others."""
        names = self.layer_names
        if not overrides:
            ctx = AllocationContext(names=tuple(names), shapes=self._shapes, is_conv=self._is_conv,
                                    ranking=lambda: ranking, lamp_ranking=lamp_ranking,
                                    sensitivity=self.sensitivity_table if alloc == "sensitivity" else None)
            return allocate(alloc, s, ctx)
        if not isinstance(overrides, dict):
            raise TypeError(f"overrides must be a dict {{layer: sparsity}}, got {type(overrides).__name__}.")
        for n in overrides:
            if n not in names:
                raise ValueError(f"overrides: {n!r} is not a prunable layer of this model; valid layers: "
                                 f"{', '.join(map(repr, names[:8]))}{', …' if len(names) > 8 else ''}.")
        sizes = np.asarray([int(np.prod(sh)) for sh in self._shapes], dtype=np.int64)
        counts = np.zeros(len(names), dtype=np.int64)
        free = [i for i, n in enumerate(names) if n not in overrides]
        for i, n in enumerate(names):
            if n in overrides:
                counts[i] = round_half_up(check_sparsity(overrides[n], what=f"overrides[{n!r}]") * sizes[i])
        if not free:
            return counts
        if alloc == "uniform":
            budget_s = s
        else:
            left = round_half_up(s * int(sizes.sum())) - int(counts.sum())
            n_free = int(sizes[free].sum())
            if left < 0 or left >= n_free:
                raise ValueError(
                    f"overrides leave {left} of the budget's weights to prune in layers holding {n_free}: "
                    f"sparsity {s:g} cannot be met with these locked layers; change the sparsity or the overrides.")
            budget_s = left / n_free
        sub = [names[i] for i in free]
        ctx = AllocationContext(
            names=tuple(sub), shapes=tuple(self._shapes[i] for i in free),
            is_conv=tuple(self._is_conv[i] for i in free),
            ranking=lambda: ranking.subset(sub), lamp_ranking=lambda: lamp_ranking().subset(sub),
            sensitivity=self.sensitivity_table if alloc == "sensitivity" else None)
        counts[free] = allocate(alloc, budget_s, ctx)
        return counts

    def _updater(self, update):
        if update is False or update is None:
            return None
        if update is True:
            if not list_updaters():
                raise ValueError("update=True needs a registered weight update (the second-order methods).")
            update = list_updaters()[0]
        fn, needs = get_updater(update)
        if "data" in needs and self.data is None:
            raise ValueError(f"update {update!r} needs data; pass data=... to the session or to prune().")
        return fn

    def evaluate(self, result: PruneResult | None = None, data=None, **kw) -> dict:
        """``{"accuracy", "loss"}`` of the model with ``result``'s masks and updated weights, if any (dense when
        ``None``) on held-out data. The model is not modified: pruned weights go through ``functional_call``."""
        from ..training import evaluate

        data = data if data is not None else self.data
        if data is None:
            raise ValueError("evaluate needs data: pass data=... here or when creating the session.")
        kw.setdefault("device", self.device)  # on the session's device (a copy of the weights there if needed)
        if result is None:
            return evaluate(self.model, data, **kw)
        return evaluate(self.model, data, masks=result.masks, weights=result.weights, **kw)
