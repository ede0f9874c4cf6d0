"""PruneLab: the ipywidgets dashboard, a thin view over a traitlets state.

Why one module: it is one class, the dashboard's controller — its worker, its frame and rest phases, overrides and
export share one state. What is pure lives beside it: rendering in ``live.py``, hover texts in ``hover.py``,
hyperparameter controls in ``controls.py``, figures in :mod:`prune_lab.viz`.

How a slider move becomes pixels, on a model of any size:

- Controls are linked to :class:`LabState`. A state change only bumps a generation counter and wakes one worker
  thread (the kernel's message loop never waits on a draw), so during a drag the newest value wins: the worker
  draws the latest state whenever it is free, and no stale position is replayed after mouse-up.
- A *frame* (the fast path): per method a cached-ranking lookup (``session.prune_query`` of
  :meth:`PruneLab.query`), the per-layer sparsity and single-layer distortion that come with it, the summary
  counts, and a blitted redraw of the layer panel (a few ``PolyCollection``\\ s) and of the accuracy panel's
  current-sparsity marker. Every panel, the readout, the status and the marker are set from the same state in the
  same frame.
- Right after the frame, the lookahead distortion (:mod:`prune_lab.core.lookahead`) of the methods whose result
  is there, drawn when complete; a newer move stops it between layers (and inside a large dense product).
- When the slider has rested ``debounce_s`` seconds since its last change, the *rest* phase: methods that are
  expensive per sparsity (sequential LAP, SynFlow, WoodFisher, CBS, layerwise OBS) are computed at the current
  point with their lookahead, then accuracy (perplexity for a causal LM), loss, output distortion and
  BatchNorm-recalibrated accuracy; finally the curves of expensive methods fill in over the grid with a progress
  bar. A newer slider move stops the rest phase between steps; what it finished stays cached.

Every lookup goes through one key (:meth:`PruneLab.query`): the session's :class:`~prune_lab.Query` — method,
sparsity rounded to the slider's precision, allocation, hyperparameters and layer overrides. Hovering a bar or a
point says what it is; clicking a layer selects it for the overrides; the legend's toggles hide or show a method.
``debounce_s=0`` runs everything in line (no thread): tests and scripts use it. Every button calls a public method
that tests call directly.
"""
from __future__ import annotations

import threading
import time
import traceback
import warnings
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
import traitlets
from traitlets import Bool, Dict, Float, HasTraits, Tuple, Unicode

from .. import __version__
from ..core.allocation import get_allocation, list_allocations
from ..data.tokens import as_tokens
from ..methods import get_method, list_methods
from ..viz import layers as layer_plots
from ..viz import plots
from ..viz.sensitivity import plot_sensitivity
from . import hover
from .controls import hp_control
from .live import DPI, LiveFigure, full_png

PAPER_DEFAULT = "(paper default)"
DEFAULT_GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SENSITIVITY_GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)  # each layer pruned alone (magnitude), the rest dense
DIGITS = 4  # sparsity precision of every key (the log slider reaches 0.1 % remaining in steps finer than 0.001)


class LabState(HasTraits):
    """What the dashboard shows. Controls are ``link``-ed to these traits."""

    sparsity = Float(0.9)
    methods = Tuple()
    allocation = Unicode(PAPER_DEFAULT)
    evaluate = Bool(True)
    log_remaining = Bool(False)
    overrides = Dict()  # {layer: sparsity}: locked layers (0.0 = excluded, dense)
    hidden = Tuple()  # methods hidden from the panels (legend toggles)
    selected_layer = Unicode("")
    busy = Bool(False)
    error = Unicode("")
    status = Unicode("")

    @traitlets.validate("sparsity")
    def _valid_sparsity(self, proposal):
        return round(float(min(max(proposal["value"], 0.0), 0.999)), DIGITS)


class PruneLab:
    """The dashboard. ``display(pl.PruneLab(session))`` in a notebook (or ``lab.widget``).

    ``methods``: the methods offered (default: every registered method); those of magnitude, LAMP, LAP that run
    are selected (magnitude, Wanda, LAMP for a causal LM on token data, whose panel shows perplexity instead of
    accuracy); ``selected`` chooses others. ``debounce_s``: seconds the slider must rest, counted from its last
    change, before the rest phase (accuracy, expensive methods; the lookahead starts at once); 0 runs everything
    in line.
    ``width``: the panels' width in pixels (they follow the notebook's width when it is narrower, at the first
    hover). ``input_shape``: one input sample's shape, for
    data-free methods that need one (SynFlow) when the session has no data.
    """

    def __init__(self, session, methods=None, *, selected=None, sparsity: float = 0.9, grid=DEFAULT_GRID,
                 debounce_s: float = 0.1, width: int = 800, panel_height: int = 520, input_shape=None,
                 sensitivity: bool | None = None, sensitivity_grid=SENSITIVITY_GRID):
        self.session = session
        self.grid = tuple(round(float(s), DIGITS) for s in grid)
        self.debounce_s = debounce_s
        self.width = int(width)
        self.panel_height = int(panel_height)
        offered = list(methods) if methods is not None else list_methods()
        for m in offered:
            get_method(m)
        self.offered = offered
        self.hyperparameters: dict = {m: {} for m in offered}
        if input_shape is not None:
            for m in offered:
                if "input_shape" in {f[0] for f in get_method(m).hyperparameter_fields()}:
                    self.hyperparameters[m]["input_shape"] = tuple(input_shape)
        self.unavailable = {m: self._why_unavailable(m) for m in offered}
        runnable = [m for m in offered if not self.unavailable[m]]
        self.has_data = getattr(session, "data", None) is not None
        # a causal LM on token data shows perplexity (log axis) where a classifier shows accuracy
        self.metric = "perplexity" if self.has_data and as_tokens(session.data) is not None else "accuracy"
        first = ("magnitude", "wanda", "lamp") if self.metric == "perplexity" else ("magnitude", "lamp", "lap")
        chosen = tuple(selected) if selected is not None else tuple(
            [m for m in first if m in runnable] or runnable[:3])
        self.state = LabState(sparsity=sparsity, methods=chosen)
        self.measure_sensitivity = self.has_data if sensitivity is None else bool(sensitivity) and self.has_data
        self.sensitivity_grid = tuple(sensitivity_grid)
        self.sensitivity = None  # the DataFrame of the last (partial or complete) sensitivity run
        self._stop = threading.Event()
        self.show_lookahead = bool(getattr(session.graph, "exact", True))
        self.figures: dict = {}
        self.live: dict = {}
        self.summary = pd.DataFrame()
        self.results: dict = {}
        self.pending: list = []
        self.timings: dict = {}
        self.frames: list = []  # (perf_counter, generation, sparsity, kind): what was drawn when
        self._lookahead: dict = {}  # (weights fingerprint, query) → {layer: relative lookahead}
        self._computed: set = set()  # expensive queries already computed
        self._last_valid = None
        self._lock = session.lock  # the session's: notebook cells and the lab's worker take turns
        self._generation = 0
        self._changed_at = 0.0
        self._rest_now = False  # refresh_accuracy asks the worker for a rest phase without waiting for the slider
        self._new_width = None  # fit_width's, taken by the next frame
        self._drawn = self._rested = None  # the generations last drawn by a frame and last rested
        self._requests = self._served = 0  # requests made of the worker, and the last it finished (wait_idle)
        self._requests_lock = threading.Lock()  # _idle is set only while no request is outstanding
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._closed = False
        self._worker = None
        self._build()
        self.state.observe(self._on_change, names=["sparsity", "methods", "allocation", "log_remaining",
                                                   "overrides", "hidden", "evaluate", "selected_layer"])
        self.state.observe(self._show_status, names=["busy", "error", "status"])
        t0 = time.perf_counter()
        self._guard(self.redraw)
        self.timings["first_frame_s"] = time.perf_counter() - t0
        if self.debounce_s == 0:
            self._guard(self.refresh_accuracy)
            self._idle.set()
        else:
            self._worker = threading.Thread(target=self._loop, name="prune-lab", daemon=True)
            self._worker.start()
            self._request()

    # ------------------------------------------------------------------------------------------------------------
    # building the view
    # ------------------------------------------------------------------------------------------------------------
    def _why_unavailable(self, method: str) -> str:
        spec = get_method(method)
        reason = spec.unavailable_reason(getattr(self.session, "data", None))  # no data, or data it refuses
        if reason:
            return reason
        if "graph" in spec.needs and not getattr(self.session.graph, "exact", True):
            return "needs a traced layer graph: torch.fx could not trace this model"
        fields = {f[0] for f in spec.hyperparameter_fields()}
        if "input_shape" in fields and getattr(self.session, "data", None) is None and \
                self.hyperparameters[method].get("input_shape") is None:
            return "needs an input shape: PruneLab(session, input_shape=(3, 224, 224)) or a session with data"
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
                                           indent=False, layout=widgets.Layout(width="240px"))
        widgets.link((self.log_toggle, "value"), (st, "log_remaining"))
        self.log_toggle.observe(self._swap_sliders, names="value")
        self.method_boxes = {}
        for m in self.offered:
            spec = get_method(m)
            why = self.unavailable[m]
            box = widgets.Checkbox(value=m in st.methods, description=spec.label, indent=False,
                                   disabled=bool(why),
                                   tooltip=f"unavailable: {why}" if why else f"{spec.description} — {spec.reference}",
                                   layout=widgets.Layout(width="220px"))
            box.observe(self._on_method_box, names="value")
            self.method_boxes[m] = box
        self.allocation = widgets.Dropdown(options=[PAPER_DEFAULT] + list_allocations(), value=st.allocation,
                                           description="allocation",
                                           tooltip="; ".join(f"{a}: {get_allocation(a).description}"
                                                             for a in list_allocations()))
        widgets.link((self.allocation, "value"), (st, "allocation"))
        self.evaluate_box = widgets.Checkbox(value=st.evaluate, description=f"evaluate {self.metric}", indent=False,
                                             disabled=not self.has_data,
                                             tooltip="" if self.has_data else "needs data: create the session "
                                                                               "with data=...")
        widgets.link((self.evaluate_box, "value"), (st, "evaluate"))
        self.hp_box = widgets.VBox()
        layers = list(self.session.layer_names)
        self.override_layer = widgets.Dropdown(options=layers, description="layer",
                                               layout=widgets.Layout(width="380px"))
        self.override_layer.observe(lambda c: setattr(self.state, "selected_layer", c["new"] or ""), names="value")
        self.override_mode = widgets.ToggleButtons(options=["free", "lock", "exclude"], value="lock",
                                                   tooltips=["back to the allocation", "lock at a sparsity",
                                                             "keep dense"])
        self.override_mode.style.button_width = "80px"
        self.override_value = widgets.BoundedFloatText(value=0.5, min=0.0, max=0.999, step=0.01,
                                                       description="sparsity", layout=widgets.Layout(width="180px"))
        self.override_button = widgets.Button(description="Apply", tooltip="apply this layer override")
        self.override_button.on_click(lambda _: self._guard(lambda: self.set_override(
            self.override_layer.value, self.override_mode.value, self.override_value.value)))
        self.override_list = widgets.HTML()
        self.export_path = widgets.Text(value="figures", description="folder")
        self.export_button = widgets.Button(description="Export", icon="download",
                                            tooltip="PNG (300 dpi), PDF, SVG, CSV and settings JSON, into a new "
                                                    "sub-folder when the folder is not empty")
        self.export_button.on_click(lambda _: self._guard(lambda: self.export(self.export_path.value)))
        self.refresh_button = widgets.Button(description="Evaluate now", icon="refresh",
                                             tooltip="compute everything at the current sparsity now")
        self.refresh_button.on_click(lambda _: self._guard(lambda: self.refresh_accuracy(wait=False)))
        self.busy = widgets.HTML()
        self.status = widgets.HTML()
        self.error = widgets.HTML()
        self.hover = widgets.HTML(layout=widgets.Layout(min_height="22px"))
        self.hover.add_class("prune-lab-hover")
        self.progress = widgets.IntProgress(min=0, max=1, value=0, description="",
                                            layout=widgets.Layout(width="200px", visibility="hidden"))
        self.progress_label = widgets.HTML()
        self.panel_state = {k: widgets.HTML(layout=widgets.Layout(display="none")) for k in ("layers", "accuracy")}
        for w in self.panel_state.values():
            w.add_class("prune-lab-panel-state")
        self.images = {k: widgets.Image(format="png") for k in ("layers", "accuracy", "sensitivity")}
        for k, img in self.images.items():
            img.add_class(f"prune-lab-{k}")
        self.sensitivity_note = widgets.HTML()
        self.no_data = widgets.HTML(
            "<span class='prune-lab-no-data' style='color:#555'>Accuracy vs sparsity: no evaluation data — create "
            "the session with <code>data=...</code> to see it.</span>")
        self.legend = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.summary_html = widgets.HTML()
        self._build_hyperparameters()
        self._build_legend()
        methods_grid = widgets.GridBox(list(self.method_boxes.values()),
                                       layout=widgets.Layout(grid_template_columns="repeat(4, 225px)"))
        controls = widgets.VBox([
            widgets.HBox([self.slider, self.remaining_slider, self.remaining, self.log_toggle]),
            methods_grid,
            widgets.HBox([self.allocation, self.evaluate_box, self.refresh_button, self.export_path,
                          self.export_button]),
            widgets.HBox([widgets.HTML("<b>per-layer overrides</b>"), self.override_layer, self.override_mode,
                          self.override_value, self.override_button]),
            self.override_list,
            self.hp_box,
        ])
        self.layer_box = widgets.Box([self.images["layers"]], layout=widgets.Layout(
            max_height=f"{self.panel_height}px", overflow="hidden auto", width="100%",
            border="1px solid #ddd"))
        accuracy = self.images["accuracy"] if self.has_data else self.no_data
        panels = widgets.VBox([
            self.legend,
            self.hover,
            self.layer_box,
            widgets.HBox([accuracy, self.summary_html], layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([self.progress, self.progress_label]),
        ] + ([self.sensitivity_note, widgets.Box([self.images["sensitivity"]], layout=widgets.Layout(
            max_height=f"{self.panel_height}px", overflow="hidden auto", width="100%"))]
             if self.measure_sensitivity else []) + list(self.panel_state.values()))
        # the busy sign sits on the status line: showing it moves nothing else
        self.widget = widgets.VBox([controls, self.error, widgets.HBox([self.status, self.busy]), panels])
        self.widget.add_class("prune-lab")
        self._connect_pointer()

    def _build_legend(self):
        """One button per selected method, in its colour (grey while hidden): click to hide or show it in every
        panel."""
        buttons = {}
        for m in self.state.methods:
            b = widgets.Button(description=get_method(m).label, tooltip=f"hide or show {get_method(m).label}",
                               layout=widgets.Layout(width="auto"))
            b.style.text_color = "white"
            b.style.font_weight = "bold"
            b.on_click(lambda _, m=m: self._guard(lambda: self.toggle_method(m)))
            buttons[m] = b
        self.legend_buttons = buttons
        self._paint_legend()
        self.legend.children = [widgets.HTML("<span style='color:#555'>methods (click to hide/show):&nbsp;</span>")
                                ] + list(buttons.values())

    def _paint_legend(self):
        for m, b in getattr(self, "legend_buttons", {}).items():
            hidden = m in self.state.hidden
            b.style.button_color = "#bdbdbd" if hidden else _hex(plots.method_color(m))
            b.icon = "eye-slash" if hidden else "eye"

    def _connect_pointer(self):
        """Hover and click on the panels (ipyevents: the pointer's position in the image's own pixels)."""
        try:
            from ipyevents import Event
        except ImportError:  # without ipyevents the panels are plain images
            self._events = []
            return
        self._events = []
        for name in self.images:
            ev = Event(source=self.images[name], watched_events=["mousemove", "click", "mouseleave"],
                       throttle_or_debounce="throttle", wait=50)
            ev.on_dom_event(lambda e, name=name: self._guard(lambda: self.pointer(name, e)))
            self._events.append(ev)
        # the first time the pointer enters the dashboard, the panels take the notebook's width
        ev = Event(source=self.widget, watched_events=["mouseenter"])
        ev.on_dom_event(lambda e: self._guard(lambda: self._fit_to(e.get("boundingRectWidth"))))
        self._events.append(ev)

    def _build_hyperparameters(self):
        rows = []
        for m in self.state.methods:
            fields = get_method(m).hyperparameter_fields()
            for name, default, meta in fields:
                rows.append(hp_control(m, name, self.hyperparameters[m].get(name, default), meta,
                                       on_value=lambda v, m=m, n=name: self._set_hyperparameter(m, n, v),
                                       on_error=lambda msg: setattr(self.state, "error", msg)))
        self.hp_box.children = rows

    def _set_hyperparameter(self, method, name, value):
        """A hyperparameter from its control: checked against the method's declared ones first, so a bad value is
        one message in the status line and the last valid one stays."""
        proposed = {**self.hyperparameters[method], name: value}
        try:
            get_method(method).make_hyperparameters(**proposed)
        except (TypeError, ValueError) as exc:
            self.state.error = f"{get_method(method).label}: {exc}"
            return
        self.hyperparameters[method] = proposed
        self._on_change(None)

    def _repr_mimebundle_(self, **kwargs):  # a notebook shows the dashboard when the lab is a cell's value
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # the one key
    # ------------------------------------------------------------------------------------------------------------
    def _allocation(self):
        return None if self.state.allocation == PAPER_DEFAULT else self.state.allocation

    def query(self, method: str, sparsity: float):
        """The key of every lookup the lab makes: the session's :class:`~prune_lab.Query` for the method at the
        sparsity rounded to the slider's precision, with the lab's allocation, hyperparameters and overrides (a
        slider value of 0.9000000000000001 is 0.9)."""
        return self.session.query(method, round(float(sparsity), DIGITS), allocation=self._allocation(),
                                  overrides=dict(self.state.overrides) or None,
                                  **self.hyperparameters.get(method, {}))

    def _computed_key(self, q):
        """What makes an expensive point computed: the query, at any sparsity for a method whose scores do not
        depend on it."""
        return q if q.spec.sparsity_dependent else q.at(0.0)

    def _result(self, method, sparsity):
        """The engine's result for :meth:`query` ``(method, sparsity)`` (cached by the session)."""
        q = self.query(method, sparsity)
        with self._lock, warnings.catch_warnings():
            # emptied layers and the like are shown in the status line and the summary, not as a warning per
            # slider position
            warnings.simplefilter("ignore", UserWarning)
            result = self.session.prune_query(q)
        self._computed.add(self._computed_key(q))
        return result

    def _expensive(self, method) -> bool:
        spec = get_method(method)
        return spec.sparsity_dependent or "data" in spec.needs

    def _ready(self, method, sparsity) -> bool:
        """Cheap to draw while the slider moves: data-free, sparsity-independent scores (a cached ranking), or a
        point computed before. Everything else waits for the slider to rest."""
        if not self._expensive(method):
            return True
        q = self.query(method, sparsity)
        return self._computed_key(q) in self._computed

    # ------------------------------------------------------------------------------------------------------------
    # controller
    # ------------------------------------------------------------------------------------------------------------
    def _from_remaining(self, change):
        if self.state.log_remaining:
            self.state.sparsity = 1 - change["new"] / 100

    def _to_remaining(self, change):
        want = max(0.1, 100 * (1 - change["new"]))
        if abs(self.remaining_slider.value - want) > 1e-9 * want and not (
                self.state.log_remaining and abs(1 - self.remaining_slider.value / 100 - change["new"]) < 1e-4):
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
            overrides[layer] = 0.0 if mode == "exclude" else round(float(value), DIGITS)
        self.state.overrides = overrides
        self.override_list.value = "; ".join(
            f"{n}: {'excluded (dense)' if v == 0 else f'locked at {v:g}'}" for n, v in overrides.items())

    def select_layer(self, layer: str):
        """Select ``layer`` for the per-layer override controls (what a click on a layer does)."""
        if layer not in self.session.layer_names:
            raise ValueError(f"unknown layer {layer!r}; valid layers: {', '.join(self.session.layer_names)}.")
        self.override_layer.value = layer
        self.state.selected_layer = layer

    def toggle_method(self, method: str, visible: bool | None = None):
        """Hide or show ``method`` in every panel (what a legend toggle does)."""
        hidden = set(self.state.hidden)
        visible = (method in hidden) if visible is None else visible
        (hidden.discard if visible else hidden.add)(method)
        self.state.hidden = tuple(m for m in self.state.methods if m in hidden)
        self._paint_legend()

    def _on_method_box(self, _):
        self.state.methods = tuple(m for m in self.offered if self.method_boxes[m].value)
        self._build_hyperparameters()
        self._build_legend()

    def _on_change(self, _):
        """Every state change: wake the worker (or, with ``debounce_s=0``, draw and rest in line)."""
        self._generation += 1
        self._changed_at = time.perf_counter()
        self._stop.set()  # a running sensitivity measurement stops at its next point
        self._idle.clear()
        if self._worker is None:
            self.state.error = ""
            self._guard(self.redraw)
            if self.debounce_s == 0:
                self._guard(self.refresh_accuracy)
            self._idle.set()
            return
        self._request()

    def _request(self):
        """Ask the worker for a pass: a frame if the state or the width changed, the lookahead, the rest phase."""
        with self._requests_lock:
            self._requests += 1
            self._idle.clear()
        self._wake.set()

    def _loop(self):
        while not self._closed:
            self._wake.wait()
            if self._closed:
                return
            self._wake.clear()
            gen, req = self._generation, self._requests
            if gen != self._drawn or self._new_width is not None:
                self.state.error = ""
                self._guard(self.redraw)
            if gen != self._rested or self._rest_now:  # (a new width alone needs no rest)
                if not self._rest_now and self.show_lookahead and not self._wake.is_set():
                    # the lookahead needs no rest: it starts at once and the next change stops it between slices
                    self._guard(lambda: self._lookahead_phase(gen, eager=True))
                # the slider rests once debounce_s has passed since its last change (the frame's time counts)
                rest_in = 0.0 if self._rest_now else \
                    max(0.0, self._changed_at + self.debounce_s - time.perf_counter())
                if self._wake.wait(rest_in):  # moved again before resting: draw the newest value
                    continue
                self._rest_now = False  # only once the rest starts: an "evaluate now" during the lookahead rests
                self._guard(lambda: self._rest(gen))
            with self._requests_lock:
                self._served = req
                if req == self._requests:
                    self._idle.set()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until the dashboard has drawn everything for the current state (tests, benchmarks, scripts): until
        the worker has finished every request made before this call."""
        if self._worker is None:
            return self._idle.wait(timeout)
        target, deadline = self._requests, time.perf_counter() + timeout
        while self._served < target:
            left = deadline - time.perf_counter()
            if left <= 0 or self._closed:
                return False
            self._idle.wait(min(left, 0.05))
        return True

    def wait_drawn(self, timeout: float = 60.0) -> bool:
        """Block until a frame for the current state is on screen (the fast panels; the rest may still run)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            gen = self._generation
            if any(f[1] >= gen for f in self.frames[-4:]):
                return True
            time.sleep(0.002)
        return False

    def close(self):
        """Stop the worker thread and close the widgets."""
        self._closed = True
        self._stop.set()  # a running rest phase stops at its next step
        self._wake.set()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=10)  # gone before the interpreter may exit
        self.widget.close()

    def _guard(self, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every error is shown in the dashboard, in words
            self.state.error = f"{type(exc).__name__}: {exc}"
            self.state.busy = False
            self._last_traceback = traceback.format_exc()

    def _show_status(self, _=None):
        st = self.state
        self.busy.value = ("<span class='prune-lab-busy' style='color:#b36b00;margin-left:1em'>⏳ working…</span>"
                           if st.busy else "")
        self.error.value = (f"<div class='prune-lab-error' style='color:#b00020;font-weight:bold'>⚠ "
                            f"{hover.escape(st.error)}</div>") if st.error else ""
        self.status.value = f"<span class='prune-lab-status' style='color:#555'>{hover.escape(st.status)}</span>"

    # ------------------------------------------------------------------------------------------------------------
    # the fast path: a frame
    # ------------------------------------------------------------------------------------------------------------
    def _layer_table(self, results: dict, s: float) -> pd.DataFrame:
        parts = []
        fingerprint = self.session.fingerprint  # retrained weights: their own lookahead, not the old one
        for m, r in results.items():
            look = self._lookahead.get((fingerprint, r.query), {})  # the result's own key (a last valid state too)
            parts.append(pd.DataFrame({
                "method": m, "layer": list(r.layers), "n_weights": list(r.numel),
                "sparsity": [p / n for p, n in zip(r.pruned, r.numel)],
                "relative_frobenius": [r.relative_frobenius[n] for n in r.layers],
                "relative_lookahead": [look.get(n, np.nan) for n in r.layers]}))
        return pd.concat(parts, ignore_index=True)

    def redraw(self):
        """Draw a frame for the current state: per-layer sparsity and single-layer distortion of every ready
        method, lookahead where computed, summary counts, and the accuracy marker — all at one sparsity."""
        t0 = time.perf_counter()
        self._take_new_width()
        gen = self._generation
        st = self.state
        s = st.sparsity
        results, errors = {}, {}
        self.pending = [m for m in st.methods if not self._ready(m, s)]
        for m in st.methods:
            if m in self.pending:
                continue
            try:
                results[m] = self._result(m, s)
            except ValueError as exc:  # e.g. an allocation or overrides that cannot reach this sparsity
                errors.setdefault(str(exc).split("\n")[0], []).append(get_method(m).label)
        shown, fallback = s, False
        if errors and not results and self._last_valid is not None:
            (shown, results), fallback = self._last_valid, True  # keep the last valid state, marked as such
        elif results:
            self._last_valid = (s, results)
        self.results = {} if fallback else results
        note = f" (last reachable state, sparsity {shown:.3f})" if fallback else ""
        if results:
            table = self._layer_table(results, shown)
            self._draw_layers(table, self._layers_title(table, shown, note))
            self.panel_state["layers"].value = f"layers: sparsity={shown:.3f}{note}"
        self._draw_marker(shown)
        self._update_summary(evaluate=False)
        self.remaining.value = f"remaining weights: <b>{(1 - s) * 100:.3g} %</b>"
        waiting = f" · computing {', '.join(self.pending)} when the slider rests" if self.pending else ""
        n = len(results)
        emptied = [f"{get_method(m).label} empties {len(r.empty_layers)} layer{'s' if len(r.empty_layers) > 1 else ''}"
                   for m, r in results.items() if getattr(r, "empty_layers", None)]
        self.state.status = (f"sparsity={s:.3f} · {n} method{'s' if n != 1 else ''} · drawn{waiting}"
                             + (f" · showing the last reachable state ({shown:.3f})" if note else "")
                             + (f" · ⚠ {'; '.join(emptied)}" if emptied else ""))
        self.frames.append((time.perf_counter(), gen, s, "frame"))
        self._drawn = gen
        self.timings["redraw_s"] = time.perf_counter() - t0
        if errors:
            raise ValueError(" · ".join(f"{', '.join(ms)}: {msg}" for msg, ms in errors.items()))

    def _layers_title(self, table: pd.DataFrame, shown: float, note: str = "") -> str:
        if not self.show_lookahead:
            return f"sparsity {shown:.3f}{note}"
        look = "at this sparsity" if table["relative_lookahead"].notna().all() else "being computed"
        return f"sparsity {shown:.3f}{note} · lookahead: {look}"

    def _draw_layers(self, table: pd.DataFrame, title: str):
        fig = self.figures.get("layers")
        columns = None if self.show_lookahead else ("sparsity", "relative_frobenius")
        if fig is None or not layer_plots.update_layers(fig, table, title=title, hidden=self.state.hidden):
            fig = layer_plots.plot_layers(table, width_px=self.width, dpi=DPI, title=title, columns=columns)
            layer_plots.update_layers(fig, table, title=title, hidden=self.state.hidden)
            self.figures["layers"] = fig
            g = fig.layer_geometry
            from matplotlib.patches import Rectangle

            g["selection"] = [ax.add_patch(Rectangle((0, -1), 1, 1, transform=ax.get_yaxis_transform(),
                                                     color="#ffe58a", alpha=0.6, zorder=0, visible=False))
                              for ax in g["axes"]]
            self.live["layers"] = LiveFigure(fig, lambda g=g: list(g["collections"].values()) + [g["heading"]]
                                             + g["selection"])
        self._mark_selection(fig)
        self._show("layers", fig)

    def _mark_selection(self, fig):
        g = fig.layer_geometry
        layer = self.state.selected_layer
        row = g["layers"].index(layer) if layer in g["layers"] else None
        for band in g["selection"]:
            band.set_visible(row is not None)
            if row is not None:
                band.set_y(row - 0.5)

    def _draw_marker(self, s: float):
        fig = self.figures.get("accuracy")
        if fig is None or not hasattr(fig, "marker"):
            return
        x = (1 - s) * 100 if self.state.log_remaining else s
        fig.marker.set_xdata([x, x])
        fig.marker.set_label(f"current ({s:.3f})")
        self.panel_state["accuracy"].value = f"{self.metric}: sparsity={s:.3f}"
        self._show("accuracy", fig)

    def _show(self, name, fig):
        live = self.live.get(name)
        png = live.render() if live is not None and live.fig is fig else full_png(fig)
        self.images[name].value = png
        w, h = fig.get_size_inches() * DPI
        self._natural = getattr(self, "_natural", {})
        if self._natural.get(name) != (w, h):  # a new size only: a frame sends the picture, not a new layout
            self.images[name].layout = widgets.Layout(width=f"{int(w)}px", height=f"{int(h)}px", max_width="100%",
                                                      object_fit="contain")
            self._natural[name] = (w, h)

    # ------------------------------------------------------------------------------------------------------------
    # the rest phase
    # ------------------------------------------------------------------------------------------------------------
    def refresh_accuracy(self, wait: bool = True):
        """Everything that waits for the slider to rest, now: expensive methods at the current point, lookahead
        distortion, accuracy (grid and current point), output distortion, and the accuracy curves of expensive
        methods over the grid. With the worker thread the worker does it (one thread draws); ``wait``: return once
        it is done."""
        if self._worker is None or threading.current_thread() is self._worker:
            self._rest(self._generation)
            return
        self._rest_now = True
        self._request()
        if wait:
            self.wait_idle(3600)

    def _stale(self, gen) -> bool:
        return gen != self._generation or self._closed

    def _lookahead_phase(self, gen, eager: bool = False) -> bool:
        """The lookahead distortion of every shown method at the current point, for the results not yet measured
        (``eager``: right after a frame, before the slider rests, for the results that frame drew; then the layer
        panel is drawn again). Returns whether it measured anything; stops when the state changes."""
        s = self.state.sparsity
        self._stop = stop = threading.Event()  # set by the next state change: long steps stop between layers
        t0, done = time.perf_counter(), False
        drawn = dict(self.results)  # the frame's (expensive methods still pending are not among them)
        try:
            for m in self.state.methods:
                if self._stale(gen):
                    return done
                if eager:
                    r = drawn.get(m)
                    if r is None:
                        continue  # an expensive method waits for the rest
                else:
                    try:
                        r = self._result(m, s)
                    except ValueError:
                        continue
                q = (self.session.fingerprint, r.query)
                if q in self._lookahead:
                    continue
                self.state.busy = True
                dist = self.session.distortion(r, output=False, stop=stop)
                if dist.attrs.get("interrupted"):
                    return done  # the slider moved on: a layer at most was computed for nothing
                dist = dist[dist["layer"] != "(model)"]
                self._lookahead[q] = dict(zip(dist["layer"], dist["relative_lookahead"]))
                done = True
        finally:
            if eager:
                self.state.busy = False  # the rest phase shows its own
        if done and not self._stale(gen):
            self.timings["lookahead_s"] = time.perf_counter() - t0
            if eager:  # only the layer panel changed
                table = self._layer_table(drawn, s)
                self._draw_layers(table, self._layers_title(table, s))
        return done

    def _rest(self, gen):
        st = self.state
        s = st.sparsity
        self._stop = threading.Event()  # set by the next state change: long steps stop between layers
        if self._stale(gen):
            return
        self.state.busy = True
        try:
            computed = False
            for m in list(self.pending):
                if self._stale(gen):
                    return
                computed = True
                try:
                    self._result(m, s)
                except ValueError:
                    q = self.query(m, s)
                    self._computed.add(self._computed_key(q))
            if self.show_lookahead:
                computed = self._lookahead_phase(gen) or computed
            if self._stale(gen):
                return
            if computed:
                self._guard(self.redraw)
            if self.has_data and st.evaluate:
                self._evaluate_points(gen, [s] + list(self.grid), cheap_only=True)
                if self._stale(gen):
                    return
                self._draw_curve()
                self._update_summary(evaluate=True)
                self._fill_expensive(gen)
                self._fill_sensitivity(gen)
            else:
                self._draw_curve()
                self._update_summary(evaluate=False)
        finally:
            if not self._stale(gen):
                self.frames.append((time.perf_counter(), gen, s, "rest"))
                self._rested = gen
            self.state.busy = False

    def _evaluate_points(self, gen, points, cheap_only: bool):
        with self._lock:
            self.session.evaluate(None)
        for m in self.state.methods:
            for p in points:
                if self._stale(gen):
                    return
                if cheap_only and self._expensive(m) and p != self.state.sparsity:
                    continue
                try:
                    r = self._result(m, p)
                except ValueError:
                    continue  # an unreachable point (e.g. uniform_plus at extreme sparsity): skipped
                with self._lock:
                    self.session.evaluate(r)

    def _fill_expensive(self, gen):
        """Accuracy curves of the expensive methods over the grid, in the background, with progress."""
        todo = [(m, p) for m in self.state.methods if self._expensive(m) for p in self.grid
                if self._cached_eval(m, p)[1] is None]
        if not todo:
            return
        self.progress.max, self.progress.value = len(todo), 0
        self.progress.layout.visibility = "visible"
        try:
            for i, (m, p) in enumerate(todo):
                if self._stale(gen):
                    return
                self.progress_label.value = f"filling {self.metric} curves: {get_method(m).label} at {p:g} " \
                                            f"({i + 1}/{len(todo)})"
                try:
                    r = self._result(m, p)
                    with self._lock:
                        self.session.evaluate(r)
                except ValueError:
                    pass
                self.progress.value = i + 1
                self._draw_curve()
        finally:
            self.progress.layout.visibility = "hidden"
            self.progress_label.value = ""

    def _fill_sensitivity(self, gen):
        """Layer sensitivity in the background (each layer pruned alone over the grid), drawn as it fills in; a
        slider move stops it between points, the next rest resumes from the session's cache."""
        if not self.measure_sensitivity or self._stale(gen) or (
                self.sensitivity is not None and not self.sensitivity.attrs.get("interrupted", True)):
            return
        stop = self._stop
        rows, n_grid = [], len(self.sensitivity_grid)
        self.progress.max, self.progress.value = len(self.session.layer_names) * n_grid, 0
        self.progress.layout.visibility = "visible"

        def step(row, done, total):
            rows.append(row)
            self.progress.value = done
            self.progress_label.value = f"layer sensitivity: {done}/{total} points"
            if done % n_grid == 0 or done == total:  # a layer is complete: draw what there is
                self._draw_sensitivity(rows)

        try:
            df = self.session.sensitivity("magnitude", self.sensitivity_grid, callback=step, stop=stop,
                                          progress=False)
        finally:
            self.progress.layout.visibility = "hidden"
            self.progress_label.value = ""
        self.sensitivity = df
        self._draw_sensitivity(df)

    def _draw_sensitivity(self, rows):
        from ..analysis import sensitivity_frame

        df = rows if isinstance(rows, pd.DataFrame) else sensitivity_frame(rows)
        done = isinstance(rows, pd.DataFrame) and not rows.attrs.get("interrupted", True)
        fig = plot_sensitivity(df, layout="heatmap", title="Layer sensitivity: each layer pruned alone (magnitude), "
                                                           "the rest dense")
        fig.set_dpi(DPI)
        self.figures["sensitivity"] = fig
        self._show("sensitivity", fig)
        n = df["layer"].nunique() if len(df) else 0
        self.sensitivity_note.value = (
            f"<b>Layer sensitivity</b> ({df['metric'].iloc[0] if len(df) else 'loss'} increase; hover a cell, click a "
            f"layer to select it): {n} of {len(self.session.layer_names)} layers measured"
            + (" · allocation <code>sensitivity</code> now equalises these curves" if done else
               " · filling in when the slider rests"))

    def _cached_eval(self, method, sparsity):
        """The point's result and its cached evaluation, or ``(None, None)`` (never evaluates, never computes an
        expensive method)."""
        if not self._ready(method, sparsity):
            return None, None
        try:
            res = self._result(method, sparsity)
        except ValueError:
            return None, None
        return res, self.session.cached_evaluation(res)

    def _curve_rows(self) -> pd.DataFrame:
        rows = []
        points = sorted(set(self.grid) | {self.state.sparsity})
        for m in self.state.methods:
            for s in points:
                _, ev = self._cached_eval(m, s)
                if ev is not None:
                    rows.append({"method": m, "label": get_method(m).label, "sparsity": s,
                                 **{k: ev[k] for k in self._curve_columns[3:]}})
        return pd.DataFrame(rows, columns=self._curve_columns)

    @property
    def _curve_columns(self) -> list:
        return ["method", "label", "sparsity", "accuracy", "loss"] + (["perplexity"] if self.metric == "perplexity"
                                                                       else [])

    def _dense_value(self):
        """The dense model's accuracy (or perplexity), when evaluated."""
        dense = self.session.cached_evaluation(None)
        return None if dense is None else dense[self.metric]

    def _draw_curve(self):
        if not self.has_data:
            return
        rows = self._curve_rows()
        dense = self._dense_value()
        shown = rows[~rows["method"].isin(self.state.hidden)]
        fig = self.figures.get("accuracy")
        key = (tuple(dict.fromkeys(shown["method"])), self.state.log_remaining, dense is None)
        scale = 100 if self.metric == "accuracy" else 1
        if fig is not None and getattr(fig, "curve_key", None) == key and not self.state.log_remaining:
            # same lines, same axes: new points into them, one full draw without a new layout
            lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
            for m, g in shown.groupby("method", sort=False):
                g = g.sort_values("sparsity")
                lines[get_method(m).label].set_data(g["sparsity"].to_numpy(), scale * g[self.metric].to_numpy())
            if self.metric == "perplexity":  # an open-ended log axis follows the values
                fig.axes[0].relim()
                fig.axes[0].autoscale_view(scalex=False)
            fig.plot_data = rows
            self.live["accuracy"].invalidate()
            self._draw_marker(self.state.sparsity)
            return
        fig = plots.plot_accuracy_curve(shown, dense=dense, metric=self.metric,
                                        log_remaining=self.state.log_remaining, figsize=(5.6, 3.5))
        fig.plot_data = rows
        ax = fig.axes[0]
        x = (1 - self.state.sparsity) * 100 if self.state.log_remaining else self.state.sparsity
        fig.marker = ax.axvline(x, color="0.2", linestyle="--", linewidth=1)
        fig.curve_key = key
        fig.set_dpi(DPI)
        self.figures["accuracy"] = fig
        self.live["accuracy"] = LiveFigure(fig, lambda fig=fig: [fig.marker])
        self._draw_marker(self.state.sparsity)

    def _update_summary(self, evaluate: bool = True):
        """The summary table; ``evaluate=False`` (while dragging) shows only cached accuracies and no output
        distortion (both come when the slider rests)."""
        rows = []
        for m, r in self.results.items():
            ev = self.session.cached_evaluation(r) if self.has_data else None  # the frame's result: no second lookup
            ranking = self.session.ranking(m, **self.hyperparameters.get(m, {})) if not self._expensive(m) else None
            row = {"method": m, "label": get_method(m).label, "allocation": r.allocation,
                   "sparsity": round(r.sparsity, DIGITS + 1), "remaining weights": int(r.n_kept),
                   "remaining %": round(100 * r.density, 3)}
            if self.has_data and self.metric == "perplexity":
                row["perplexity"] = np.nan if ev is None else round(ev["perplexity"], 3)
                row["next-token accuracy %"] = np.nan if ev is None else round(100 * ev["accuracy"], 2)
                row["loss"] = np.nan if ev is None else round(ev["loss"], 4)
            elif self.has_data:
                row["accuracy %"] = np.nan if ev is None else round(100 * ev["accuracy"], 2)
                row["loss"] = np.nan if ev is None else round(ev["loss"], 4)
            row["critical sparsity"] = np.nan if ranking is None else round(ranking.critical_count() / ranking.total,
                                                                            4)
            row["empty layers"] = len(r.empty_layers)
            if self.has_data and self.state.evaluate and evaluate:
                with self._lock:
                    row["output distortion"] = round(self.session.output_distortion(r)["output_distortion"], 4)
                    if self.session.has_batchnorm:  # pruning shifts BN statistics: show both accuracies
                        ev_bn = self.session.evaluate(r, recalibrate_bn=True)
                        row["accuracy % (BN recalibrated)"] = round(100 * ev_bn["accuracy"], 2)
            rows.append(row)
        self.summary = pd.DataFrame(rows)
        if rows:
            view = self.summary.drop(columns=["method"]).rename(columns={"label": "method"})
            self.summary_html.value = view.to_html(
                index=False, na_rep="…", classes="prune-lab-summary", border=0,
                formatters={"remaining weights": "{:,}".format})
        else:
            self.summary_html.value = ""

    # ------------------------------------------------------------------------------------------------------------
    # pointer: hover and click
    # ------------------------------------------------------------------------------------------------------------
    def pointer(self, panel: str, event: dict):
        """Handle a pointer event on ``panel`` (``"layers"`` or ``"accuracy"``): ``event`` has ``type``
        (``mousemove``, ``click``, ``mouseleave``) and ``dataX``/``dataY``, the position in the image's own pixels
        (ipyevents' fields). Hover fills the line above the panels; a click on a layer selects it."""
        if event.get("type") == "mouseleave":
            self.hover.value = ""
            return
        if panel == "layers" and self._fit_to(event.get("boundingRectWidth")):
            return
        fig = self.figures.get(panel)
        x, y = event.get("dataX"), event.get("dataY")
        if fig is None or x is None or y is None:
            return
        if panel == "layers":
            hit = layer_plots.hit_test(fig, float(x), float(y))
            if hit is None:
                self.hover.value = ""
                return
            layer, method, column = hit
            if event.get("type") == "click":
                self.select_layer(layer)
            self.hover.value = hover.describe_layer(fig.plot_data, layer, method)
        elif panel == "sensitivity":
            cell = hover.sensitivity_cell(fig, float(x), float(y))
            if cell is None:
                self.hover.value = ""
                return
            if event.get("type") == "click":
                self.select_layer(cell["layer"])
            self.hover.value = hover.describe_cell(cell)
        else:
            self.hover.value = hover.describe_point(fig, float(x), float(y), hidden=self.state.hidden,
                                                    log_remaining=self.state.log_remaining, metric=self.metric)

    def _fit_to(self, shown) -> bool:
        """Re-lay the layer panel out when the notebook shows it narrower than drawn (text would shrink)."""
        natural = getattr(self, "_natural", {}).get("layers")
        if natural and shown and natural[0] - 8 > shown >= 480:
            self.fit_width(int(shown) - 4)
            return True
        return False

    def fit_width(self, width: int):
        """Lay the panels out again at ``width`` pixels (what happens when the notebook is narrower): with the
        next frame, drawn by the worker thread when there is one."""
        self._new_width = int(width)
        if self._worker is None or threading.current_thread() is self._worker:
            self.redraw()
            return
        self._request()

    def _take_new_width(self):
        width, self._new_width = self._new_width, None
        if width is not None:
            self.width = width
            self.figures.pop("layers", None)
            self.live.pop("layers", None)

    # ------------------------------------------------------------------------------------------------------------
    def export(self, path="figures", *, overwrite: bool = False, current_line: bool = False,
               progress: bool = True) -> list:
        """Write every panel as PNG (300 dpi), PDF and SVG with its data as CSV, the summary as CSV and the
        settings as JSON. ``path`` is a folder; when it holds files already, a new numbered sub-folder is made
        (``overwrite=True`` writes into ``path`` itself). Without data there is no accuracy panel to export.
        Returns the written paths; the status line names the absolute folder."""
        from tqdm.auto import tqdm

        folder = Path(path).expanduser().resolve()
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            i = 1
            while (folder / f"export-{i:03d}").exists():
                i += 1
            folder = folder / f"export-{i:03d}"
        if self._worker is None:
            self.redraw()
        self.refresh_accuracy()  # the rest phase for the current state (with a frame first), by the drawing thread
        if "layers" not in self.figures or not self.results:
            raise ValueError("nothing to export: no method is selected or none reaches this sparsity; tick a method "
                             "(or move the slider) first.")
        figures = {"layers": layer_plots.plot_layers(self.figures["layers"].plot_data, width_px=1100, dpi=100,
                                                     title=f"Per layer at sparsity {self.state.sparsity:.3g}",
                                                     columns=None if self.show_lookahead else
                                                     ("sparsity", "relative_frobenius"))}
        if self.has_data and "accuracy" in self.figures:
            figures["accuracy"] = plots.plot_accuracy_curve(
                self.figures["accuracy"].plot_data, dense=self._dense_value(), metric=self.metric,
                log_remaining=self.state.log_remaining,
                current=self.state.sparsity if current_line else None)
        written = []
        steps = tqdm(list(figures.items()) + [("tables", None)], desc="export", disable=not progress)
        for name, fig in steps:
            if fig is not None:
                written += plots.save_figure(fig, folder / name)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            self.summary.to_csv(folder / "summary.csv", index=False)
            written.append(folder / "summary.csv")
            written.append(plots.save_settings(self.settings(), folder / "settings.json"))
        self.export_folder = folder
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


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgb[:3])
