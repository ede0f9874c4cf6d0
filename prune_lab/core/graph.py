"""Prunable layers and the layer graph (who feeds whom), traced from the model's real data flow.

Why one module of this size: finding the weights, the ``torch.fx`` walk and the execution-order fallback are the
private steps of one function, :func:`build_graph`, sharing its classification of modules and operations (what
passes units through, joins branches or flattens), so splitting them would only turn those private tables into
cross-module reads; how much the neighbours weigh (BatchNorm factors, unit norms, LAP's factors) is in
:mod:`prune_lab.core.neighbours`.

The graph is what lookahead pruning and the lookahead distortion need: for every Linear / Conv layer, the linear
layers that produce its input (its *producers*) and those that read its output (its *consumers*), with the
BatchNorm layers that sit in between and whether a flatten (conv channels → linear features) lies on the path.
It comes from ``torch.fx.symbolic_trace`` (the data flow, not the order of ``modules()``). Residual additions make a
unit feed several consumers and read several producers: every one of them becomes a link.

When a model cannot be traced symbolically, the graph falls back to the order in which layers run on an example
input (or, without one, to registration order) with chain neighbours, and says so in ``graph.notes``.

The graph's layers are every weight the model uses in a matrix product or a convolution, not only the Linear / Conv
modules fx sees called: ``nn.MultiheadAttention``'s projections (fx keeps it, and ``nn.TransformerEncoderLayer``,
whole), RNN / LSTM / GRU matrices, weights passed to ``F.linear`` / ``F.conv*`` (Swin's attention) and parametrized
weights (by their stored original: ``.weight`` of a parametrized module is never evaluated). A weight used where the
graph does not look gets identity neighbours; ``graph.unresolved`` names every layer with a hidden neighbour.
"""
from __future__ import annotations

import fnmatch
import operator
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .capture import eval_mode, input_hooks

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Modules that keep the unit (channel / feature) axis: the walk goes straight through them.
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_F = torch.nn.functional
_PASS_FUNCTIONS = {
    torch.relu, torch.relu_, _F.relu, _F.relu6, _F.leaky_relu, _F.elu, _F.selu, _F.gelu, _F.silu, _F.mish,
    _F.hardswish, _F.hardsigmoid, _F.hardtanh, torch.sigmoid, torch.tanh, _F.sigmoid, _F.tanh, _F.softplus,
    _F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d,
    _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d,
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool1d, _F.adaptive_max_pool2d, _F.adaptive_max_pool3d,
}
# Joins: every tensor operand is a branch (residual additions, squeeze-excitation products).
_JOIN_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.mul,
                   torch.sub}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "type_as", "detach"}
_JOIN_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_SHAPE_METHODS = {"size", "dim", "numel", "get_device"}  # read the shape only: no data flows along such an edge


@dataclass(frozen=True)
class Layer:
    """One Linear / Conv layer. ``name`` is its weight's key in ``named_parameters()``.

    ``weight`` shape: ``(out, in)`` for Linear, ``(out, in // groups, *kernel)`` for Conv.
    """

    name: str
    module: str
    kind: str  # "linear", "conv1d", "conv2d" or "conv3d"
    shape: tuple
    groups: int
    prunable: bool

    @property
    def n_in(self) -> int:
        """Input units: features (Linear) or channels (Conv)."""
        return self.shape[1] * self.groups

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")


@dataclass(frozen=True)
class Link:
    """A path between a layer and one neighbour (producer or consumer).

    ``layer`` is the neighbour's weight name, or ``None`` for the identity (the model's input or output, or an
    operation the graph does not see through). ``near_bn`` are the BatchNorm modules on the path in this layer's
    unit space, ``far_bn`` those in the neighbour's space (after a flatten); ``flatten`` says whether a flatten
    (conv channel c ↔ linear features ``c·HW … (c+1)·HW − 1``) lies on the path.
    """

    layer: str | None
    near_bn: tuple = ()
    far_bn: tuple = ()
    flatten: bool = False


@dataclass
class LayerGraph:
    """Prunable layers in data-flow order, and who feeds whom.

    >>> g = build_graph(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    >>> g.prunable
    ['0.weight', '2.weight']
    >>> [l.layer for l in g.consumers['0.weight']]
    ['2.weight']
    """

    layers: dict  # name -> Layer, every weight used in a matrix product / convolution, data-flow order
    producers: dict  # name -> list[Link]
    consumers: dict  # name -> list[Link]
    exact: bool = True  # False when the data flow could not be traced (chain neighbours instead)
    notes: list = field(default_factory=list)
    # name -> what hides (some of) the layer's neighbours: operations the graph does not see through (concat,
    # LayerNorm, permute, attention, …) or, for a weight used outside the traced graph, where it is used
    unresolved: dict = field(default_factory=dict)
    _warned: bool = field(default=False, repr=False, compare=False)

    @property
    def prunable(self) -> list:
        return [n for n, layer in self.layers.items() if layer.prunable]

    def warn_unresolved(self, what: str = "LAP and the lookahead distortion", *, stacklevel: int = 3) -> None:
        """One ``UserWarning`` (once per graph) naming the prunable layers whose neighbours could not all be found
        and count as the identity. Graph-based measures call it."""
        names = [n for n in self.unresolved if n in self.layers and self.layers[n].prunable]
        if self._warned or not names:
            return
        self._warned = True
        ops = sorted({op for n in names for op in self.unresolved[n]})
        shown = ", ".join(map(repr, names[:8])) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        hidden = "; ".join(ops[:4]) + ("; …" if len(ops) > 4 else "")
        warnings.warn(f"{what}: {len(names)} layer(s) have neighbours the layer graph cannot find, counted as the "
                      f"identity (no lookahead across them): {shown}. The graph does not see through: {hidden}. "
                      f"graph.unresolved lists every layer and why.", UserWarning, stacklevel=stacklevel)

    @property
    def bn_modules(self) -> list:
        names = set()
        for links in list(self.producers.values()) + list(self.consumers.values()):
            for link in links:
                names.update(link.near_bn)
                names.update(link.far_bn)
        return sorted(names)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return "conv3d"


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".weight", 1)[0], p) for p in patterns)


def _canonical_ids(model: nn.Module) -> dict:
    """``{id(parameter): canonical name}``: the first name ``named_parameters()`` gives (tied weights appear once)."""
    canonical: dict = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    return canonical


def _expected_shape(module: nn.Module) -> tuple:
    """The shape of a Linear / Conv module's weight, from its attributes (never by evaluating ``.weight``, which
    runs a parametrization: spectral norm's power iteration changes its buffers in train mode)."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def _stored_parameter(module: nn.Module, attr: str, shape: tuple | None):
    """The Parameter that holds ``module.<attr>``'s values: the attribute itself, or for a parametrized attribute
    (``weight_norm``, ``spectral_norm``, ``register_parametrization``) the one original of the weight's shape
    (``parametrizations.<attr>.original``, or ``original1`` for weight norm's direction ``v``). Returns ``(path
    relative to the module, Parameter)`` or ``None`` (no such Parameter, or no single original of that shape)."""
    if parametrize.is_parametrized(module, attr):
        originals = [(k, p) for k, p in module.parametrizations[attr]._parameters.items()
                     if isinstance(p, nn.Parameter) and (shape is None or tuple(p.shape) == tuple(shape))]
        if len(originals) != 1:
            return None
        return f"parametrizations.{attr}.{originals[0][0]}", originals[0][1]
    p = module._parameters.get(attr)
    return (attr, p) if isinstance(p, nn.Parameter) else None


def stored_weight(module: nn.Module, attr: str = "weight"):
    """The Parameter holding a Linear / Conv (or any) module's ``attr`` without evaluating it: ``module.weight``
    itself, or the original of a parametrized weight (spectral norm's ``.weight`` would run a power iteration that
    changes its buffers in train mode). ``None`` when there is no such Parameter.

    >>> stored_weight(nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))).shape
    torch.Size([2, 3])
    """
    shape = _expected_shape(module) if isinstance(module, PRUNABLE_TYPES) and attr == "weight" else None
    hit = _stored_parameter(module, attr, shape)
    return None if hit is None else hit[1]


@dataclass(frozen=True)
class _Found:
    """A weight used in a matrix product or a convolution, found from the module it belongs to."""

    name: str  # canonical parameter name
    module: str  # the module that uses it (Linear / Conv / MultiheadAttention / RNN)
    kind: str
    shape: tuple
    groups: int
    graph_node: bool  # True: the weight of a Linear/Conv module, a graph node when fx sees the module called


def _matrix_weights(model: nn.Module) -> tuple:
    """``(weight_of, found)``: ``weight_of`` maps every Linear/Conv module name to its weight's canonical name;
    ``found`` lists every weight used in a matrix product or a convolution that a module's type tells about, in
    ``named_modules()`` order: Linear/Conv weights (parametrized ones by their original), ``nn.MultiheadAttention``'s
    ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight``, and the input, hidden and projection
    matrices of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``."""
    canonical = _canonical_ids(model)
    weight_of: dict = {}
    found: list = []

    def add(mname, module, attr, kind, shape, groups, graph_node):
        hit = _stored_parameter(module, attr, shape)
        if hit is None or id(hit[1]) not in canonical:
            return None
        name = canonical[id(hit[1])]
        found.append(_Found(name, mname, kind, tuple(hit[1].shape), groups, graph_node))
        return name

    for mname, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            name = add(mname, module, "weight", _kind(module), _expected_shape(module), getattr(module, "groups", 1),
                       True)
            if name is not None:
                weight_of[mname] = name
        elif isinstance(module, nn.MultiheadAttention):
            attrs = ("in_proj_weight",) if module._qkv_same_embed_dim else \
                ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            for attr in attrs:
                add(mname, module, attr, "linear", None, 1, False)
        elif isinstance(module, nn.RNNBase):
            for attr in module._flat_weights_names:
                if attr.startswith("weight_"):
                    add(mname, module, attr, "linear", None, 1, False)
    return weight_of, found


def _structure_key(model: nn.Module, include, exclude) -> tuple:
    # modules by name and type, parameters by name and shape: never ``.weight`` itself (a parametrization would run)
    return (
        tuple((n, type(m).__name__) for n, m in model.named_modules()),
        tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
        tuple(include) if isinstance(include, (list, tuple)) else include,
        tuple(exclude) if isinstance(exclude, (list, tuple)) else exclude,
    )


def _parametrizations_frozen(model: nn.Module):
    """Every parametrization module in eval mode while the graph is built (each one's own flag restored after):
    should tracing evaluate a parametrized weight, spectral norm's power iteration must not change ``_u``/``_v``."""
    return eval_mode(*[mod.parametrizations for mod in model.modules() if parametrize.is_parametrized(mod)])


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def build_graph(model: nn.Module, *, include=None, exclude=None, example_inputs=None) -> LayerGraph:
    """Trace ``model`` and return its :class:`LayerGraph` (cached per model object and structure).

    ``include`` / ``exclude``: glob patterns on weight names (``"features.*"``) or module names (``"fc"``): only
    matching layers are prunable when ``include`` is given; matching layers are never prunable with ``exclude``.
    Every Linear / Conv layer stays in the graph as a neighbour, prunable or not.

    >>> g = build_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    >>> g.consumers['0.weight'][0].flatten
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    key = _structure_key(model, include, exclude)
    per_model = _CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    weight_of, found = _matrix_weights(model)
    with _parametrizations_frozen(model):
        try:
            graph = _single_layer(found) if isinstance(model, PRUNABLE_TYPES) else _trace_fx(model, weight_of, found)
        except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to an execution-order chain
            graph = _trace_chain(model, found, example_inputs, reason=f"{type(exc).__name__}: {exc}")
    for name, layer in list(graph.layers.items()):
        # a tied weight also answers to its module's name (a tied ``lm_head`` is ``embed_tokens.weight`` here)
        aliases = (name, f"{layer.module}.weight") if layer.module else (name,)
        prunable = (include is None or any(_matches(a, include) for a in aliases)) and \
            not any(_matches(a, exclude) for a in aliases)
        graph.layers[name] = Layer(layer.name, layer.module, layer.kind, layer.shape, layer.groups, prunable)
    conv1d = [n for n, m in model.named_modules()
              if type(m).__name__ == "Conv1D" and type(m).__module__.split(".")[0] == "transformers"]
    if conv1d:
        note = (f"{len(conv1d)} transformers Conv1D layer(s) (GPT-2 family, weight (in, out); e.g. {conv1d[0]!r}) are "
                f"not nn.Linear and are not pruned; convert them first with "
                f"prune_lab.models.conv1d_to_linear(model)")
        graph.notes.append(note)
        warnings.warn(note, stacklevel=2)
    per_model[key] = graph
    return graph


def prunable_parameters(model: nn.Module, *, include=None, exclude=None) -> dict:
    """The prunable weights ``{name: Parameter}`` in data-flow order: every weight used in a matrix product or a
    convolution (Linear / Conv1d/2d/3d weights, ``nn.MultiheadAttention`` projections, RNN / LSTM / GRU matrices,
    parameters passed to ``F.linear`` / ``F.conv*``; parametrized weights by their original of the weight's shape).

    ``include`` / ``exclude`` narrow the set by glob pattern on the names. Tied (shared) weights appear once.

    >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> list(prunable_parameters(m))
    ['0.weight', '2.weight']
    >>> list(prunable_parameters(m, exclude="2.*"))
    ['0.weight']
    """
    graph = build_graph(model, include=include, exclude=exclude)
    params = dict(model.named_parameters())
    return {name: params[name] for name in graph.prunable}


def _single_layer(found: list) -> LayerGraph:
    """The model is one Linear/Conv layer: its neighbours are the model's input and output."""
    if not found:
        return LayerGraph({}, {}, {})
    f = found[0]
    layer = Layer(f.name, "", f.kind, f.shape, f.groups, True)
    return LayerGraph({f.name: layer}, {f.name: [Link(None)]}, {f.name: [Link(None)]})


# --------------------------------------------------------------------------------------------------------------
# torch.fx tracing
# --------------------------------------------------------------------------------------------------------------
_CONV_FUNCTIONS = {_F.conv1d: "conv1d", _F.conv2d: "conv2d", _F.conv3d: "conv3d"}


def _functional_weight(node, by_path: dict):
    """For ``F.linear`` / ``F.conv1d/2d/3d`` called on a parameter: ``(parameter, kind, groups)``, else ``None``."""
    if node.op != "call_function":
        return None
    if node.target is _F.linear:
        kind, dim = "linear", 2
    elif node.target in _CONV_FUNCTIONS:
        kind = _CONV_FUNCTIONS[node.target]
        dim = int(kind[4]) + 2
    else:
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
        return None
    p = by_path.get(w.target)
    if p is None or p.dim() != dim:
        return None
    groups = 1
    if kind != "linear":
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or p.shape[0] % groups:
            groups = 1  # not a literal: the layer keeps identity-sized neighbours
    return p, kind, groups


def _trace_fx(model: nn.Module, weight_of: dict, found: list) -> LayerGraph:
    gm = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    canonical = _canonical_ids(model)
    by_path = dict(model.named_parameters(remove_duplicate=False))
    info: dict = {}
    for f in found:
        info.setdefault(f.name, f)
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    layers: dict = {}
    nodes_of: dict = {}
    layer_of: dict = {}  # graph node -> weight name: Linear/Conv module calls, F.linear / F.conv* on a parameter
    called: dict = {}  # module name -> index of its first call
    attr_use: dict = {}  # weight name -> (index of the first node reading it, that node), for get_attr parameters
    for i, node in enumerate(nodes):
        name = layer = None
        if node.op == "call_module":
            called.setdefault(node.target, i)
            if node.target in weight_of:
                name = weight_of[node.target]
                module = modules[node.target]
                layer = Layer(name, node.target, _kind(module), info[name].shape, getattr(module, "groups", 1), True)
        elif node.op == "get_attr" and node.target in by_path:
            users = sorted(((index[u], u) for u in node.users), key=lambda t: t[0]) if node.users else [(i, node)]
            attr_use.setdefault(canonical.get(id(by_path[node.target])), users[0])
        else:
            hit = _functional_weight(node, by_path)
            if hit is not None and id(hit[0]) in canonical:
                p, kind, groups = hit
                name = canonical[id(p)]
                owner = info[name].module if name in info else name.rpartition(".")[0]
                layer = Layer(name, owner, kind, tuple(p.shape), groups, True)
        if name is not None:
            layers.setdefault(name, layer)
            nodes_of.setdefault(name, []).append(node)
            layer_of[node] = name
    # Weights used where the graph does not look (inside a module fx keeps whole, such as nn.MultiheadAttention
    # or nn.TransformerEncoderLayer, or passed to a function it does not trace into, such as Swin's attention):
    # prunable, with identity neighbours, placed where they are used.
    outside: list = []
    unresolved: dict = {}
    for seq, f in enumerate(found):
        if f.name in layers or any(f.name == o[2].name for o in outside):
            continue
        parts = f.module.split(".") if f.module else []
        ancestors = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
        hits = [(called[a], a) for a in ancestors if a in called]
        where = None
        if hits:
            pos, a = min(hits)
            where = f"it is used inside {type(modules[a]).__name__} {a!r}, which the graph does not trace into"
        if f.name in attr_use and (not hits or attr_use[f.name][0] < pos):
            pos, user = attr_use[f.name]
            where = f"it is used through {_describe(user)}, which the graph does not see as a layer"
        if where is None:
            continue  # never used in forward (a dead module): not part of the model's computation
        outside.append((pos, seq, Layer(f.name, f.module, f.kind, f.shape, f.groups, True)))
        unresolved[f.name] = [where]
    if not layers and not outside:
        return LayerGraph({}, {}, {})
    notes: list = []
    producers = {n: [] for n in layers}
    consumers = {n: [] for n in layers}
    for name, lnodes in nodes_of.items():
        ops: list = []
        for node in lnodes:
            first = node.args[0] if node.args else node.kwargs.get("input")
            producers[name] += _walk(first, modules, layer_of, backward=True, notes=notes, ops=ops)
            consumers[name] += _walk_users(node, modules, layer_of, notes=notes, ops=ops)
        if ops:
            unresolved[name] = sorted(set(ops))
    first_node = {n: index[v[0]] for n, v in nodes_of.items()}
    order = sorted([(first_node[n], 0, n, layers[n]) for n in layers] +
                   [(pos, 1, layer.name, layer) for pos, _, layer in outside], key=lambda t: (t[0], t[1]))
    all_layers = {n: layer for _, _, n, layer in order}
    for _, _, layer in outside:
        producers[layer.name] = [Link(None)]
        consumers[layer.name] = [Link(None)]
        notes.append(f"{layer.name!r} is outside the traced graph ({unresolved[layer.name][0]}): its neighbours "
                     f"count as the identity")
    unresolved = {n: unresolved[n] for n in all_layers if n in unresolved}
    return LayerGraph(all_layers, producers, consumers, True, sorted(set(notes)), unresolved)


def _classify(node, modules) -> str:
    """'layer', 'bn', 'pass', 'join', 'flatten', 'input', 'output' or 'other'."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, _BN_TYPES):
            return "bn"
        if isinstance(m, nn.Flatten):
            return "flatten"
        if isinstance(m, _PASS_MODULES):
            return "pass"
        return "other"
    if node.op == "call_function":
        if node.target is getattr:
            return "ignore"
        if node.target in _PASS_FUNCTIONS:
            return "pass"
        if node.target in _JOIN_FUNCTIONS:
            return "join"
        if node.target in _FLATTEN_FUNCTIONS:
            return "flatten"
        return "other"
    if node.op == "call_method":
        if node.target in _SHAPE_METHODS:
            return "ignore"
        if node.target in _PASS_METHODS:
            return "pass"
        if node.target in _JOIN_METHODS:
            return "join"
        if node.target in _FLATTEN_METHODS:
            return "flatten"
        if node.target == "mean" and len(node.args) > 1:
            return "pass"  # x.mean([2, 3]): global average pooling keeps the channels
        return "other"
    return "other"


def _describe(node) -> str:
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _walk(start, modules, layer_of, *, backward: bool, notes: list, ops: list) -> list:
    """Producers of the tensor ``start``: follow arguments back to the nearest Linear/Conv layers."""
    links: list = []
    seen: set = set()
    stack = [(start, (), (), False)]
    while stack:
        node, near, far, flat = stack.pop()
        if not isinstance(node, torch.fx.Node):
            continue
        if node in seen:
            continue
        seen.add(node)
        kind = "layer" if node in layer_of else _classify(node, modules)
        if kind == "layer":
            links.append(Link(layer_of[node], near, far, flat))
        elif kind == "input":
            links.append(Link(None, near, far, flat))
        elif kind == "bn":
            if flat:
                far = far + (node.target,)
            else:
                near = near + (node.target,)
            stack.append((node.args[0], near, far, flat))
        elif kind in ("pass", "flatten"):
            stack.append((node.args[0], near, far, flat or kind == "flatten"))
        elif kind == "join":
            for arg in reversed(node.args):
                if isinstance(arg, torch.fx.Node):
                    stack.append((arg, near, far, flat))
        else:
            notes.append(f"the graph does not see through {_describe(node)}; it counts as the identity")
            ops.append(_describe(node))
            links.append(Link(None, near, far, flat))
    return links


def _walk_users(start, modules, layer_of, *, notes: list, ops: list) -> list:
    """Consumers of the output of layer node ``start``: follow users forward to the nearest Linear/Conv layers."""
    links: list = []
    seen: set = set()
    stack = [(user, (), (), False, start) for user in reversed(list(start.users))]
    while stack:
        node, near, far, flat, came_from = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = "layer" if node in layer_of else _classify(node, modules)
        if kind == "layer":
            if node.args and node.args[0] is came_from:
                links.append(Link(layer_of[node], near, far, flat))
            else:  # the tensor is a non-input argument of the layer (rare): not a unit-to-unit path
                links.append(Link(None, near, far, flat))
            continue
        if kind == "output":
            links.append(Link(None, near, far, flat))
            continue
        if kind == "ignore":
            continue
        if kind == "bn":
            if flat:
                far = far + (node.target,)
            else:
                near = near + (node.target,)
        elif kind in ("pass", "flatten", "join"):
            flat = flat or kind == "flatten"
            if kind in ("pass", "flatten") and node.args and node.args[0] is not came_from:
                continue  # e.g. the tensor used as a shape argument: no data flows along this edge
        else:
            notes.append(f"the graph does not see through {_describe(node)}; it counts as the identity")
            ops.append(_describe(node))
            links.append(Link(None, near, far, flat))
            continue
        for user in reversed(list(node.users)):
            stack.append((user, near, far, flat, node))
    return links


# --------------------------------------------------------------------------------------------------------------
# Fallback: execution order and chain neighbours
# --------------------------------------------------------------------------------------------------------------
def _trace_chain(model: nn.Module, found: list, example_inputs, *, reason: str) -> LayerGraph:
    modules = dict(model.named_modules())
    ran: dict = {}  # module name -> position in the order modules ran
    how = "the order in which modules are registered"
    if example_inputs is not None:
        watched = {".".join(f.module.split(".")[:k]) for f in found for k in range(1, f.module.count(".") + 2)
                   if f.module}
        try:
            with eval_mode(model), input_hooks([(mname, modules[mname]) for mname in watched],
                                               lambda n, _m, _x: ran.setdefault(n, len(ran))), torch.no_grad():
                model(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
            how = "the order in which layers ran on an example input"
        except Exception:  # noqa: BLE001
            ran = {}
    order: list = []
    for seq, f in enumerate(found):
        if not ran:
            order.append((seq, f))
            continue
        parts = f.module.split(".")
        hits = [ran[p] for p in (".".join(parts[:k]) for k in range(len(parts), 0, -1)) if p in ran]
        if hits:  # the layer's module ran, or (a weight used inside a module) the module holding it
            order.append((hits[0], f))
    order.sort(key=lambda t: t[0])
    layers: dict = {}
    for _, f in order:
        if f.name not in layers:
            layers[f.name] = Layer(f.name, f.module, f.kind, f.shape, f.groups, True)
    names = list(layers)
    producers = {n: [] for n in names}
    consumers = {n: [] for n in names}
    for i, name in enumerate(names):
        prev = names[i - 1] if i > 0 else None
        nxt = names[i + 1] if i + 1 < len(names) else None
        producers[name].append(Link(prev, (), (), _flattened(layers, prev, name)))
        consumers[name].append(Link(nxt, (), (), _flattened(layers, name, nxt)))
    if any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__):
        reason = f"a transformers model; {reason}"
    note = (f"torch.fx could not trace this model ({reason}); layer order is {how} and each layer's neighbours are "
            f"the layers before and after it (no BatchNorm factors, no residual joins): only graph-based scores "
            f"(LAP and its variants, lookahead distortion) are affected")
    warnings.warn(note, stacklevel=3)
    return LayerGraph(layers, producers, consumers, False, [note])


def _flattened(layers, a, b) -> bool:
    if a is None or b is None:
        return False
    la, lb = layers[a], layers[b]
    return la.is_conv and not lb.is_conv and lb.n_in != la.n_out and lb.n_in % la.n_out == 0
