"""Plot functions: data in, ``matplotlib.figure.Figure`` out (never pyplot)."""
from .plots import (method_color, paper_style, plot_accuracy_curve, plot_distortion, plot_layer_sparsity, plot_mask,
                    save_figure, save_settings, update_bars)
from .sensitivity import plot_sensitivity

__all__ = ["method_color", "paper_style", "plot_accuracy_curve", "plot_distortion", "plot_layer_sparsity",
           "plot_mask", "plot_sensitivity", "save_figure", "save_settings", "update_bars"]
