"""Hyperparameter controls generated from a method's declared fields (range, choices, help text)."""
from __future__ import annotations

import ast

import ipywidgets as widgets


def hp_control(method: str, name: str, value, meta: dict, on_value, on_error):
    """A control for hyperparameter ``name`` of ``method``: a dropdown for choices, a tick box for booleans,
    bounded number boxes for numbers, and a text box typed as a Python literal for shapes (``None`` or tuples).
    ``on_value(value)`` gets each valid new value; ``on_error(message)`` a text that is not a literal."""
    desc = f"{method}.{name}"
    if value is None or isinstance(value, (tuple, list)):  # e.g. an input shape
        w = widgets.Text(value="" if value is None else repr(tuple(value)), description=desc,
                         placeholder="e.g. (1, 28, 28)")

        def typed(change):
            text = change["new"].strip()
            try:
                parsed = ast.literal_eval(text) if text else None
            except (ValueError, SyntaxError):
                on_error(f"{desc}: {text!r} is not a Python literal such as (1, 28, 28)")
                return
            on_value(parsed)

        w.observe(typed, names="value")
    else:
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
        w.observe(lambda change: on_value(change["new"]), names="value")
    w.tooltip = meta.get("help", "")
    w.layout = widgets.Layout(width="320px")
    w.style = {"description_width": "150px"}
    return w
