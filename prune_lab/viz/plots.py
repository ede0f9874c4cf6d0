"""Plot functions: data in (tidy DataFrames from prune_lab.analysis), ``matplotlib.figure.Figure`` out.

Built with ``Figure()``, never pyplot (no global figure registry, safe inside widget callbacks). One colour per
method and per allocation everywhere (:func:`prune_lab.viz.color`, one fixed table). Every figure keeps the data it
plots in ``fig.plot_data`` (a DataFrame) so :func:`save_figure` can write it beside the image.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .colors import color, kind, label

class PlotFigure(Figure):
    """A ``Figure`` that shows itself in a notebook (PNG) without pyplot or an inline backend."""

    def _repr_png_(self):
        import io

        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


def method_color(method: str):
    """The colour of a method or allocation (id or display name): the same as :func:`prune_lab.viz.color`."""
    return color(method)


def method_label(method: str) -> str:
    """The display name of a method or allocation id (the registry's label, e.g. ``"Global magnitude"``);
    other names as they are."""
    return label(method)


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


#: above this many layers the per-layer figures draw a line per method over the layers (in data-flow order)
#: instead of grouped bars, so 50–200 layers stay one readable page
MAX_BAR_LAYERS = 16
_TICK_PT = 8.0  # layer names on a many-layer axis: never smaller
#: line figures give each method of a figure its own open marker too (in the figure's order), so lines that
#: coincide stay visible and a grey-scale print still tells them apart
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _line_style(i: int, name: str, size: float = 4.5) -> dict:
    c = color(name)
    return {"color": c, "marker": MARKERS[i % len(MARKERS)], "markersize": size, "markerfacecolor": "none",
            "markeredgecolor": c, "markeredgewidth": 1.1, "label": label(name)}


def _short(layer: str, limit: int = 28) -> str:
    """``.weight`` dropped; a long path keeps its last ``limit`` characters behind ``…``."""
    layer = layer[:-7] if layer.endswith(".weight") else layer
    return layer if len(layer) <= limit else "…" + layer[-(limit - 1):]


def short_count(n: int) -> str:
    """A weight count in a few characters: 800, 2.6k, 2.4M."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2g}{unit}" if n < 10 * div else f"{n / div:.0f}{unit}"
    return str(n)


def _many(layers) -> bool:
    return len(layers) > MAX_BAR_LAYERS


def _layer_figsize(layers, methods, height: float, sizes=None):
    """Grouped bars widen with layers × methods; a many-layer line figure widens by one 8-pt name per layer
    (rotated) and grows downwards by the longest name."""
    longest = max((len(t) for t in _tick_labels(layers, sizes)), default=0) * _TICK_PT * 0.6 / 72  # inches
    if not _many(layers):  # names rotated by 45° above 8 layers: their height comes on top
        return max(6.0, 0.55 * len(layers) * max(1, len(methods)) ** 0.5 + 2), \
            height + (0.7 * longest if len(layers) > 8 else 0.0)
    return min(max(6.4, 0.15 * len(layers) + 2.8), 16.0), height + longest


def _grouped_bars(ax, df: pd.DataFrame, value: str, methods, layers, *, alpha=1.0):
    x = np.arange(len(layers))
    if _many(layers):
        for i, m in enumerate(methods):
            part = df[df.method == m].set_index("layer").reindex(layers)
            ax.plot(x, part[value].to_numpy(dtype=float), linewidth=1.1, alpha=alpha, **_line_style(i, m, 4.0))
        return x
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        part = df[df.method == m].set_index("layer").reindex(layers)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, part[value].to_numpy(dtype=float), width * 0.95,
               color=color(m), label=label(m), alpha=alpha, linewidth=0)
    return x


def _tick_labels(layers, sizes=None) -> list:
    if len(layers) > 8:  # rotated names: one line each
        return [_short(n) if sizes is None else f"{_short(n)} ({short_count(int(k))})" for n, k in
                zip(layers, sizes if sizes is not None else [0] * len(layers))]
    return [_short(n) if sizes is None else f"{_short(n)}\n{int(k):,}" for n, k in
            zip(layers, sizes if sizes is not None else [0] * len(layers))]


def _layer_ticks(ax, x, layers, sizes=None):
    labels = _tick_labels(layers, sizes)
    if _many(layers):
        ax.set_xticks(x, labels, rotation=90, fontsize=_TICK_PT)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        return
    ax.set_xticks(x, labels, rotation=45 if len(layers) > 8 else 0, ha="right" if len(layers) > 8 else "center",
                  rotation_mode="anchor" if len(layers) > 8 else "default", fontsize=_TICK_PT if len(layers) > 12
                  else None)


def plot_layer_sparsity(data: pd.DataFrame, *, ax=None, title=None) -> Figure:
    """Per-layer sparsity, methods (or allocations) side by side in their colours, layer sizes beside the names:
    grouped bars up to 16 layers, a line per method over the layers (data-flow order) above.

    ``data``: ``method, layer, n_weights, sparsity`` (e.g. :func:`prune_lab.analysis.layer_table`).

    >>> t = pd.DataFrame({"method": ["lamp", "lamp"], "layer": ["a.weight", "b.weight"], "n_weights": [10, 4],
    ...                   "sparsity": [0.5, 0.25]})
    >>> plot_layer_sparsity(t).axes[0].get_ylabel()
    'layer sparsity (fraction removed)'
    """
    methods = list(dict.fromkeys(data["method"]))
    layers = list(dict.fromkeys(data["layer"]))
    sizes = data.drop_duplicates("layer").set_index("layer").reindex(layers)["n_weights"].to_numpy()
    with paper_style():
        fig, ax = _figure(_layer_figsize(layers, methods, 3.6, sizes), ax)
        x = _grouped_bars(ax, data, "sparsity", methods, layers)
        _layer_ticks(ax, x, layers, sizes)
        ax.set_ylim(*((0, 1.0) if not _many(layers) else (-0.02, 1.02)))  # markers at 0 and 1 whole
        ax.set_ylabel("layer sparsity (fraction removed)")
        ax.set_xlabel("layer (number of weights)" + (", input → output" if _many(layers) else ""))
        ax.set_title(title or "Layerwise sparsity")
        ax.legend(title=kind(methods), loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.plot_data = data.copy()
    fig.bar_values = None if _many(layers) else [("sparsity", methods, layers)]
    return fig


def plot_distortion(data: pd.DataFrame, *, ax=None, relative: bool = True, title=None) -> Figure:
    """Frobenius distortion per layer, single-layer (top) and lookahead (bottom), methods side by side; relative
    (÷ the distortion of removing the whole layer) by default. Grouped bars up to 16 layers, a line per method
    above.

    ``data``: ``method, layer, frobenius, relative_frobenius, lookahead, relative_lookahead`` (e.g. stacked
    ``session.distortion(result)`` tables with a ``method`` column; the ``(model)`` row is dropped).
    """
    data = data[data["layer"] != "(model)"]
    methods = list(dict.fromkeys(data["method"]))
    layers = list(dict.fromkeys(data["layer"]))
    single = "relative_frobenius" if relative else "frobenius"
    with paper_style():
        if ax is None:
            fig = PlotFigure(figsize=_layer_figsize(layers, methods, 5.0), layout="constrained", dpi=100)
            ax1, ax2 = fig.subplots(2, 1, sharex=True)
        else:
            fig, ax1, ax2 = ax.figure, ax, None
        x = _grouped_bars(ax1, data, single, methods, layers)
        ax1.set_ylabel("single-layer distortion\n(relative)" if relative else
                       "single-layer distortion\n(Frobenius norm)")
        ax1.set_title(title or ("Distortion per layer, relative to removing the whole layer" if relative else
                                "Distortion per layer"))
        ax1.legend(title=kind(methods), loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        look = "relative_lookahead" if relative and "relative_lookahead" in data else "lookahead"
        if ax2 is not None and look in data:
            _grouped_bars(ax2, data, look, methods, layers)
            ax2.set_ylabel("lookahead distortion\n(relative)" if look == "relative_lookahead" else
                           "lookahead distortion\n(Frobenius norm)")
            _layer_ticks(ax2, x, layers)
            ax2.set_xlabel("layer" + (", input → output" if _many(layers) else ""))
        else:
            _layer_ticks(ax1, x, layers)
            if ax2 is not None:
                ax2.set_axis_off()
        if relative:
            _fixed_unit_range(ax1, data[single].to_numpy(dtype=float), force=True)
            if ax2 is not None and look in data:
                _fixed_unit_range(ax2, data[look].to_numpy(dtype=float), force=True)
    fig.plot_data = data.copy()
    fig.bar_values = None if _many(layers) else \
        [(single, methods, layers)] + ([(look, methods, layers)] if ax2 is not None and look in data else [])
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
    spec = getattr(fig, "bar_values", None)  # None: a many-layer line figure, rebuilt instead
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
        for i, m in enumerate(dict.fromkeys(data["method"])):
            g = data[data.method == m].groupby("sparsity")[metric].agg(["mean", "std", "count"]).reset_index()
            x = (1 - g["sparsity"]) * 100 if log_remaining else g["sparsity"]
            ax.plot(x, g["mean"] * scale, linewidth=1.4, **_line_style(i, m))
            if (g["count"] > 1).any():
                ax.fill_between(x, (g["mean"] - g["std"].fillna(0)) * scale, (g["mean"] + g["std"].fillna(0)) * scale,
                                color=color(m), alpha=0.2, linewidth=0)
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
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_ylabel("perplexity (held-out tokens, log scale)")
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            # 10, 20, 50, 100, 200 …; within one decade finer steps, so the axis keeps a few labelled ticks
            span = hi / max(lo, 1e-12)
            subs = (1.0, 2.0, 5.0) if span > 10 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if span > 2.5 else \
                (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title or f"{metric.capitalize()} vs sparsity (no fine-tuning)")
        ax.legend(title=kind(list(dict.fromkeys(data["method"]))), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)  # beside the axes: never over a curve
    fig.plot_data = data.copy()
    return fig


def plot_mask(mask, *, other=None, names=("a", "b"), ax=None, title=None) -> Figure:
    """Kept weights of one layer as an image (``(out, in)``; convs as ``(out, in·kh·kw)``); with ``other``, the
    difference: kept by both (dark grey), only by the first, only by the second (the methods' colours when
    ``names`` are registered methods or allocations), with a legend. ``names`` show as display names."""
    import torch
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    def as2d(m):
        m = torch.as_tensor(m).detach().cpu()
        return m.reshape(m.shape[0], -1).numpy().astype(bool)

    a = as2d(mask)
    with paper_style():
        fig, ax = _figure((6.0, 3.6), ax)
        if other is None:
            ax.imshow(a, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
            ax.set_title(title or f"Kept weights (black): {a.sum():,} of {a.size:,}")
            data = pd.DataFrame({"row": np.nonzero(a)[0], "col": np.nonzero(a)[1]})
        else:
            b = as2d(other)
            img = np.ones(a.shape + (3,))
            both = (0.15, 0.15, 0.15)
            first, second = _mask_colors(names)
            img[a & b] = both
            img[a & ~b] = first
            img[~a & b] = second
            ax.imshow(img, interpolation="nearest", aspect="auto")
            shown = [label(n) for n in names]
            counts = [int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())]
            ax.legend(handles=[Patch(color=c, label=f"{t}: {k:,}") for c, t, k in
                               zip((both, first, second), ("kept by both", f"only {shown[0]}", f"only {shown[1]}"),
                                   counts)],
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="kept weights")
            ax.set_title(title or f"Kept weights: {shown[0]} vs {shown[1]}")
            data = pd.DataFrame({"both": [counts[0]], f"only_{names[0]}": [counts[1]],
                                 f"only_{names[1]}": [counts[2]]})
        conv = torch.as_tensor(mask).dim() > 2
        ax.set_xlabel("input channel × kernel position" if conv else "input unit")
        ax.set_ylabel("output channel" if conv else "output unit")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(False)
    fig.plot_data = data
    return fig


def _mask_colors(names):
    """The colours of "only in the first" / "only in the second": the methods' own when both are registered names
    of different colours, else blue and orange."""
    from .colors import COLORS, resolve

    ids = [resolve(n) for n in names]
    if all(i in COLORS for i in ids) and color(ids[0]) != color(ids[1]):
        return color(ids[0]), color(ids[1])
    return color("magnitude"), color("global_magnitude")


def save_figure(fig: Figure, path, *, formats=("png", "pdf", "svg"), dpi: int = 300) -> list:
    """Write ``fig`` as PNG (``dpi``), PDF and SVG, plus its plotted data as CSV (a ``label`` column with each
    method's display name beside its ``method`` id); ``path`` without suffix. PDFs embed their fonts as TrueType
    (Type 42), which publishers' checks accept (matplotlib's default Type 3 fonts are refused by some).
    Returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    import matplotlib

    # TrueType (Type 42) fonts in PDF/PS: publishers' checks refuse Type 3 fonts
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
        for fmt in formats:
            p = path.with_suffix(f".{fmt}")
            fig.savefig(p, format=fmt, dpi=dpi if fmt == "png" else None, bbox_inches="tight")
            out.append(p)
    data = getattr(fig, "plot_data", None)
    if data is not None:
        p = path.with_suffix(".csv")
        if "method" in data.columns and "label" in data.columns and \
                data["label"].astype(str).equals(data["method"].astype(str)):
            data = data.drop(columns="label")  # a copy of the ids (e.g. a layer_table keyed by method): names instead
        if "method" in data.columns and "label" not in data.columns:  # the id and the display name, both
            data = data.copy()
            data.insert(list(data.columns).index("method") + 1, "label", data["method"].map(label))
        data.to_csv(p, index=False)
        out.append(p)
    return out


def save_settings(settings: dict, path) -> Path:
    """Write the settings behind a set of figures as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, default=str))
    return path
