"""Plot functions: data in (tidy DataFrames from prune_lab.analysis), ``matplotlib.figure.Figure`` out.

Built with ``Figure()``, never pyplot (no global figure registry, safe inside widget callbacks). One colour per
method everywhere (:func:`method_color`, fixed by registry order). Every figure keeps the data it plots in
``fig.plot_data`` (a DataFrame) so :func:`save_figure` can write it beside the image.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..methods import list_methods

_PALETTE = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)


class PlotFigure(Figure):
    """A ``Figure`` that shows itself in a notebook (PNG) without pyplot or an inline backend."""

    def _repr_png_(self):
        import io

        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


def method_color(method: str):
    """The colour of ``method`` in every figure (registry order; unknown names hash into the palette)."""
    names = list_methods()
    i = names.index(method) if method in names else sum(map(ord, method))
    return _PALETTE[i % len(_PALETTE)]


def method_label(method: str) -> str:
    """The display name of ``method`` (the registry's label, e.g. ``"Global MP"``); unknown names as they are."""
    from ..methods import get_method

    try:
        return get_method(method).label
    except ValueError:
        return method


@contextlib.contextmanager
def paper_style():
    """Seaborn's whitegrid/paper style for the figures made inside, without changing global settings."""
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15):
        yield


def _figure(figsize, ax=None):
    if ax is not None:
        return ax.figure, ax
    fig = PlotFigure(figsize=figsize, layout="constrained", dpi=100)
    return fig, fig.subplots()


def _short(layer: str) -> str:
    return layer[:-7] if layer.endswith(".weight") else layer


def _grouped_bars(ax, df: pd.DataFrame, value: str, methods, layers, *, alpha=1.0):
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(layers))
    for i, m in enumerate(methods):
        part = df[df.method == m].set_index("layer").reindex(layers)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, part[value].to_numpy(dtype=float), width * 0.95,
               color=method_color(m), label=method_label(m), alpha=alpha, linewidth=0)
    return x


def _layer_ticks(ax, x, layers, sizes=None):
    labels = [_short(n) if sizes is None else f"{_short(n)}\n{int(k):,}" for n, k in
              zip(layers, sizes if sizes is not None else [0] * len(layers))]
    ax.set_xticks(x, labels, rotation=45 if len(layers) > 8 else 0, ha="right" if len(layers) > 8 else "center",
                  fontsize=8 if len(layers) > 12 else None)


def plot_layer_sparsity(data: pd.DataFrame, *, ax=None, title=None) -> Figure:
    """Per-layer sparsity bars, methods side by side, layer sizes under the names.

    ``data``: ``method, layer, n_weights, sparsity`` (e.g. :func:`prune_lab.analysis.layer_table`).
    """
    methods = list(dict.fromkeys(data["method"]))
    layers = list(dict.fromkeys(data["layer"]))
    sizes = data.drop_duplicates("layer").set_index("layer").reindex(layers)["n_weights"].to_numpy()
    with paper_style():
        fig, ax = _figure((max(6.0, 0.55 * len(layers) * max(1, len(methods)) ** 0.5 + 2), 3.6), ax)
        x = _grouped_bars(ax, data, "sparsity", methods, layers)
        _layer_ticks(ax, x, layers, sizes)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("sparsity (fraction of the layer removed)")
        ax.set_xlabel("layer (weights)")
        ax.set_title(title or "Layerwise sparsity")
        ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.plot_data = data.copy()
    fig.bar_values = [("sparsity", methods, layers)]
    return fig


def plot_distortion(data: pd.DataFrame, *, ax=None, relative: bool = True, title=None) -> Figure:
    """Frobenius distortion per layer, single-layer (top) and lookahead (bottom), methods side by side; relative
    (÷ the distortion of removing the whole layer) by default.

    ``data``: ``method, layer, frobenius, relative_frobenius, lookahead, relative_lookahead`` (e.g. stacked
    ``session.distortion(result)`` tables with a ``method`` column; the ``(model)`` row is dropped).
    """
    data = data[data["layer"] != "(model)"]
    methods = list(dict.fromkeys(data["method"]))
    layers = list(dict.fromkeys(data["layer"]))
    single = "relative_frobenius" if relative else "frobenius"
    with paper_style():
        if ax is None:
            fig = PlotFigure(figsize=(max(6.4, 0.5 * len(layers) * max(1, len(methods)) ** 0.5 + 2), 5.0),
                         layout="constrained", dpi=100)
            ax1, ax2 = fig.subplots(2, 1, sharex=True)
        else:
            fig, ax1, ax2 = ax.figure, ax, None
        x = _grouped_bars(ax1, data, single, methods, layers)
        ax1.set_ylabel("single layer\n‖W − W̃‖ / ‖W‖" if relative else "single layer ‖W − W̃‖_F")
        ax1.set_title(title or ("Distortion per layer, relative to removing the whole layer" if relative else
                                "Distortion per layer"))
        ax1.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        look = "relative_lookahead" if relative and "relative_lookahead" in data else "lookahead"
        if ax2 is not None and look in data:
            _grouped_bars(ax2, data, look, methods, layers, alpha=0.6)
            ax2.set_ylabel("lookahead\n‖W₊ΔW W₋‖ / ‖W₊W W₋‖" if look == "relative_lookahead" else
                           "lookahead ‖W₊ΔW W₋‖_F")
            _layer_ticks(ax2, x, layers)
            ax2.set_xlabel("layer")
        else:
            _layer_ticks(ax1, x, layers)
        if relative:
            _fixed_unit_range(ax1, data[single].to_numpy(dtype=float), force=True)
            if ax2 is not None and look in data:
                _fixed_unit_range(ax2, data[look].to_numpy(dtype=float), force=True)
    fig.plot_data = data.copy()
    fig.bar_values = [(single, methods, layers)] + ([(look, methods, layers)] if ax2 is not None else [])
    return fig


def _fixed_unit_range(ax, values, force: bool = False) -> bool:
    """Relative distortions live in [0, 1] (rarely above): a fixed y-range keeps the frame still while a slider
    moves. Keeps the current range when it fits ``values`` (returns True), else sets a new one (returns False)."""
    top = float(np.nanmax(values)) if np.size(values) and not np.isnan(values).all() else 0.0
    lo, hi = ax.get_ylim()
    if not force and lo == 0.0 and top <= hi and (hi == 1.05 or top > hi / 1.5):
        return True
    ax.set_ylim(0.0, 1.05 if top <= 1.05 else top * 1.1)
    return False


def update_bars(fig: Figure, data: pd.DataFrame, title: str | None = None) -> bool:
    """Put new values into the bars of a figure made by :func:`plot_layer_sparsity` or :func:`plot_distortion`
    (same methods and layers): much cheaper than building the figure again while a slider moves. Returns False (and
    changes nothing) when the structure differs; sets ``fig.layout_changed`` when an axis had to be rescaled."""
    spec = getattr(fig, "bar_values", None)
    data = data[data["layer"] != "(model)"]
    if spec is None or list(dict.fromkeys(data["method"])) != spec[0][1] or \
            list(dict.fromkeys(data["layer"])) != spec[0][2]:
        return False
    fig.layout_changed = False
    for ax, (column, methods, layers) in zip(fig.axes, spec):
        values = []
        for container, m in zip(ax.containers, methods):
            v = data[data.method == m].set_index("layer").reindex(layers)[column].to_numpy(dtype=float)
            values.append(v)
            for rect, h in zip(container.patches, v):
                rect.set_height(0.0 if np.isnan(h) else h)
        if column.startswith("relative") and not _fixed_unit_range(ax, np.concatenate(values)):
            fig.layout_changed = True
        elif column in ("frobenius", "lookahead"):  # absolute values: a free axis
            ax.relim()
            ax.autoscale_view(scalex=False)
            fig.layout_changed = True
    if title is not None:
        fig.axes[0].set_title(title)
    fig.plot_data = data.copy()
    return True


def plot_accuracy_curve(data: pd.DataFrame, *, current: float | None = None, dense: float | None = None, ax=None,
                        log_remaining: bool = False, title=None, metric: str = "accuracy",
                        figsize=(6.4, 3.8)) -> Figure:
    """Accuracy (or ``metric="perplexity"``, on a log axis) vs sparsity, one line per method (mean ± std over
    seeds), the current sparsity marked.

    ``data``: ``method, sparsity`` and the metric's column (+ ``seed``): e.g. ``session.sweep(...)``.
    ``log_remaining``: x is the remaining-weights percentage on a log axis (ticks 100 %, 10 %, 1 %, 0.1 %), which
    opens up the high-sparsity end. Legends use the methods' display names.
    """
    if metric not in ("accuracy", "perplexity"):
        raise ValueError(f"unknown metric {metric!r}; valid choices: 'accuracy', 'perplexity'.")
    scale = 100 if metric == "accuracy" else 1
    if "finetuned" in data:
        data = data[~data["finetuned"].astype(bool)]
    with paper_style():
        fig, ax = _figure(figsize, ax)
        for m in dict.fromkeys(data["method"]):
            g = data[data.method == m].groupby("sparsity")[metric].agg(["mean", "std", "count"]).reset_index()
            x = (1 - g["sparsity"]) * 100 if log_remaining else g["sparsity"]
            ax.plot(x, g["mean"] * scale, "o-", color=method_color(m), label=method_label(m), markersize=4)
            if (g["count"] > 1).any():
                ax.fill_between(x, (g["mean"] - g["std"].fillna(0)) * scale, (g["mean"] + g["std"].fillna(0)) * scale,
                                color=method_color(m), alpha=0.2, linewidth=0)
        if dense is not None:
            ax.axhline(dense * scale, color="0.4", linestyle=":", linewidth=1, label="dense")
        if current is not None:
            ax.axvline((1 - current) * 100 if log_remaining else current, color="0.2", linestyle="--", linewidth=1,
                       label=f"current ({current:.3g})")
        if log_remaining:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.set_xlim(100 * 1.15, min(0.1, float((1 - data["sparsity"]).min() * 100) if len(data) else 0.1) / 1.15)
            ax.xaxis.set_major_locator(LogLocator(base=10))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} %"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("remaining weights (log scale)")
        else:
            ax.set_xlabel("sparsity (fraction of prunable weights removed)")
            ax.set_xlim(-0.02, 1.0)
        if metric == "accuracy":
            ax.set_ylabel("test accuracy (%)")
            ax.set_ylim(0, 100)
        else:
            ax.set_ylabel("perplexity (held-out tokens, log scale)")
            ax.set_yscale("log")
        ax.set_title(title or f"{metric.capitalize()} vs sparsity (no fine-tuning)")
        ax.legend(title="method", loc="lower left" if metric == "accuracy" else "upper left", frameon=False)
    fig.plot_data = data.copy()
    return fig


def plot_mask(mask, *, other=None, names=("a", "b"), ax=None, title=None) -> Figure:
    """Kept weights of one layer as an image (``(out, in)``; convs as ``(out, in·kh·kw)``); with ``other``, the
    difference: kept by both, only by the first, only by the second."""
    import torch

    def as2d(m):
        m = torch.as_tensor(m).detach().cpu()
        return m.reshape(m.shape[0], -1).numpy().astype(bool)

    a = as2d(mask)
    with paper_style():
        fig, ax = _figure((6.0, 3.6), ax)
        if other is None:
            ax.imshow(a, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
            ax.set_title(title or f"kept weights: {a.sum():,} of {a.size:,}")
            data = pd.DataFrame({"row": np.nonzero(a)[0], "col": np.nonzero(a)[1]})
        else:
            b = as2d(other)
            img = np.ones(a.shape + (3,))
            img[a & b] = (0.15, 0.15, 0.15)
            img[a & ~b] = method_color(names[0]) if names[0] in list_methods() else (0.0, 0.45, 0.7)
            img[~a & b] = method_color(names[1]) if names[1] in list_methods() else (0.8, 0.4, 0.0)
            ax.imshow(img, interpolation="nearest", aspect="auto")
            ax.set_title(title or f"both {int((a & b).sum()):,} · only {names[0]} {int((a & ~b).sum()):,} · "
                                  f"only {names[1]} {int((~a & b).sum()):,}")
            data = pd.DataFrame({"both": [int((a & b).sum())], f"only_{names[0]}": [int((a & ~b).sum())],
                                 f"only_{names[1]}": [int((~a & b).sum())]})
        ax.set_xlabel("input unit (× kernel taps)")
        ax.set_ylabel("output unit")
        ax.grid(False)
    fig.plot_data = data
    return fig


def save_figure(fig: Figure, path, *, formats=("png", "pdf", "svg"), dpi: int = 300) -> list:
    """Write ``fig`` as PNG (``dpi``), PDF and SVG, plus its plotted data as CSV (a ``label`` column with each
    method's display name beside its ``method`` id); ``path`` without suffix.
    Returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = path.with_suffix(f".{fmt}")
        fig.savefig(p, format=fmt, dpi=dpi if fmt == "png" else None, bbox_inches="tight")
        out.append(p)
    data = getattr(fig, "plot_data", None)
    if data is not None:
        p = path.with_suffix(".csv")
        if "method" in data.columns and "label" not in data.columns:  # the id and the display name, both
            data = data.copy()
            data.insert(list(data.columns).index("method") + 1, "label", data["method"].map(method_label))
        data.to_csv(p, index=False)
        out.append(p)
    return out


def save_settings(settings: dict, path) -> Path:
    """Write the settings behind a set of figures as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, default=str))
    return path
