"""The dashboard: a thin ipywidgets view over a traitlets state."""
from .lab import LabState, PruneLab

__all__ = ["LabState", "PruneLab"]
