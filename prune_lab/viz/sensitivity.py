"""Layer sensitivity (``session.sensitivity(...)``): one small line per layer for a few layers, a heat map layer ×
sparsity for many. Works on partial data (a run still filling in): missing points are blank."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize

from .layers import short_layer_name
from .colors import color, label
from .plots import PlotFigure, paper_style, short_count

FONT_PT = 8.0  # the smallest text in these figures (at 100 % zoom)
LAYOUTS = ("auto", "lines", "heatmap")
MAX_LINES = 16  # "auto" draws small lines up to this many layers, a heat map above


#: axis words per metric: (the metric's value, its increase over the dense network)
METRIC_LABELS = {
    "accuracy": ("test accuracy (fraction)", "accuracy drop (fraction)"),
    "loss": ("test loss (cross-entropy)", "test-loss increase over dense"),
    "perplexity": ("perplexity (held-out tokens)", "perplexity increase over dense"),
    "output_distortion": ("output distortion (relative)", "output distortion (relative)"),
}
COLUMN_LABELS = {"loss_increase": "test-loss increase over dense", "accuracy": "test accuracy (fraction)",
                 "loss": "test loss (cross-entropy)", "layer_sparsity": "layer sparsity (fraction removed)"}


def _metric_label(data: pd.DataFrame, column: str) -> str:
    """Axis words for ``column`` of a sensitivity table (its metric's name and unit)."""
    metric = str(data["metric"].iloc[0]) if "metric" in data.columns and len(data) else "value"
    words = METRIC_LABELS.get(metric, (metric.replace("_", " "), metric.replace("_", " ") + " increase"))
    if column == "value":
        return words[0]
    if column == "increase":
        return words[1]
    return COLUMN_LABELS.get(column, column.replace("_", " "))


def _layers(data: pd.DataFrame) -> list:
    if "order" in data.columns:
        return data.drop_duplicates("layer").sort_values("order", kind="stable")["layer"].tolist()
    return list(dict.fromkeys(data["layer"]))


def plot_sensitivity(data: pd.DataFrame, *, layout: str = "auto", y: str | None = None, ax=None, title=None,
                     layers=None) -> PlotFigure:
    """Per-layer sensitivity curves from :meth:`prune_lab.PruneSession.sensitivity` (any rows: a partial run
    plots what it has).

    ``layout``: ``"lines"`` (one small panel per layer: ``y`` against the layer's achieved sparsity, one colour per
    method, the dense value dashed), ``"heatmap"`` (layers × grid sparsities, colour = ``y``; rows in data-flow
    order, names shortened, 8 pt text, the figure growing one row per layer so 100+ layers stay readable), or
    ``"auto"`` (lines up to 16 layers). ``y``: a column; default ``"value"`` (the metric) for lines and
    ``"increase"`` (the harm, higher = worse, for every metric) for the heat map. ``layers``: a subset to draw.
    ``ax`` (heat map, one method): draw into it. ``fig.plot_data`` holds the plotted rows.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"layer": ["a", "a", "b", "b"], "sparsity": [0.5, 0.9] * 2, "method": "magnitude",
    ...                    "value": [0.1, 0.5, 0.2, 0.3], "dense": 0.1, "increase": [0, 0.4, 0.1, 0.2]})
    >>> plot_sensitivity(df).plot_data.shape
    (4, 6)
    """
    from ..core.validation import check_choice

    layout = check_choice(layout, LAYOUTS, what="layout")
    if not isinstance(data, pd.DataFrame) or not {"layer", "sparsity"} <= set(data.columns):
        raise TypeError("plot_sensitivity needs the DataFrame of session.sensitivity(...) (columns layer, sparsity, "
                        f"value, …), got {type(data).__name__}.")
    data = data.copy()
    if "method" not in data.columns:
        data["method"] = "magnitude"
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in layers if n not in set(data["layer"])]
        if missing:
            raise ValueError(f"layers {missing} are not in the data (it has {', '.join(_layers(data)[:6])}…).")
        data = data[data["layer"].isin(layers)]
    names = _layers(data)
    if layout == "auto":
        layout = "lines" if len(names) <= MAX_LINES else "heatmap"
    if y is None:
        y = "value" if layout == "lines" else "increase"
    if len(data) and y not in data.columns:
        raise ValueError(f"y={y!r} is not a column of the data; choose one of "
                         f"{', '.join(c for c in data.columns if pd.api.types.is_numeric_dtype(data[c]))}.")
    with paper_style():
        fig = _lines(data, names, y, title) if layout == "lines" else _heatmap(data, names, y, title, ax)
    fig.plot_data = data.reset_index(drop=True)
    fig.sensitivity_layers = names
    return fig


def _empty(fig, ax, title):
    ax.text(0.5, 0.5, "no sensitivity points yet", ha="center", va="center", fontsize=10, transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(title or "Layer sensitivity", fontsize=10)
    return fig


def _lines(data, names, y, title) -> PlotFigure:
    n = max(len(names), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = PlotFigure(figsize=(2.3 * cols + 0.4, 1.9 * rows + 0.6), layout="constrained", dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    if not names:
        for a in axes[1:]:
            a.set_axis_off()
        return _empty(fig, axes[0], title)
    x = "layer_sparsity" if "layer_sparsity" in data.columns else "sparsity"
    methods = list(dict.fromkeys(data["method"]))
    for a, name in zip(axes, names):
        part = data[data["layer"] == name]
        for m in methods:
            pm = part[part["method"] == m].sort_values(x)
            a.plot(pm[x], pm[y], marker="o", markersize=3, linewidth=1.4, color=color(m),
                   label=label(m))
        if y == "value" and "dense" in part.columns and len(part):
            a.axhline(float(part["dense"].iloc[0]), color="0.4", linestyle="--", linewidth=0.8)
        size = f" ({short_count(int(part['n_weights'].iloc[0]))} weights)" \
            if "n_weights" in part.columns and len(part) else ""
        a.set_title(short_layer_name(name, 28) + size, fontsize=FONT_PT + 1)
        a.tick_params(labelsize=FONT_PT)
    for a in axes[len(names):]:
        a.set_axis_off()
    fig.supxlabel("layer sparsity (fraction removed; other layers dense)", fontsize=FONT_PT + 1)
    fig.supylabel(_metric_label(data, y), fontsize=FONT_PT + 1)
    if len(methods) > 1:
        handles, texts = axes[0].get_legend_handles_labels()
        fig.legend(handles, texts, loc="outside right upper", fontsize=FONT_PT, frameon=False,
                   title="method", title_fontsize=FONT_PT + 1)  # beside the panels, never over a curve
    fig.suptitle(title or f"Layer sensitivity, {', '.join(label(m) for m in methods)} scores"
                          + (" (dashed line: dense network)" if y == "value" else ""),
                 fontsize=FONT_PT + 2)
    return fig


def _heatmap(data, names, y, title, ax) -> PlotFigure:
    methods = list(dict.fromkeys(data["method"])) or ["magnitude"]
    grid = sorted(data["sparsity"].unique()) if len(data) else []
    height = max(2.6, 0.16 * len(names) + 1.4)  # one 8-pt row per layer
    if ax is not None:
        if len(methods) > 1:
            raise ValueError("ax= draws one heat map: pass the rows of one method.")
        fig, axes = ax.figure, [ax]
    else:
        fig = PlotFigure(figsize=(min(3.2 + 0.42 * len(grid), 9.0) * len(methods) + 1.2, height),
                         layout="constrained", dpi=100)
        axes = np.atleast_1d(fig.subplots(1, len(methods), sharey=True, squeeze=False)).ravel()
    if not names:
        return _empty(fig, axes[0], title)
    values = data[y].to_numpy(dtype=float) if len(data) else np.zeros(0)
    finite = values[np.isfinite(values)]
    norm = Normalize(vmin=min(0.0, float(finite.min())) if finite.size else 0.0,
                     vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    image = None
    for a, m in zip(axes, methods):
        part = data[data["method"] == m]
        table = part.pivot_table(index="layer", columns="sparsity", values=y, aggfunc="mean")
        table = table.reindex(index=names, columns=grid)  # missing points (a partial run) stay NaN: blank
        image = a.imshow(np.ma.masked_invalid(table.to_numpy(dtype=float)), aspect="auto", cmap="magma_r",
                         norm=norm, interpolation="nearest")
        a.set_xticks(np.arange(len(grid)), [f"{g:g}" for g in grid], fontsize=FONT_PT,
                     rotation=45 if len(grid) > 8 else 0)
        a.set_yticks(np.arange(len(names)), [short_layer_name(n) for n in names], fontsize=FONT_PT)
        a.set_xlabel("layer sparsity (fraction removed; other layers dense)", fontsize=FONT_PT + 1)
        a.set_title(label(m), fontsize=FONT_PT + 1, color=color(m))
        a.grid(False)
    cbar = fig.colorbar(image, ax=list(axes), shrink=min(1.0, 6.0 / height) if height > 6 else 1.0, pad=0.01)
    cbar.set_label(_metric_label(data, y), fontsize=FONT_PT + 1)
    cbar.ax.tick_params(labelsize=FONT_PT)
    fig.suptitle(title or f"Layer sensitivity: {len(names)} layers × {len(grid)} sparsities", fontsize=FONT_PT + 2)
    return fig
