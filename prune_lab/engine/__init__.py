"""The engine: sessions that score once and threshold many times."""
from .prune import prune, score
from .result import PruneResult
from .session import PruneSession, resolve_device

__all__ = ["PruneResult", "PruneSession", "prune", "resolve_device", "score"]
