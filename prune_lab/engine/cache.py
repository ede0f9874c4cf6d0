"""RankingCache: what a session keeps so that a sparsity change is a lookup, its keys, its bound and its file format.

It holds three things, each for the current weights only in practice (every key carries the weights' fingerprint):

- **rankings** (:class:`~prune_lab.core.ranking.Ranking`), keyed by :class:`RankingKey`: the method's score family
  (methods sharing a score function — magnitude, global_magnitude — share one ranking), its hyperparameters, seed,
  starting masks and the weights' fingerprint: the part of a :class:`~prune_lab.engine.query.Query` the scores
  depend on;
- **mask sets** of sparsity-dependent methods and of updated weights, keyed by the query (sparsity aside) and the
  per-layer counts the allocation gave (two sparsities with the same counts share them);
- **scratch**: the methods' expensive intermediates for the current weights (``ScoreContext.cache``: a Fisher
  matrix, captured activations), emptied when the fingerprint changes.

Rankings and mask sets are each bounded by ``max_cached`` entries, the least recently used evicted first.

File format (:meth:`RankingCache.save` / :meth:`RankingCache.load`, format 2): every cached ranking (per layer: the
pruning order, the cumulative ``w²`` sampled every ``block`` entries, ``‖W‖²`` and the compressed sorted score keys;
tensors shared between rankings, as LAMP's and magnitude's, are stored once; the weights are not saved: a ranking is
loaded only where the fingerprint says the weights are those it was built on, and refers to them), keyed by method
name, hyperparameters, seed, starting masks, ``score_dtype`` and the weights' fingerprint. Files of format 1 (full
cumulative sums and plain int32 keys) are read and converted. Entries whose fingerprint, layers or score precision
differ, or whose method is no longer registered, are skipped (counted, never trusted). Mask sets are not saved.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.ranking import BLOCK, LayerRank, Ranking, SortedKeys
from ..methods.registry import MethodSpec, get_method, list_methods
from .result import plain, read_payload, require_keys
from .query import Query, freeze

FORMAT = "prune_lab.SessionCache"
FORMAT_VERSION = 2

__all__ = ["FORMAT", "FORMAT_VERSION", "LRU", "MaskSet", "RankingCache", "RankingKey", "score_family"]


def score_family(spec: MethodSpec) -> str:
    """The first registered method whose score function is ``spec``'s: the name its rankings are filed under.

    >>> score_family(get_method("global_magnitude"))
    'magnitude'
    """
    names = tuple(list_methods())
    hit = _FAMILIES.get(spec.scores)
    if hit is not None and hit[0] == names:  # the registry unchanged since: a lookup (the warm path)
        return hit[1]
    family = next((n for n in names if get_method(n).scores is spec.scores), spec.name)
    _FAMILIES[spec.scores] = (names, family)
    return family


_FAMILIES: dict = {}  # score function -> (registered names when computed, family)


@dataclass(frozen=True)
class RankingKey:
    """What a ranking depends on: score family, hyperparameters (sorted by name), seed (``None`` when the scores
    ignore it), starting masks' key and the weights' fingerprint."""

    scores: str
    hyperparameters: tuple
    seed: int | None
    start: str
    fingerprint: str

    @classmethod
    def of(cls, query: Query, fingerprint: str) -> "RankingKey":
        """The ranking ``query`` thresholds, on the weights ``fingerprint``."""
        spec = get_method(query.method)
        return cls(score_family(spec), tuple(sorted(query.hyperparameters)),
                   query.seed if spec.stochastic else None, query.start, fingerprint)


@dataclass(frozen=True, eq=False)
class MaskSet:
    """Masks built for one query (sparsity-dependent methods, updated weights): ``masks``, ``weights`` (updated
    kept weights or ``None``) and ``info`` (what the method reported about them)."""

    masks: dict
    weights: dict | None
    info: dict


class LRU:
    """A dict holding at most ``bound()`` entries; :meth:`get` and :meth:`put` make an entry the most recent, and
    the least recently used is evicted first."""

    def __init__(self, bound: Callable[[], int]):
        self._data: OrderedDict = OrderedDict()
        self._bound = bound

    def get(self, key, default=None):
        hit = self._data.get(key, default)
        if hit is not default:
            self._data.move_to_end(key)
        return hit

    def put(self, key, value):
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > max(int(self._bound()), 0):
            self._data.popitem(last=False)

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        return key in self._data

    def items(self):
        return list(self._data.items())

    def keys(self):
        return list(self._data)

    def values(self):
        return list(self._data.values())

    def clear(self):
        self._data.clear()


class RankingCache:
    """Rankings, mask sets and scratch of one session (see the module docstring). ``max_cached``: entries kept per
    kind; ``score_dtype``: ``None`` or ``torch.bfloat16``, the precision rankings are built at (part of the file's
    key). ``device``: where loaded rankings go."""

    def __init__(self, *, max_cached: int = 32, score_dtype=None, device="cpu"):
        self.max_cached = max_cached
        self.score_dtype = score_dtype
        self.device = torch.device(device)
        self.rankings = LRU(lambda: self.max_cached)
        self.mask_sets = LRU(lambda: self.max_cached)
        self._scratch: dict = {"fingerprint": None}

    def __repr__(self):
        return f"RankingCache({len(self.rankings)} rankings, {len(self.mask_sets)} mask sets, {self.nbytes()} bytes)"

    def scratch(self, fingerprint: str) -> dict:
        """The methods' intermediates for the weights ``fingerprint`` (a fresh dict when the weights changed)."""
        if self._scratch.get("fingerprint") != fingerprint:
            self._scratch = {"fingerprint": fingerprint}
        return self._scratch

    @property
    def current_scratch(self) -> dict:
        """The scratch dict of the weights last used (read-only use: tests, diagnostics)."""
        return self._scratch

    def clear(self):
        """Drop every ranking, mask set and intermediate."""
        self.rankings.clear()
        self.mask_sets.clear()
        self._scratch = {"fingerprint": None}

    def nbytes(self) -> int:
        """Bytes held by the rankings and mask sets (arrays shared between rankings counted once)."""
        seen, n = set(), 0
        arrays = [a for r in self.rankings.values() for lr in r.layers.values() for a in lr.arrays()]
        arrays += [m for ms in self.mask_sets.values() for part in (ms.masks, ms.weights) if part is not None
                   for m in part.values()]
        for a in arrays:
            is_tensor = isinstance(a, torch.Tensor)
            ptr = (a.data_ptr(), a.device.type) if is_tensor else (a.ctypes.data, "host")
            if ptr not in seen:
                seen.add(ptr)
                n += a.numel() * a.element_size() if is_tensor else a.nbytes
        return n

    # ------------------------------------------------------------------------------------------------------------
    # the file format
    # ------------------------------------------------------------------------------------------------------------
    def _dtype_name(self):
        return str(self.score_dtype).replace("torch.", "") if self.score_dtype is not None else None

    def save(self, path, layer_names) -> int:
        """Write the cached rankings to ``path``; returns how many were written."""
        from .._version import __version__

        entries = []
        for key, ranking in self.rankings.items():
            if key.scores not in list_methods():  # a method registered and removed since: nothing to key it by
                continue
            hp = plain(list(key.hyperparameters))
            if hp != list(key.hyperparameters):  # a value that would not read back equal (an arbitrary object)
                continue
            layers = {}
            for n in ranking.names:
                lr = ranking.layers[n]
                layers[n] = {"order": lr.order.detach().cpu(), "csum": lr.csum.detach().cpu(),
                             "block": int(lr.block), "norm2": float(lr.norm2), "keys": lr.keys.state(),
                             "shape": tuple(lr.shape)}
            entries.append({"method": key.scores, "hyperparameters": list(hp), "seed": key.seed,
                            "start_key": key.start, "fingerprint": key.fingerprint, "names": list(ranking.names),
                            "layers": layers, "score_dtype": self._dtype_name()})
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
                   "layer_names": list(layer_names), "entries": entries}
        torch.save(payload, os.fspath(path))
        return len(entries)

    def load(self, path, weights, layer_names) -> int:
        """Load rankings written by :meth:`save` that fit ``weights`` (a :class:`~prune_lab.engine.weights.Weights`:
        same fingerprint) and ``layer_names``; returns how many were loaded."""
        payload = read_payload(path, FORMAT, FORMAT_VERSION, what="a saved session cache",
                               how="save_cache(session, path)")
        require_keys(payload, ("entries",), path, what="saved session cache")
        entry_keys = ("method", "hyperparameters", "seed", "start_key", "fingerprint", "names", "layers")
        for e in payload["entries"]:
            if not isinstance(e, dict) or any(k not in e for k in entry_keys):
                lacks = [k for k in entry_keys if not isinstance(e, dict) or k not in e]
                raise ValueError(f"{os.fspath(path)!r} is not a complete saved session cache: an entry lacks "
                                 f"{', '.join(map(repr, lacks))}. The file is damaged or incomplete; write it again.")
        shared: dict = {}  # a saved tensor -> its copy on the device (keeps LAMP/magnitude sharing)

        def to_device(t):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in shared:
                shared[key] = t.to(self.device)
            return shared[key]

        loaded = 0
        for e in payload["entries"]:
            if e["fingerprint"] != weights.fingerprint or list(e["names"]) != list(layer_names):
                continue
            if e.get("score_dtype") != self._dtype_name():  # ranked at another precision
                continue
            if e["method"] not in list_methods():
                continue
            layers = {}
            for n in e["names"]:
                d = e["layers"][n]
                if isinstance(d["keys"], torch.Tensor):  # format 1: plain int32 keys, the full float32 csum
                    csum = d["csum"].to(torch.float64)
                    keys = SortedKeys(d["keys"].numpy().astype(np.int32, copy=False))
                    d = dict(d, csum=csum[::BLOCK].contiguous(), block=BLOCK, norm2=float(csum[-1]))
                else:
                    keys = SortedKeys.from_state(d["keys"])
                layers[n] = LayerRank(to_device(d["order"]), to_device(d["csum"]), keys, tuple(d["shape"]),
                                      weights.weights[n], float(d["norm2"]), int(d["block"]))
            hp = tuple(sorted((str(k), freeze(v)) for k, v in e["hyperparameters"]))
            key = RankingKey(score_family(get_method(e["method"])), hp, e["seed"], e["start_key"], e["fingerprint"])
            self.rankings.put(key, Ranking(e["names"], layers))
            loaded += 1
        return loaded
