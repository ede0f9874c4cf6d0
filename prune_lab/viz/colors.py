"""One colour and one display name per method and per allocation, the same in every figure.

Methods and allocations share one table, so a figure that compares allocations (``uniform``, ``erk``, ``lamp`` …)
and one that compares methods (``magnitude``, ``lamp``, ``lap`` …) use the same colours, and a name that is both
(``lamp``) has one colour. Every registered method and allocation has its own colour (the table is checked for
distinctness in CIELAB by the tests); display names (``"Magnitude (MP)"``, ``"ERK"``) resolve to their id first.
A method or allocation registered later without an entry takes the next spare colour in registry order; any other
name hashes (CRC-32, the same in every process) into the spare colours.
"""
from __future__ import annotations

import zlib

from matplotlib.colors import to_rgb

#: the fixed colours, by method / allocation id (Okabe–Ito for the most used, then Paul Tol / ColorBrewer tones);
#: smallest CIELAB distance between any two entries: ΔE*76 ≈ 25.
COLORS = {
    # methods, in registry order
    "magnitude": "#0072B2",         # blue
    "global_magnitude": "#E69F00",  # orange
    "lamp": "#009E73",              # bluish green (also the LAMP allocation)
    "lap": "#D55E00",               # vermillion
    "lap_forward": "#E7298A",       # magenta
    "lap_backward": "#882255",      # wine
    "random": "#7F7F7F",            # grey
    "snip": "#CC79A7",              # reddish purple
    "grasp": "#56B4E9",             # sky blue
    "synflow": "#332288",           # indigo
    "woodfisher": "#66A61E",        # leaf green
    "cbs": "#B2182B",               # dark red
    "cbs_select": "#005F73",        # dark teal
    "obs_layerwise": "#5C5C00",     # dark olive
    "wanda": "#000000",             # black
    # allocations (lamp above)
    "uniform": "#BCBD22",           # olive yellow
    "global": "#8C510A",            # brown
    "uniform_plus": "#9467BD",      # purple
    "erk": "#17BECF",               # cyan
    "sensitivity": "#4363D8",       # royal blue
}
#: colours for names without an entry (lighter tones, apart from the table's)
SPARE = ("#FDBF6F", "#B2DF8A", "#CAB2D6", "#FB9A99", "#80B1D3", "#B3B3B3", "#8DD3C7", "#BEBADA", "#D9B382",
         "#A6CEE3")


def _registry():
    """``(method ids, allocation ids, {casefolded display name: id})``."""
    from ..core.allocation import get_allocation, list_allocations
    from ..methods import get_method, list_methods

    methods, allocations = list(list_methods()), list(list_allocations())
    names = {}
    for a in allocations:
        names.setdefault(str(get_allocation(a).label).casefold(), a)
    for m in methods:  # a method's display name wins over an allocation's of the same spelling
        names[str(get_method(m).label).casefold()] = m
    return methods, allocations, names


def resolve(name: str) -> str:
    """The method or allocation id behind ``name`` (an id or a display name, any case); other names unchanged.

    >>> resolve("Magnitude (MP)"), resolve("ERK"), resolve("lamp"), resolve("dense")
    ('magnitude', 'erk', 'lamp', 'dense')
    """
    name = str(name)
    methods, allocations, names = _registry()
    if name in methods or name in allocations:
        return name
    return names.get(name.casefold(), name)


def color(name: str) -> tuple:
    """The colour of a method or an allocation, ``(r, g, b)`` floats in [0, 1], the same in every figure and every
    process. ``name``: a method id (``"global_magnitude"``), an allocation id (``"erk"``) or either's display
    name (``"Global magnitude"``, ``"ERK"``); a name that is both a method and an allocation (``"lamp"``) has one
    colour. Distinct for every registered method and allocation; other names get a spare colour from a stable
    hash.

    >>> color("lamp") == color("LAMP") == (0.0, 0.6196078431372549, 0.45098039215686275)
    True
    >>> color("magnitude") != color("uniform")
    True
    """
    key = resolve(name)
    if key in COLORS:
        return to_rgb(COLORS[key])
    methods, allocations, _ = _registry()
    extra = [n for n in dict.fromkeys(methods + allocations) if n not in COLORS]
    if key in extra:
        return to_rgb(SPARE[extra.index(key) % len(SPARE)])
    return to_rgb(SPARE[zlib.crc32(key.encode()) % len(SPARE)])


def label(name: str) -> str:
    """The display name of a method or allocation id (the registry's label: ``"magnitude"`` → ``"Magnitude
    (MP)"``, ``"uniform_plus"`` → ``"Uniform+"``); a method's label wins for names that are both; display names
    and other names come back as they are.

    >>> label("global_magnitude"), label("erk"), label("dense")
    ('Global magnitude', 'ERK', 'dense')
    """
    from ..core.allocation import get_allocation, list_allocations
    from ..methods import get_method, list_methods

    name = str(name)
    if name in list_methods():
        return get_method(name).label
    if name in list_allocations():
        return get_allocation(name).label
    return name


def kind(names) -> str:
    """``"allocation"`` when every name in ``names`` is an allocation (id or display name) and at least one is not
    also a method, else ``"method"``: the legend title of a figure.

    >>> kind(["uniform", "erk", "lamp"]), kind(["lamp", "lap"])
    ('allocation', 'method')
    """
    methods, allocations, _ = _registry()
    ids = [resolve(n) for n in names]
    if ids and all(i in allocations for i in ids) and any(i not in methods for i in ids):
        return "allocation"
    return "method"
