"""Analysis, headless: distortion tables and curves, cached sweeps, comparisons, sanity checks — pandas DataFrames."""
from .collapse import critical_sparsity, effective_masks, effective_sparsity, layer_collapse
from .compare import layer_table, mask_overlap, score_rank_correlation
from .footprint import footprint
from .sanity import sanity_checks
from .sensitivity import (compare_allocations, iter_sensitivity, sensitivity_allocation, sensitivity_frame,
                          sensitivity_table)
from .session import PruneSession
from ..core.allocation import SensitivityTable

__all__ = ["PruneSession", "SensitivityTable", "compare_allocations", "critical_sparsity", "effective_masks",
           "effective_sparsity", "footprint", "iter_sensitivity", "layer_collapse", "layer_table", "mask_overlap",
           "sanity_checks", "score_rank_correlation", "sensitivity_allocation", "sensitivity_frame",
           "sensitivity_table"]
