"""The engine: the parts a session is built from and the path from a query to masks.

``Query`` (the key of every cache), ``WeightSnapshot`` (structure, change detection, fingerprint), ``RankingCache``
(rankings and mask sets, bounded, saved and loaded), ``prune_query`` (query → result) and the one-call ``prune`` and
``score``. The session that composes them is :class:`prune_lab.PruneSession` (``prune_lab.analysis``).
"""
from .cache import RankingCache, RankingKey
from .iterative import IterativeResult, iterative_prune
from .prune import prune, prune_query, score
from .query import Query
from .result import PruneResult
from .weights import WeightSnapshot, fingerprint
from ..core.device import resolve_device

__all__ = ["IterativeResult", "PruneResult", "Query", "RankingCache", "RankingKey", "WeightSnapshot", "fingerprint",
           "iterative_prune", "prune", "prune_query", "resolve_device", "score"]

