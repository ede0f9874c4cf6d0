"""Rendering a dashboard panel: a figure drawn again and again while only a few artists change (blitting)."""
from __future__ import annotations

import io

import numpy as np

DPI = 96  # figures are drawn at the screen's resolution: a point of text is a point on screen


class LiveFigure:
    """A figure drawn again and again while only its animated artists change (blitting).

    The first render lays the figure out and draws everything but ``animated()``; the background is kept, and later
    renders restore it, draw the animated artists and encode the PNG. A full draw happens again after
    :meth:`invalidate` (an axis changed) or when the figure says its layout changed (``fig.layout_changed``).
    """

    def __init__(self, fig, animated):
        self.fig, self.animated, self.background = fig, animated, None

    def invalidate(self):
        self.background = None

    def render(self) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        fig = self.fig
        artists = self.animated()
        if self.background is None or getattr(fig, "layout_changed", False):
            canvas = FigureCanvasAgg(fig)
            for a in artists:
                a.set_animated(True)
            canvas.draw()
            fig.set_layout_engine("none")  # keep this layout: later renders only redraw the animated artists
            self.background = canvas.copy_from_bbox(fig.bbox)
            fig.layout_changed = False
        canvas = fig.canvas
        canvas.restore_region(self.background)
        for a in artists:
            if a.get_visible():
                (a.axes.draw_artist if a.axes is not None else fig.draw_artist)(a)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buf, format="png", compress_level=1)
        return buf.getvalue()


def full_png(fig, dpi=DPI) -> bytes:
    """The whole figure as PNG bytes at ``dpi``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
