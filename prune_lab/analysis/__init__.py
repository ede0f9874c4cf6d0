"""Analysis, headless: the session, distortion tables and curves, cached sweeps, comparisons, sanity checks —
pandas DataFrames. Every operation is a function taking a session first (``distortion(session, result)``,
``sweep(session, ...)``, ``prune_lab.analysis.sensitivity.sensitivity(session, ...)``); :class:`PruneSession` offers
the same as methods."""
from ..core.allocation import SensitivityTable
from .collapse import critical_sparsity, effective_masks, effective_sparsity, layer_collapse
from .compare import layer_table, mask_overlap, score_rank_correlation
from .footprint import footprint
from .measures import distortion, distortion_curve, output_distortion
from .sanity import sanity_checks
from .sensitivity import (compare_allocations, iter_sensitivity, sensitivity_allocation, sensitivity_frame,
                          sensitivity_table)
from .session import PruneSession
from .sweeps import ResultStore, SweepPoint, sweep

__all__ = ["PruneSession", "ResultStore", "SensitivityTable", "SweepPoint", "compare_allocations",
           "critical_sparsity", "distortion", "distortion_curve", "effective_masks", "effective_sparsity",
           "footprint", "iter_sensitivity", "layer_collapse", "layer_table", "mask_overlap", "output_distortion",
           "sanity_checks", "score_rank_correlation", "sensitivity_allocation", "sensitivity_frame",
           "sensitivity_table", "sweep"]
