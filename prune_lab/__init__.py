"""prune_lab: an interactive analysis environment for pruning neural networks.

>>> import prune_lab as pl
>>> "lap" in pl.list_methods(), pl.list_allocations()
(True, ['uniform', 'global', 'lamp', 'uniform_plus', 'erk', 'sensitivity'])
"""
from . import analysis, data, export, models, training
from ._version import __version__
from .core import pai
from .core.allocation import get_allocation, list_allocations
from .core.graph import build_graph, prunable_parameters
from .analysis import PruneSession
from .engine import IterativeResult, PruneResult, Query, iterative_prune, prune, score
from .methods import get_method, list_methods
from .training import evaluate, perplexity, pretrained, recalibrate_bn, train

__all__ = [
    "IterativeResult", "PruneResult", "PruneSession", "Query", "__version__", "analysis", "build_graph", "data", "evaluate", "export", "iterative_prune", "get_allocation", "get_method", "pai",
    "list_allocations", "list_methods", "models", "perplexity", "pretrained", "prunable_parameters", "prune",
    "recalibrate_bn", "score", "train", "training",
]


def __getattr__(name):
    """The dashboard and the plots load on first use, so the engine imports no UI library."""
    import importlib

    if name == "PruneLab":
        return importlib.import_module(".widgets", __name__).PruneLab
    if name in ("viz", "widgets", "cli"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'prune_lab' has no attribute {name!r}")
