"""The engine: sessions that score once and threshold many times."""
from .iterative import IterativeResult, iterative_prune
from .prune import prune, score
from .result import PruneResult
from .session import PruneSession, resolve_device

__all__ = ["IterativeResult", "PruneResult", "PruneSession", "iterative_prune", "prune", "resolve_device", "score"]
