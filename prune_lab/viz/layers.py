"""The layer panel: one row per layer, three columns — sparsity, single-layer and lookahead distortion.

Horizontal bars, so a model of 3 or 200 layers reads the same: the figure grows one row per layer (the dashboard
scrolls it) and every name stays on one line. Each method's bars of one column are a single ``PolyCollection``,
so a slider move is ``set_verts`` on a few collections and a blitted redraw (:func:`update_layers`), not a new
figure. The figure's geometry (``fig.layer_geometry``) maps a pixel back to the layer and method under it
(:func:`hit_test`): the dashboard's hover and click use it.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.collections import PolyCollection
from matplotlib.patches import Patch

from .plots import PlotFigure, method_color, method_label, paper_style

COLUMNS = (("sparsity", "layer sparsity\n(fraction of its\nweights removed)"),
           ("relative_frobenius", "single-layer distortion\n(relative to the layer:\n‖W − W̃‖ / ‖W‖)"),
           ("relative_lookahead", "lookahead distortion\n(relative to removing\nthe whole layer)"))
FONT_PT = 9.0  # never below 8 pt at 100 % zoom (the figure is drawn at the screen's 96 dpi)
_MAX_LABEL = 30


def short_layer_name(name: str, limit: int = _MAX_LABEL) -> str:
    """A layer name that fits a label: ``.weight`` dropped, long paths keep their last parts behind ``…``.

    >>> short_layer_name("features.denseblock3.denselayer12.conv2.weight")
    '…denselayer12.conv2'
    >>> short_layer_name("encoder.layers.encoder_layer_11.self_attention.in_proj_weight")  # see unique_labels
    '…self_attention.in_proj'
    """
    for suffix in (".weight", "_weight"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) <= limit:
        return name
    parts = name.split(".")
    out = parts[-1]
    for p in reversed(parts[:-1]):
        if len(out) + len(p) + 2 > limit:
            break
        out = f"{p}.{out}"
    return "…" + out[-limit:]


def unique_labels(layers, limit: int = _MAX_LABEL) -> list:
    """Short names for ``layers`` that stay distinct: names whose short forms collide (the same part of a block
    repeated in every block, e.g. ``…self_attention.in_proj``) keep more of their path until they differ.

    >>> unique_labels(["enc.block_0.attn.in_proj_weight", "enc.block_1.attn.in_proj_weight"], limit=12)
    ['enc.block_0.attn.in_proj', 'enc.block_1.attn.in_proj']
    """
    labels = [short_layer_name(n, limit) for n in layers]
    for wider in range(limit + 6, 200, 6):
        seen: dict = {}
        for j, label in enumerate(labels):
            seen.setdefault(label, []).append(j)
        clashes = [j for js in seen.values() if len(js) > 1 for j in js]
        if not clashes:
            break
        for j in clashes:
            labels[j] = short_layer_name(layers[j], wider)
    return labels


_INDEX = re.compile(r"^(?:[A-Za-z_]*?_)?(\d+)$")  # a path part that numbers a block: "3", "encoder_layer_11"


def layer_blocks(layers) -> list | None:
    """The repeated block each layer belongs to, or None when the model has no such structure: the path up to the
    first numbered part (``model.layers.3.self_attn.q_proj.weight`` → ``model.layers.3``), when at least two blocks
    hold two or more layers each and every layer of a block is contiguous.

    >>> layer_blocks(["emb.weight", "h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "h.1.attn.c_attn.weight",
    ...               "h.1.mlp.c_fc.weight"])
    ['', 'h.0', 'h.0', 'h.1', 'h.1']
    >>> layer_blocks(["conv1.weight", "fc.weight"]) is None
    True
    """
    blocks = []
    for name in layers:
        parts = name.split(".")
        cut = next((j for j, p in enumerate(parts[:-1]) if _INDEX.match(p)), None)
        blocks.append("" if cut is None else ".".join(parts[:cut + 1]))
    runs = [b for j, b in enumerate(blocks) if b and (j == 0 or blocks[j - 1] != b)]
    sizes = {b: blocks.count(b) for b in set(runs)}
    if len(runs) != len(set(runs)) or sum(1 for v in sizes.values() if v >= 2) < 2:
        return None
    return blocks


def _block_labels(layers, blocks) -> list:
    """Each layer's name inside its block, kept distinct within the block (see :func:`unique_labels`)."""
    labels = [""] * len(layers)
    for b in dict.fromkeys(blocks):
        js = [j for j, x in enumerate(blocks) if x == b]
        for j, label in zip(js, unique_labels([layers[j][len(b) + 1:] if b else layers[j] for j in js])):
            labels[j] = label
    return labels


def _text_width_px(text: str, dpi: int, weight: str = "normal") -> float:
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    with paper_style():
        font = FontProperties(size=FONT_PT, weight=weight)
        return RendererAgg(10, 10, dpi).get_text_width_height_descent(text, font, ismath=False)[0]


def _row_px(n_methods: int) -> float:
    return max(16.0, 5.0 * n_methods + 6.0)


def plot_layers(data: pd.DataFrame, *, width_px: int = 960, dpi: int = 96, title: str | None = None,
                columns=None) -> PlotFigure:
    """The layer panel of ``data``: ``method, layer, n_weights`` and any of ``sparsity, relative_frobenius,
    relative_lookahead`` (NaN = not computed: no bar). ``columns``: which of those to draw (default: the ones
    present). Layers top to bottom in the order given; one colour per method (:func:`method_color`).

    >>> t = pd.DataFrame({"method": ["lamp"] * 2, "layer": ["a.weight", "b.weight"], "n_weights": [10, 4],
    ...                   "sparsity": [0.5, 0.25], "relative_frobenius": [0.1, 0.2]})
    >>> [ax.get_title(loc="left") for ax in plot_layers(t).axes]
    ['layer sparsity\\n(fraction of its\\nweights removed)', 'single-layer distortion\\n(relative to the layer:\\n‖W − W̃‖ / ‖W‖)']
    """
    methods = list(dict.fromkeys(data["method"]))
    layers = list(dict.fromkeys(data["layer"]))
    cols = [(c, t) for c, t in COLUMNS if c in data.columns] if columns is None else \
        [(c, t) for c, t in COLUMNS if c in columns]
    blocks = layer_blocks(layers)
    labels = unique_labels(layers) if blocks is None else _block_labels(layers, blocks)
    block_labels = [] if blocks is None else [
        (j, short_layer_name(b, 24)) for j, b in enumerate(blocks) if b and (j == 0 or blocks[j - 1] != b)]
    row = _row_px(len(methods))
    top_px, bottom_px = 104.0, 34.0  # the heading, the legend below it, then three-line column titles
    height_px = top_px + bottom_px + row * max(len(layers), 1)
    block_px = 12 + max((_text_width_px(b, dpi, "bold") for _, b in block_labels), default=-12)
    label_px = 14 + block_px + _text_width_px(max(labels, key=len, default=""), dpi)
    with paper_style():
        fig = PlotFigure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
        left = min(label_px / width_px, 0.4)
        gap, right = 0.045, 0.012  # room between columns for the edge tick labels ("1.0" beside "0.0")
        w = (1 - left - right - gap * (len(cols) - 1)) / max(len(cols), 1)
        y0, y1 = bottom_px / height_px, 1 - top_px / height_px
        axes = [fig.add_axes((left + i * (w + gap), y0, w, y1 - y0)) for i in range(len(cols))]
        n = len(layers)
        h = 0.8 / max(len(methods), 1)
        collections = {}
        for ax, (col, heading) in zip(axes, cols):
            ax.set_ylim(n - 0.5, -0.5)
            ax.set_xlim(0, 1.0 if col == "sparsity" else 1.05)
            ax.set_title(heading, fontsize=FONT_PT, loc="left")
            ax.tick_params(labelsize=FONT_PT, length=2)
            ax.grid(axis="y", visible=False)
            if ax is axes[0]:
                ax.set_yticks(np.arange(n), labels)
            else:
                ax.set_yticks(np.arange(n), [""] * n)
            for j, _ in block_labels:  # a line above each block, across every column
                ax.axhline(j - 0.5, color="0.55", linewidth=0.6, zorder=0.5)
            for j, m in enumerate(methods):
                c = PolyCollection([], facecolors=[method_color(m)], edgecolors="none", label=method_label(m))
                ax.add_collection(c)
                collections[(col, m)] = c
        for j, b in block_labels:  # the block's name left of its first layer (the layers show their part in it)
            axes[0].text(-(left * width_px - 4) / (w * width_px), j, b, transform=axes[0].get_yaxis_transform(),
                         ha="left", va="center", fontsize=FONT_PT, fontweight="bold", color="0.2")
        fig.legend(handles=[Patch(color=method_color(m), label=method_label(m)) for m in methods],
                   loc="upper left", bbox_to_anchor=(0.0, 1 - 20 / height_px), ncol=min(len(methods), 6),
                   frameon=False, fontsize=FONT_PT, handlelength=1.2, columnspacing=1.2)
        heading = fig.text(0.01, 1 - 6 / height_px, title or "", ha="left", va="top", fontsize=FONT_PT,
                           color="0.25")
    fig.layer_geometry = {"layers": layers, "methods": methods, "columns": [c for c, _ in cols], "axes": axes,
                          "bar_height": h, "heading": heading, "collections": collections}
    update_layers(fig, data, title=title)
    return fig


def _verts(values: np.ndarray, j: int, n_methods: int, h: float) -> np.ndarray:
    y = np.arange(len(values)) + (j - (n_methods - 1) / 2) * h
    v = np.nan_to_num(values.astype(float), nan=0.0)
    out = np.empty((len(values), 4, 2))
    out[:, 0] = np.c_[np.zeros_like(v), y - h * 0.47]
    out[:, 1] = np.c_[v, y - h * 0.47]
    out[:, 2] = np.c_[v, y + h * 0.47]
    out[:, 3] = np.c_[np.zeros_like(v), y + h * 0.47]
    return out


def update_layers(fig, data: pd.DataFrame, *, title: str | None = None, hidden=()) -> bool:
    """New values into the bars of a :func:`plot_layers` figure (same methods and layers; returns False and
    changes nothing otherwise). ``hidden``: methods whose bars are hidden. A column missing from ``data`` or NaN
    shows no bar. Sets ``fig.layout_changed`` when an axis had to widen (a value above its range)."""
    g = getattr(fig, "layer_geometry", None)
    if g is None or list(dict.fromkeys(data["method"])) != g["methods"] or \
            list(dict.fromkeys(data["layer"])) != g["layers"]:
        return False
    fig.layout_changed = False
    n_methods = len(g["methods"])
    for ax, col in zip(g["axes"], g["columns"]):
        top = 0.0
        for j, m in enumerate(g["methods"]):
            part = data[data["method"] == m].set_index("layer").reindex(g["layers"])
            values = part[col].to_numpy(dtype=float) if col in part else np.full(len(g["layers"]), np.nan)
            coll = g["collections"][(col, m)]
            coll.set_verts(_verts(values, j, n_methods, g["bar_height"]))
            coll.set_visible(m not in hidden)
            if np.isfinite(values).any():
                top = max(top, float(np.nanmax(values)))
        if col != "sparsity" and top > ax.get_xlim()[1]:
            ax.set_xlim(0, top * 1.08)
            fig.layout_changed = True
    if title is not None:
        g["heading"].set_text(title)
    fig.plot_data = data.copy()
    return True


def hit_test(fig, x_px: float, y_px: float):
    """``(layer, method, column)`` under the pixel ``(x_px, y_px)`` of the rendered figure (origin top left, in
    the figure's own pixels); ``method`` is None between bars and ``column`` None left of the bars (the labels);
    ``None`` outside every row."""
    g = getattr(fig, "layer_geometry", None)
    if g is None:
        return None
    height = fig.bbox.height
    disp = (x_px, height - y_px)
    for ax, col in zip(g["axes"], g["columns"]):
        box = ax.bbox
        if box.y0 <= disp[1] <= box.y1 and disp[0] <= box.x1:
            _, yv = ax.transData.inverted().transform(disp)
            row = int(np.floor(yv + 0.5))
            if not 0 <= row < len(g["layers"]):
                return None
            column = col if disp[0] >= box.x0 else None
            offset = (yv - row) / g["bar_height"] + (len(g["methods"]) - 1) / 2
            j = int(np.floor(offset + 0.5))
            method = g["methods"][j] if 0 <= j < len(g["methods"]) and column is not None else None
            return g["layers"][row], method, column
    return None
