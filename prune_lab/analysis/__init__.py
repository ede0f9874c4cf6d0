"""Analysis, headless: distortion tables and curves, cached sweeps, comparisons, sanity checks — pandas DataFrames."""
from .compare import layer_table, mask_overlap, score_rank_correlation
from .sanity import sanity_checks
from .session import PruneSession

__all__ = ["PruneSession", "layer_table", "mask_overlap", "sanity_checks", "score_rank_correlation"]
