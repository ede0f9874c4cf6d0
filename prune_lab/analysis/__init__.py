"""Analysis, headless: distortion tables and curves, cached sweeps, comparisons, sanity checks — pandas DataFrames."""
from .collapse import critical_sparsity, effective_masks, effective_sparsity, layer_collapse
from .compare import layer_table, mask_overlap, score_rank_correlation
from .footprint import footprint
from .sanity import sanity_checks
from .session import PruneSession

__all__ = ["PruneSession", "critical_sparsity", "effective_masks", "effective_sparsity", "footprint",
           "layer_collapse", "layer_table", "mask_overlap", "sanity_checks", "score_rank_correlation"]
