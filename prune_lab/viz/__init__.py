"""Plot functions: data in, ``matplotlib.figure.Figure`` out (never pyplot). One colour per method and per
allocation in every figure: :func:`color` (ids or display names)."""
from .colors import color
from .plots import (method_color, paper_style, plot_accuracy_curve, plot_distortion, plot_layer_sparsity, plot_mask,
                    save_figure, save_settings, update_bars)
from .sensitivity import plot_sensitivity

__all__ = ["color", "method_color", "paper_style", "plot_accuracy_curve", "plot_distortion", "plot_layer_sparsity",
           "plot_mask", "plot_sensitivity", "save_figure", "save_settings", "update_bars"]
