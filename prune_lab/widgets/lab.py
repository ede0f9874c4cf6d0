"""PruneLab: the ipywidgets dashboard, a thin view over a traitlets state.

Controls are linked to :class:`LabState`; one controller turns state changes into engine calls. Panels that
depend only on cached rankings (layer sparsity, distortion, summary) redraw at once while the slider moves;
accuracy evaluation runs after the drag settles (debounced), with a busy indicator. Errors show in the dashboard.
Every button calls a public method (``export``, ``refresh_accuracy``) that tests call directly.
"""
from __future__ import annotations

import io
import threading
import time
import traceback
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
import traitlets
from traitlets import Bool, Dict, Float, HasTraits, Tuple, Unicode

from .. import __version__
from ..core.allocation import get_allocation, list_allocations
from ..methods import get_method, list_methods
from ..viz import plots

PAPER_DEFAULT = "(paper default)"
DEFAULT_GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


class LabState(HasTraits):
    """What the dashboard shows. Controls are ``link``-ed to these traits."""

    sparsity = Float(0.9)
    methods = Tuple()
    allocation = Unicode(PAPER_DEFAULT)
    evaluate = Bool(True)
    log_remaining = Bool(False)
    overrides = Dict()  # {layer: sparsity}: locked layers (0.0 = excluded, dense)
    busy = Bool(False)
    error = Unicode("")
    status = Unicode("")

    @traitlets.validate("sparsity")
    def _valid_sparsity(self, proposal):
        return float(min(max(proposal["value"], 0.0), 0.999))


def _png(fig, dpi=80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class LiveRenderer:
    """Renders a bar figure again and again while only its bars change (blitting).

    The first render draws everything except the bars and keeps each axes' background; later renders restore the
    backgrounds and draw the bars alone, then encode the PNG fast. About ten times cheaper than a full draw; a full
    draw happens again when the figure is new or an axis had to change.
    """

    def __init__(self, dpi: int = 80):
        self.dpi = dpi
        self.fig = None
        self.backgrounds = None

    def render(self, fig) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        bars = [p for ax in fig.axes for c in ax.containers for p in c.patches]
        if fig is not self.fig or getattr(fig, "layout_changed", False) or self.backgrounds is None:
            canvas = FigureCanvasAgg(fig)
            fig.set_dpi(self.dpi)
            for p in bars:
                p.set_animated(True)
            canvas.draw()  # lays the figure out once and draws all but the bars
            fig.set_layout_engine("none")  # keep that layout: later renders only move bars
            self.backgrounds = [canvas.copy_from_bbox(ax.bbox) for ax in fig.axes]
            self.fig = fig
            fig.layout_changed = False
        canvas = fig.canvas
        for ax, bg in zip(fig.axes, self.backgrounds):
            canvas.restore_region(bg)
            for c in ax.containers:
                for p in c.patches:
                    ax.draw_artist(p)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buf, format="png", compress_level=1)
        return buf.getvalue()


class PruneLab:
    """The dashboard. ``display(pl.PruneLab(session))`` in a notebook (or ``lab.widget``).

    ``methods``: the methods offered (default: every registered method the session can run); the first three are
    selected. ``debounce_s``: seconds the slider must rest before accuracy is evaluated (0: at once, in-line).
    """

    def __init__(self, session, methods=None, *, selected=None, sparsity: float = 0.9, grid=DEFAULT_GRID,
                 debounce_s: float = 0.4):
        self.session = session
        self.grid = tuple(grid)
        self.debounce_s = debounce_s
        offered = list(methods) if methods is not None else list_methods()
        for m in offered:
            get_method(m)
        self.offered = offered
        self.unavailable = {m: self._why_unavailable(m) for m in offered}
        runnable = [m for m in offered if not self.unavailable[m]]
        chosen = tuple(selected) if selected is not None else tuple(
            [m for m in ("magnitude", "lamp", "lap") if m in runnable] or runnable[:3])
        self.state = LabState(sparsity=sparsity, methods=chosen)
        self.hyperparameters: dict = {m: {} for m in offered}
        self.figures: dict = {}
        self.summary = pd.DataFrame()
        self.results: dict = {}
        self.timings: dict = {}
        self._lock = getattr(session, "_lock", threading.RLock())  # one lock per session, shared with cells
        self._timer = None
        self._live = {"sparsity": LiveRenderer(), "distortion": LiveRenderer()}
        self._build()
        self._computed: set = set()  # expensive points already computed (drawn while dragging only once cached)
        self.state.observe(self._on_fast_change, names=["sparsity", "methods", "allocation", "log_remaining",
                                                        "overrides"])
        self.state.observe(self._on_evaluate_toggle, names=["evaluate"])
        self.state.observe(self._show_status, names=["busy", "error", "status"])
        self.redraw()
        self.refresh_accuracy() if self.debounce_s == 0 else self._schedule()

    # ------------------------------------------------------------------------------------------------------------
    # building the view
    # ------------------------------------------------------------------------------------------------------------
    def _why_unavailable(self, method: str) -> str:
        spec = get_method(method)
        if "data" in spec.needs and self.session.data is None:
            return "needs data: create the session with data=..."
        return ""

    def _build(self):
        st = self.state
        self.slider = widgets.FloatSlider(value=st.sparsity, min=0.0, max=0.999, step=0.001, description="sparsity",
                                          readout_format=".3f", continuous_update=True,
                                          layout=widgets.Layout(width="420px"))
        widgets.link((self.slider, "value"), (st, "sparsity"))
        self.remaining = widgets.HTML()
        # For extreme sparsity: the same knob as remaining weights (%) on a log scale, 0.1 % … 100 %.
        self.remaining_slider = widgets.FloatLogSlider(
            value=max(0.1, 100 * (1 - st.sparsity)), base=10, min=-1, max=2, step=0.01,
            description="remaining %", readout_format=".3g", continuous_update=True,
            layout=widgets.Layout(width="420px", display="none"))
        # Synced by hand, not linked: only the visible slider drives the state, so a hidden slider's snapping to
        # its own grid can never move the sparsity.
        self.remaining_slider.observe(self._from_remaining, names="value")
        st.observe(self._to_remaining, names="sparsity")
        self.log_toggle = widgets.Checkbox(value=st.log_remaining, description="log scale (remaining weights)",
                                           indent=False)
        widgets.link((self.log_toggle, "value"), (st, "log_remaining"))
        self.log_toggle.observe(self._swap_sliders, names="value")
        self.method_boxes = {}
        for m in self.offered:
            spec = get_method(m)
            why = self.unavailable[m]
            box = widgets.Checkbox(value=m in st.methods, description=spec.label, indent=False,
                                   disabled=bool(why), tooltip=why or f"{spec.description} — {spec.reference}",
                                   layout=widgets.Layout(width="220px"))
            box.observe(self._on_method_box, names="value")
            self.method_boxes[m] = box
        self.allocation = widgets.Dropdown(options=[PAPER_DEFAULT] + list_allocations(), value=st.allocation,
                                           description="allocation",
                                           tooltip="; ".join(f"{a}: {get_allocation(a).description}"
                                                             for a in list_allocations()))
        widgets.link((self.allocation, "value"), (st, "allocation"))
        self.evaluate_box = widgets.Checkbox(value=st.evaluate, description="evaluate accuracy", indent=False)
        widgets.link((self.evaluate_box, "value"), (st, "evaluate"))
        self.hp_box = widgets.VBox()
        layers = list(self.session.layer_names)
        self.override_layer = widgets.Dropdown(options=layers, description="layer",
                                               layout=widgets.Layout(width="300px"))
        self.override_mode = widgets.ToggleButtons(options=["free", "lock", "exclude"], value="lock",
                                                   tooltips=["back to the allocation", "lock at a sparsity",
                                                             "keep dense"])
        self.override_mode.style.button_width = "70px"
        self.override_value = widgets.BoundedFloatText(value=0.5, min=0.0, max=0.999, step=0.01,
                                                       description="sparsity", layout=widgets.Layout(width="180px"))
        self.override_button = widgets.Button(description="Apply", tooltip="apply this layer override")
        self.override_button.on_click(lambda _: self._guard(lambda: self.set_override(
            self.override_layer.value, self.override_mode.value, self.override_value.value)))
        self.override_list = widgets.HTML()
        self.export_path = widgets.Text(value="figures", description="folder")
        self.export_button = widgets.Button(description="Export", icon="download",
                                            tooltip="PNG (300 dpi), PDF, SVG, CSV and settings JSON")
        self.export_button.on_click(lambda _: self._guard(lambda: self.export(self.export_path.value)))
        self.refresh_button = widgets.Button(description="Evaluate now", icon="refresh",
                                             tooltip="evaluate accuracy at the current sparsity and the grid")
        self.refresh_button.on_click(lambda _: self._guard(self.refresh_accuracy))
        self.busy = widgets.HTML()
        self.status = widgets.HTML()
        self.error = widgets.HTML()
        self.images = {k: widgets.Image(format="png") for k in ("sparsity", "distortion", "accuracy")}
        self.summary_html = widgets.HTML()
        self._build_hyperparameters()
        methods_grid = widgets.GridBox(list(self.method_boxes.values()),
                                       layout=widgets.Layout(grid_template_columns="repeat(4, 225px)"))
        controls = widgets.VBox([
            widgets.HBox([self.slider, self.remaining_slider, self.remaining, self.log_toggle]),
            methods_grid,
            widgets.HBox([self.allocation, self.evaluate_box, self.refresh_button, self.export_path,
                          self.export_button, self.busy]),
            widgets.HBox([widgets.HTML("<b>per-layer overrides</b>"), self.override_layer, self.override_mode,
                          self.override_value, self.override_button]),
            self.override_list,
            self.hp_box,
        ])
        panels = widgets.VBox([
            widgets.HBox([self.images["sparsity"], self.images["accuracy"]]),
            self.images["distortion"],
            self.summary_html,
        ])
        self.widget = widgets.VBox([controls, self.error, self.status, panels])
        self.widget.add_class("prune-lab")

    def _build_hyperparameters(self):
        rows = []
        for m in self.state.methods:
            fields = get_method(m).hyperparameter_fields()
            for name, default, meta in fields:
                rows.append(self._hp_control(m, name, self.hyperparameters[m].get(name, default), meta))
        self.hp_box.children = rows

    def _hp_control(self, method, name, value, meta):
        desc = f"{method}.{name}"
        if value is None or isinstance(value, (tuple, list)):  # e.g. an input shape: typed as a Python literal
            w = widgets.Text(value="" if value is None else repr(tuple(value)), description=desc,
                             placeholder="e.g. (1, 28, 28)")
            w.tooltip = meta.get("help", "")
            w.layout = widgets.Layout(width="320px")
            w.style = {"description_width": "150px"}

            def typed(change, m=method, n=name):
                import ast

                text = change["new"].strip()
                try:
                    self.hyperparameters[m][n] = ast.literal_eval(text) if text else None
                except (ValueError, SyntaxError):
                    self.state.error = f"{m}.{n}: {text!r} is not a Python literal such as (1, 28, 28)"
                    return
                self._on_fast_change(None)

            w.observe(typed, names="value")
            return w
        if meta.get("choices"):
            w = widgets.Dropdown(options=list(meta["choices"]), value=value, description=desc)
        elif isinstance(value, bool):
            w = widgets.Checkbox(value=value, description=desc)
        elif isinstance(value, int):
            w = widgets.BoundedIntText(value=value, min=meta.get("low") or 0, max=meta.get("high") or 10**9,
                                       description=desc)
        else:
            w = widgets.BoundedFloatText(value=value, min=meta.get("low") or 0.0, max=meta.get("high") or 1e9,
                                         description=desc)
        w.tooltip = meta.get("help", "")
        w.layout = widgets.Layout(width="320px")
        w.style = {"description_width": "150px"}

        def changed(change, m=method, n=name):
            self.hyperparameters[m][n] = change["new"]
            self._on_fast_change(None)

        w.observe(changed, names="value")
        return w

    def _repr_mimebundle_(self, **kwargs):  # a notebook shows the dashboard when the lab is a cell's value
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # controller
    # ------------------------------------------------------------------------------------------------------------
    def _from_remaining(self, change):
        if self.state.log_remaining:
            self.state.sparsity = 1 - change["new"] / 100

    def _to_remaining(self, change):
        want = max(0.1, 100 * (1 - change["new"]))
        if abs(self.remaining_slider.value - want) > 1e-9 * want and not (
                self.state.log_remaining and abs(1 - self.remaining_slider.value / 100 - change["new"]) < 1e-12):
            self.remaining_slider.value = want

    def _swap_sliders(self, change):
        """The log toggle swaps the sparsity slider for the remaining-weights (%) slider on a log scale."""
        self.slider.layout.display = "none" if change["new"] else None
        self.remaining_slider.layout.display = None if change["new"] else "none"

    def set_override(self, layer: str, mode: str, value: float = 0.0):
        """Lock ``layer`` at sparsity ``value`` (``mode="lock"``), keep it dense (``"exclude"``) or give it back to
        the allocation (``"free"``)."""
        if layer not in self.session.layer_names:
            raise ValueError(f"unknown layer {layer!r}; valid layers: {', '.join(self.session.layer_names)}.")
        if mode not in ("free", "lock", "exclude"):
            raise ValueError(f"mode must be 'free', 'lock' or 'exclude', got {mode!r}.")
        overrides = dict(self.state.overrides)
        overrides.pop(layer, None)
        if mode != "free":
            overrides[layer] = 0.0 if mode == "exclude" else float(value)
        self.state.overrides = overrides
        self.override_list.value = "; ".join(
            f"{n}: {'excluded (dense)' if v == 0 else f'locked at {v:g}'}" for n, v in overrides.items())

    def _on_method_box(self, _):
        self.state.methods = tuple(m for m in self.offered if self.method_boxes[m].value)
        self._build_hyperparameters()

    def _on_fast_change(self, _):
        self.state.error = ""
        self._guard(self.redraw)
        self._schedule()

    def _on_evaluate_toggle(self, _):
        self._schedule()

    def _schedule(self):
        if self._timer is not None:
            self._timer.cancel()
        if self.debounce_s == 0:
            self._guard(self.refresh_accuracy)
            return
        self._timer = threading.Timer(self.debounce_s, lambda: self._guard(self.refresh_accuracy))
        self._timer.daemon = True
        self._timer.start()

    def _guard(self, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every error is shown in the dashboard, in words
            self.state.error = f"{type(exc).__name__}: {exc}"
            self.state.busy = False
            self._last_traceback = traceback.format_exc()

    def _show_status(self, _=None):
        st = self.state
        self.busy.value = "<span style='color:#b36b00'>⏳ evaluating…</span>" if st.busy else ""
        self.error.value = (f"<div class='prune-lab-error' style='color:#b00020;font-weight:bold'>⚠ "
                            f"{_escape(st.error)}</div>") if st.error else ""
        self.status.value = f"<span class='prune-lab-status' style='color:#555'>{_escape(st.status)}</span>"

    def _allocation(self):
        return None if self.state.allocation == PAPER_DEFAULT else self.state.allocation

    def _prune(self, method, sparsity):
        with self._lock:
            result = self.session.prune(method, sparsity, allocation=self._allocation(),
                                        overrides=dict(self.state.overrides) or None,
                                        **self.hyperparameters.get(method, {}))
        self._computed.add(self._point(method, sparsity))
        return result

    def _point(self, method, sparsity):
        """What an expensive result depends on: sparsity-dependent methods per sparsity, others once."""
        spec = get_method(method)
        return (method, self.state.allocation, repr(sorted(self.hyperparameters.get(method, {}).items())),
                repr(sorted(self.state.overrides.items())),
                round(sparsity, 6) if spec.sparsity_dependent else None)

    def _ready(self, method, sparsity) -> bool:
        """Cheap to draw while the slider moves: data-free, sparsity-independent scores (a cached ranking), or a
        point computed before. Everything else waits for the slider to rest."""
        spec = get_method(method)
        cheap = not spec.sparsity_dependent and "data" not in spec.needs
        return cheap or self._point(method, sparsity) in self._computed

    def redraw(self):
        """Recompute the sparsity-dependent panels (layer sparsity, distortion, summary) for the current state."""
        t0 = time.perf_counter()
        st = self.state
        s = st.sparsity
        self.remaining.value = f"remaining weights: <b>{(1 - s) * 100:.3g} %</b>"
        results, errors = {}, []
        self.pending = [m for m in st.methods if not self._ready(m, s)]
        for m in st.methods:
            if m in self.pending:
                continue
            try:
                results[m] = self._prune(m, s)
            except ValueError as exc:  # e.g. an allocation that cannot reach this sparsity: say so, draw the rest
                errors.append(f"{m}: {exc}")
        self.results = results
        if results:
            table = pd.concat([_layer_rows(m, r) for m, r in results.items()], ignore_index=True)
            with self._lock:
                dist = pd.concat([self.session.distortion(r, output=False).assign(method=m)
                                  for m, r in results.items()], ignore_index=True)
            for name, data, make in (("sparsity", table, lambda: plots.plot_layer_sparsity(table)),
                                     ("distortion", dist, lambda: plots.plot_distortion(dist))):
                fig = self.figures.get(name)
                if fig is None or not plots.update_bars(fig, data):
                    fig = self.figures[name] = make()
                self._show(name, fig, live=True)
        self._update_summary(evaluate=False)
        waiting = f" · computing {', '.join(self.pending)} when the slider rests" if self.pending else ""
        self.state.status = (f"sparsity={s:.3f} · {len(results)} method{'s' if len(results) != 1 else ''} · "
                             f"drawn{waiting}")
        if errors:
            raise ValueError("; ".join(errors))
        self.timings["redraw_s"] = time.perf_counter() - t0

    def refresh_accuracy(self):
        """Compute the expensive methods at the current point (then redraw the panels), evaluate accuracy (cached)
        for the selected methods at the grid and the current sparsity, and redraw the curve and the summary. Runs
        after the slider settles, with the busy indicator on."""
        if getattr(self, "pending", None):
            self.state.busy = True
            try:
                for m in self.pending:
                    try:
                        self._prune(m, self.state.sparsity)
                    except ValueError:
                        self._computed.add(self._point(m, self.state.sparsity))  # redraw reports the error
            finally:
                self.state.busy = False
            self.redraw()
        if not self.state.evaluate or self.session.data is None:
            self._draw_curve()
            self._update_summary()
            return
        self.state.busy = True
        try:
            points = sorted(set(self.grid) | {round(self.state.sparsity, 6)})
            with self._lock:
                self.session.evaluate(None)
                for m in self.state.methods:
                    # expensive methods: the current point only (a grid of CBS runs is a sweep, not a refresh)
                    expensive = get_method(m).sparsity_dependent or "data" in get_method(m).needs
                    for s in ([round(self.state.sparsity, 6)] if expensive else points):
                        try:
                            self.session.evaluate(self.session.prune(m, s, allocation=self._allocation(),
                                                                     **self.hyperparameters.get(m, {})))
                        except ValueError:
                            continue  # an unreachable point (e.g. uniform_plus at extreme sparsity): skipped
        finally:
            self.state.busy = False
        self._draw_curve()
        self._update_summary()

    def _evaluated(self, method, sparsity):
        """The point's result and its cached evaluation, or None (never evaluates, never computes an expensive
        method)."""
        if not self._ready(method, sparsity):
            return None, None
        try:
            res = self._prune(method, sparsity)
        except ValueError:
            return None, None
        return res, self.session.cached_evaluation(res)

    def _curve_rows(self):
        rows = []
        points = sorted(set(self.grid) | {round(self.state.sparsity, 6)})
        for m in self.state.methods:
            for s in points:
                _, ev = self._evaluated(m, s)
                if ev is not None:
                    rows.append({"method": m, "sparsity": s, "accuracy": ev["accuracy"], "loss": ev["loss"]})
        return pd.DataFrame(rows, columns=["method", "sparsity", "accuracy", "loss"])

    def _draw_curve(self):
        rows = self._curve_rows()
        dense = self.session.cached_evaluation(None)
        self.figures["accuracy"] = plots.plot_accuracy_curve(
            rows, current=self.state.sparsity, dense=None if dense is None else dense["accuracy"],
            log_remaining=self.state.log_remaining)
        self._show("accuracy", self.figures["accuracy"])

    def _show(self, name, fig, live=False, dpi=80):
        """Render ``fig`` into panel ``name`` at its natural size (never stretched by the layout)."""
        self.images[name].value = self._live[name].render(fig) if live else _png(fig, dpi=dpi)
        w, h = fig.get_size_inches() * dpi
        self.images[name].layout = widgets.Layout(width=f"{int(w)}px", height=f"{int(h)}px", object_fit="contain")

    def _update_summary(self, evaluate: bool = True):
        """The summary table; ``evaluate=False`` (while dragging) shows only cached accuracies and no output
        distortion (both come after the slider settles)."""
        rows = []
        for m, r in self.results.items():
            _, ev = self._evaluated(m, self.state.sparsity)
            ranking = self.session.ranking(m, **self.hyperparameters.get(m, {}))
            row = {"method": m, "allocation": r.allocation, "remaining weights": f"{r.n_kept:,}",
                   "remaining %": round(100 * r.density, 3),
                   "accuracy %": None if ev is None else round(100 * ev["accuracy"], 2),
                   "loss": None if ev is None else round(ev["loss"], 4),
                   "critical sparsity": round(ranking.critical_count() / ranking.total, 4),
                   "empty layers": sum(1 for p, n in zip(r.pruned, r.numel) if p == n)}
            if self.session.data is not None and self.state.evaluate and evaluate:
                with self._lock:
                    row["output distortion"] = round(self.session.output_distortion(r)["output_distortion"], 4)
                    if self.session.has_batchnorm:  # pruning shifts BN statistics: show both accuracies
                        ev_bn = self.session.evaluate(r, recalibrate_bn=True)
                        row["accuracy % (BN recalibrated)"] = round(100 * ev_bn["accuracy"], 2)
            rows.append(row)
        self.summary = pd.DataFrame(rows)
        self.summary_html.value = self.summary.to_html(index=False, na_rep="…", classes="prune-lab-summary",
                                                       border=0) if rows else ""

    # ------------------------------------------------------------------------------------------------------------
    def export(self, path) -> list:
        """Write every panel as PNG (300 dpi), PDF and SVG with its data as CSV, the summary as CSV and the
        settings as JSON into folder ``path``. Returns the written paths."""
        folder = Path(path)
        self.redraw()
        self.refresh_accuracy()
        written = []
        for name, fig in self.figures.items():  # fresh figures, laid out for print (the live ones are frozen)
            if name == "sparsity":
                fig = plots.plot_layer_sparsity(fig.plot_data, title=f"Layerwise sparsity at {self.state.sparsity:.3g}")
            elif name == "distortion":
                fig = plots.plot_distortion(fig.plot_data)
            written += plots.save_figure(fig, folder / name)
        self.summary.to_csv(folder / "summary.csv", index=False)
        written.append(folder / "summary.csv")
        written.append(plots.save_settings(self.settings(), folder / "settings.json"))
        self.state.status = f"exported {len(written)} files to {folder}"
        return written

    def settings(self) -> dict:
        st = self.state
        return {"model_fingerprint": self.session.fingerprint, "model": type(self.session.model).__name__,
                "methods": list(st.methods), "allocation": st.allocation, "sparsity": st.sparsity,
                "overrides": dict(st.overrides),
                "hyperparameters": {m: self.hyperparameters[m] for m in st.methods}, "seeds": [0],
                "prune_lab_version": __version__,
                "achieved_sparsity": {m: r.sparsity for m, r in self.results.items()}}


def _layer_rows(method, r) -> pd.DataFrame:
    return pd.DataFrame({"method": method, "layer": list(r.layers), "n_weights": list(r.numel),
                         "sparsity": [p / n for p, n in zip(r.pruned, r.numel)]})


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
