"""Save a session's cached rankings to a file and load them back, so that a notebook re-opened on the same model
prunes at once instead of scoring again.

What is saved: every cached :class:`~prune_lab.core.ranking.Ranking` (per layer: the pruning order, the cumulative
``w²`` sampled every ``block`` entries, ``‖W‖²`` and the compressed sorted score keys; tensors shared between
rankings, as LAMP's and magnitude's, are stored once; the weights are not saved: a ranking is loaded only where the
fingerprint says the session's weights are those it was built on, and refers to them), keyed by method name,
hyperparameters, seed, starting masks, the session's ``score_dtype`` and the weights' fingerprint. Files of format
1 (full cumulative sums and plain int32 keys) are read and converted. Loading keeps only the
entries whose fingerprint and layers match the session's current model: a cache saved before the weights changed is
never used (stale entries are counted and skipped, not trusted). Cached masks of sparsity-dependent methods are not
saved (they are recomputed on demand).
"""
from __future__ import annotations

import os

import torch

import numpy as np

from ..core.ranking import BLOCK, LayerRank, Ranking, SortedKeys
from ..methods.registry import get_method, list_methods
from .result import plain, read_payload, require_keys

FORMAT = "prune_lab.SessionCache"
FORMAT_VERSION = 2

__all__ = ["load_cache", "save_cache"]


def _method_of(scores_fn) -> str | None:
    """The first registered method whose score function is ``scores_fn`` (rankings are keyed by the function)."""
    for name in list_methods():
        if get_method(name).scores is scores_fn:
            return name
    return None


def save_cache(session, path) -> int:
    """Write ``session``'s cached rankings to ``path``; returns how many were written.

    >>> import os, tempfile, torch, prune_lab as pl
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> s = pl.PruneSession(net, device="cpu"); _ = s.prune("lap", 0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "cache.pt")
    >>> save_cache(s, path), load_cache(pl.PruneSession(net, device="cpu"), path)
    (1, 1)
    """
    from .._version import __version__

    entries = []
    for key, ranking in session._rankings.items():
        scores_fn, hp, seed, start_key, fingerprint = key
        method = _method_of(scores_fn)
        if method is None:  # a method registered and removed since: nothing to key it by
            continue
        hp = plain(list(hp))
        if hp != list(key[1]):  # a hyperparameter value that would not read back equal (an arbitrary object)
            continue
        layers = {}
        for n in ranking.names:
            lr = ranking.layers[n]
            layers[n] = {"order": lr.order.detach().cpu(), "csum": lr.csum.detach().cpu(), "block": int(lr.block),
                         "norm2": float(lr.norm2), "keys": lr.keys.state(), "shape": tuple(lr.shape)}
        entries.append({"method": method, "hyperparameters": list(hp), "seed": seed, "start_key": start_key,
                        "fingerprint": fingerprint, "names": list(ranking.names), "layers": layers,
                        "score_dtype": str(session.score_dtype).replace("torch.", "")
                        if session.score_dtype is not None else None})
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
               "layer_names": list(session.layer_names), "entries": entries}
    torch.save(payload, os.fspath(path))
    return len(entries)


def load_cache(session, path) -> int:
    """Load rankings saved by :func:`save_cache` into ``session``; returns how many were loaded. Entries computed on
    other weights (fingerprint), on other layers or for methods no longer registered are skipped. At most
    ``session.max_cached`` entries are kept (the most recently used ones win, as always).

    >>> import os, tempfile, torch, prune_lab as pl
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 2))
    >>> s = pl.PruneSession(net, device="cpu"); _ = s.prune("magnitude", 0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "cache.pt"); _ = save_cache(s, path)
    >>> with torch.no_grad(): _ = net[0].weight.mul_(2)
    >>> load_cache(pl.PruneSession(net, device="cpu"), path)   # other weights: nothing stale is trusted
    0
    """
    payload = read_payload(path, FORMAT, FORMAT_VERSION, what="a saved session cache",
                           how="save_cache(session, path)")
    require_keys(payload, ("entries",), path, what="saved session cache")
    entry_keys = ("method", "hyperparameters", "seed", "start_key", "fingerprint", "names", "layers")
    for e in payload["entries"]:
        if not isinstance(e, dict) or any(k not in e for k in entry_keys):
            lacks = [k for k in entry_keys if not isinstance(e, dict) or k not in e]
            raise ValueError(f"{os.fspath(path)!r} is not a complete saved session cache: an entry lacks "
                             f"{', '.join(map(repr, lacks))}. The file is damaged or incomplete; write it again.")
    state = session._snapshot()
    fingerprint = state.fingerprint
    device = session.device
    score_dtype = str(session.score_dtype).replace("torch.", "") if session.score_dtype is not None else None
    loaded = 0
    shared: dict = {}  # id of a saved tensor -> its copy on the session's device (keeps LAMP/magnitude sharing)

    def to_device(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in shared:
            shared[key] = t.to(device)
        return shared[key]

    for e in payload["entries"]:
        if e["fingerprint"] != fingerprint or list(e["names"]) != list(session.layer_names):
            continue
        if e.get("score_dtype") != score_dtype:  # ranked at another precision
            continue
        if e["method"] not in list_methods():
            continue
        spec = get_method(e["method"])
        layers = {}
        for n in e["names"]:
            d = e["layers"][n]
            if isinstance(d["keys"], torch.Tensor):  # format 1: plain int32 keys, the full float32 cumulative sum
                csum = d["csum"].to(torch.float64)
                keys = SortedKeys(d["keys"].numpy().astype(np.int32, copy=False))
                d = dict(d, csum=csum[::BLOCK].contiguous(), block=BLOCK, norm2=float(csum[-1]))
            else:
                keys = SortedKeys.from_state(d["keys"])
            layers[n] = LayerRank(to_device(d["order"]), to_device(d["csum"]), keys, tuple(d["shape"]),
                                  state.weights[n], float(d["norm2"]), int(d["block"]))
        key = (spec.scores, tuple(tuple(item) for item in e["hyperparameters"]), e["seed"], e["start_key"],
               e["fingerprint"])
        session._remember(session._rankings, key, Ranking(e["names"], layers))
        loaded += 1
    return loaded
