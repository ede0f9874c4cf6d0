"""What the pointer is over, in words: pure functions of a rendered figure and a pixel (the image's own pixels,
origin top left), used by the dashboard's hover line."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..methods import get_method


def escape(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _span(text: str) -> str:
    return f"<span class='prune-lab-hover-text'>{text}</span>"


def describe_layer(data: pd.DataFrame, layer: str, method: str | None) -> str:
    """The layer panel's row ``layer`` (``data``: its plotted table): full name, weights, and the values of
    ``method`` (every method's sparsity when ``method`` is None: the pointer is on the name)."""
    rows = data[data["layer"] == layer]
    if rows.empty:
        return ""
    n = int(rows["n_weights"].iloc[0])
    head = f"<b>{escape(layer)}</b> ({n:,} weights)"
    if method is None:
        parts = [f"{escape(get_method(m).label)}: sparsity {s:.3f}" for m, s in zip(rows["method"], rows["sparsity"])]
        return _span(f"{head} · {' · '.join(parts)} · click to select")
    r = rows[rows["method"] == method].iloc[0]
    look = r["relative_lookahead"]
    look = "pending" if pd.isna(look) else f"{look:.4f}"
    return _span(f"{head} · {escape(get_method(method).label)} · sparsity {r['sparsity']:.4f} "
                 f"({int(round(r['sparsity'] * n)):,} removed) · single-layer distortion {r['relative_frobenius']:.4f} "
                 f"· lookahead {look} (relative) · click to select")


def describe_point(fig, x_px: float, y_px: float, *, hidden=(), log_remaining: bool = False,
                   metric: str = "accuracy") -> str:
    """The accuracy (or perplexity) curve's point nearest the pixel (within 12 px), methods in ``hidden`` left
    out."""
    data = fig.plot_data
    if data is None or data.empty:
        return ""
    ax = fig.axes[0]
    xs = (1 - data["sparsity"]) * 100 if log_remaining else data["sparsity"]
    ys = data[metric].to_numpy(float) * (100 if metric == "accuracy" else 1)
    pts = ax.transData.transform(np.c_[xs.to_numpy(float), ys])
    d = np.hypot(*(pts - np.array([x_px, fig.bbox.height - y_px])).T)
    d[data["method"].isin(hidden).to_numpy()] = np.inf
    i = int(np.argmin(d))
    if d[i] > 12:
        return ""
    r = data.iloc[i]
    value = f"perplexity {r['perplexity']:.4g}" if metric == "perplexity" else f"accuracy {100 * r['accuracy']:.2f} %"
    return _span(f"{escape(get_method(r['method']).label)} · sparsity {r['sparsity']:.4g} "
                 f"({100 * (1 - r['sparsity']):.3g} % remaining) · {value} · loss {r['loss']:.4f}")


def sensitivity_cell(fig, x_px: float, y_px: float) -> dict | None:
    """The row of the sensitivity heat map's cell under the pixel, or None."""
    data = fig.plot_data
    if data is None or data.empty:
        return None
    ax = fig.axes[0]
    disp = (x_px, fig.bbox.height - y_px)
    if not ax.bbox.contains(*disp):
        return None
    xv, yv = ax.transData.inverted().transform(disp)
    grid = sorted(data["sparsity"].unique())
    names = fig.sensitivity_layers
    col, row = int(round(xv)), int(round(yv))
    if not (0 <= col < len(grid) and 0 <= row < len(names)):
        return None
    hit = data[(data["layer"] == names[row]) & (data["sparsity"] == grid[col])]
    return None if hit.empty else hit.iloc[0].to_dict()


def describe_cell(c: dict) -> str:
    extra = f" · accuracy {100 * c['accuracy']:.2f} %" if pd.notna(c.get("accuracy", np.nan)) else ""
    return _span(f"<b>{escape(c['layer'])}</b> ({int(c['n_weights']):,} weights) pruned alone to {c['sparsity']:g}: "
                 f"{c['metric']} {c['value']:.4f} ({c['increase']:+.4f} over dense){extra} · click to select")
