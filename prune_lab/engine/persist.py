"""Save a session's cached rankings to a file and load them back, so that a notebook re-opened on the same model
prunes at once instead of scoring again.

The file format belongs to the cache: see :mod:`prune_lab.engine.cache` (:meth:`RankingCache.save` and
:meth:`RankingCache.load`). These two functions are the session-level entry points (``session.save_cache(path)``
and ``session.load_cache(path)`` call the same): loading keeps only the entries whose fingerprint and layers match
the session's current model; a cache saved before the weights changed is never used.
"""
from __future__ import annotations

from .cache import FORMAT, FORMAT_VERSION

__all__ = ["FORMAT", "FORMAT_VERSION", "load_cache", "save_cache"]


def save_cache(session, path) -> int:
    """Write ``session``'s cached rankings to ``path``; returns how many were written.

    >>> import os, tempfile, torch, prune_lab as pl
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> s = pl.PruneSession(net, device="cpu"); _ = s.prune("lap", 0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "cache.pt")
    >>> save_cache(s, path), load_cache(pl.PruneSession(net, device="cpu"), path)
    (1, 1)
    """
    return session.cache.save(path, session.layer_names)


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
    return session.cache.load(path, session.snapshot.current(), session.layer_names)
