"""Prunable layers and the layer graph (who feeds whom), traced from the model's real data flow.

The graph is what lookahead pruning and the lookahead distortion need: for every Linear / Conv layer, the linear
layers that produce its input (its *producers*) and those that read its output (its *consumers*), with the
BatchNorm layers that sit in between and whether a flatten (conv channels → linear features) lies on the path.
It comes from ``torch.fx.symbolic_trace`` (the data flow, not the order of ``modules()``). Residual additions make a
unit feed several consumers and read several producers: every one of them becomes a link.

When a model cannot be traced symbolically, the graph falls back to the order in which layers run on an example
input (or, without one, to registration order) with chain neighbours, and says so in ``graph.notes``.
"""
from __future__ import annotations

import fnmatch
import operator
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

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

    layers: dict  # name -> Layer, every Linear/Conv weight in data-flow order (prunable or not)
    producers: dict  # name -> list[Link]
    consumers: dict  # name -> list[Link]
    exact: bool = True  # False when the data flow could not be traced (chain neighbours instead)
    notes: list = field(default_factory=list)

    @property
    def prunable(self) -> list:
        return [n for n, layer in self.layers.items() if layer.prunable]

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


def _weight_names(model: nn.Module) -> dict:
    """module name -> canonical weight name (tied weights map to the first name that ``named_parameters`` gives)."""
    canonical = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            out[mname] = canonical.get(id(module.weight))
    return {m: n for m, n in out.items() if n is not None}


def _structure_key(model: nn.Module, include, exclude) -> tuple:
    return (
        tuple((n, type(m).__name__, tuple(getattr(m, "weight").shape))
              for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)),
        tuple(include) if isinstance(include, (list, tuple)) else include,
        tuple(exclude) if isinstance(exclude, (list, tuple)) else exclude,
    )


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
    weight_of = _weight_names(model)
    try:
        graph = _single_layer(model) if isinstance(model, PRUNABLE_TYPES) else _trace_fx(model, weight_of)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to an execution-order chain
        graph = _trace_chain(model, weight_of, example_inputs, reason=f"{type(exc).__name__}: {exc}")
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
    """The prunable weights ``{name: Parameter}`` in data-flow order: every Linear and Conv1d/2d/3d ``weight``.

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


def _single_layer(model: nn.Module) -> LayerGraph:
    """The model is one Linear/Conv layer: its neighbours are the model's input and output."""
    layer = Layer("weight", "", _kind(model), tuple(model.weight.shape), getattr(model, "groups", 1), True)
    return LayerGraph({"weight": layer}, {"weight": [Link(None)]}, {"weight": [Link(None)]})


# --------------------------------------------------------------------------------------------------------------
# torch.fx tracing
# --------------------------------------------------------------------------------------------------------------
def _trace_fx(model: nn.Module, weight_of: dict) -> LayerGraph:
    gm = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    layers: dict = {}
    nodes_of: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in weight_of:
            name = weight_of[node.target]
            module = modules[node.target]
            if name not in layers:
                layers[name] = Layer(name, node.target, _kind(module), tuple(module.weight.shape),
                                     getattr(module, "groups", 1), True)
            nodes_of.setdefault(name, []).append(node)
    if not layers:
        return LayerGraph({}, {}, {})
    notes: list = []
    producers = {n: [] for n in layers}
    consumers = {n: [] for n in layers}
    for name, nodes in nodes_of.items():
        for node in nodes:
            producers[name] += _walk(node.args[0], modules, weight_of, backward=True, notes=notes)
            consumers[name] += _walk_users(node, modules, weight_of, notes=notes)
    # Layers that are never called in forward (dead modules) have no links: treat as isolated.
    return LayerGraph(layers, producers, consumers, True, sorted(set(notes)))


def _classify(node, modules) -> str:
    """'layer', 'bn', 'pass', 'join', 'flatten', 'input', 'output' or 'other'."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, PRUNABLE_TYPES):
            return "layer"
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


def _walk(start, modules, weight_of, *, backward: bool, notes: list) -> list:
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
        kind = _classify(node, modules)
        if kind == "layer" and node.target in weight_of:
            links.append(Link(weight_of[node.target], near, far, flat))
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
            links.append(Link(None, near, far, flat))
    return links


def _walk_users(start, modules, weight_of, *, notes: list) -> list:
    """Consumers of the output of layer node ``start``: follow users forward to the nearest Linear/Conv layers."""
    links: list = []
    seen: set = set()
    stack = [(user, (), (), False, start) for user in reversed(list(start.users))]
    while stack:
        node, near, far, flat, came_from = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = _classify(node, modules)
        if kind == "layer" and node.target in weight_of:
            if node.args and node.args[0] is came_from:
                links.append(Link(weight_of[node.target], near, far, flat))
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
            links.append(Link(None, near, far, flat))
            continue
        for user in reversed(list(node.users)):
            stack.append((user, near, far, flat, node))
    return links


# --------------------------------------------------------------------------------------------------------------
# Fallback: execution order and chain neighbours
# --------------------------------------------------------------------------------------------------------------
def _trace_chain(model: nn.Module, weight_of: dict, example_inputs, *, reason: str) -> LayerGraph:
    modules = dict(model.named_modules())
    order: list = []
    how = "the order in which modules are registered"
    if example_inputs is not None:
        handles = []
        try:
            for mname in weight_of:
                handles.append(modules[mname].register_forward_pre_hook(
                    lambda mod, args, _n=mname: order.append(_n) if _n not in order else None))
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
                    model(*inputs)
            finally:
                model.train(was_training)
            how = "the order in which layers ran on an example input"
        except Exception:  # noqa: BLE001
            order = []
        finally:
            for h in handles:
                h.remove()
    if not order:
        order = list(weight_of)
    layers: dict = {}
    for mname in order:
        name = weight_of[mname]
        if name not in layers:
            m = modules[mname]
            layers[name] = Layer(name, mname, _kind(m), tuple(m.weight.shape), getattr(m, "groups", 1), True)
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


# --------------------------------------------------------------------------------------------------------------
# Neighbour factors (lookahead): pure functions of weights and BN scales
# --------------------------------------------------------------------------------------------------------------
def bn_scales(model: nn.Module, names: Iterable[str]) -> dict:
    """``{bn module name: |γ / sqrt(running_var + eps)|}`` (a 1-D tensor per BatchNorm), detached copies.

    >>> bn = nn.BatchNorm1d(2); m = nn.Sequential(nn.Linear(2, 2), bn, nn.Linear(2, 2))
    >>> bn_scales(m, ["1"])["1"]
    tensor([1.0000, 1.0000])
    """
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        bn = modules[name]
        with torch.no_grad():
            scale = torch.ones(bn.num_features, dtype=torch.float32, device=_device_of(bn))
            if bn.affine and bn.weight is not None:
                scale = scale * bn.weight.detach().float()
            if bn.running_var is not None:
                scale = scale / torch.sqrt(bn.running_var.detach().float() + bn.eps)
            out[name] = scale.abs()
    return out


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _apply_scales(values: torch.Tensor, bns: Sequence[str], scales: dict) -> torch.Tensor:
    for bn in bns:
        s = scales.get(bn)
        if s is not None and s.numel() == values.numel():
            values = values * s.to(values.device, values.dtype).pow(2)
    return values


def out_unit_sq_norms(w: torch.Tensor) -> torch.Tensor:
    """``‖W[j]‖²`` for every output unit j (a whole filter for a conv). ``w: (out, …) → (out,)``."""
    return w.detach().float().pow(2).reshape(w.shape[0], -1).sum(1)


def in_unit_sq_norms(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``‖W[:, k]‖²`` for every input unit k (all weights reading channel k, grouped convs included).

    ``w: (out, in // groups, …) → (in,)``.
    """
    w2 = w.detach().float().pow(2)
    per = w2.reshape(w.shape[0], w.shape[1], -1).sum(2)  # (out, in/g)
    if groups == 1:
        return per.sum(0)
    out_per_group = w.shape[0] // groups
    per = per.reshape(groups, out_per_group, w.shape[1]).sum(1)  # (g, in/g)
    return per.reshape(-1)


def input_channel_index(shape: tuple, groups: int, device=None) -> torch.Tensor:
    """For a weight ``(out, in // groups, …)``, the input unit each ``(o, k)`` entry reads: ``(out, in // groups)``."""
    out, in_g = shape[0], shape[1]
    o = torch.arange(out, device=device).unsqueeze(1)
    k = torch.arange(in_g, device=device).unsqueeze(0)
    return (o // (out // groups)) * in_g + k


def neighbour_factors(graph: LayerGraph, weights: dict, name: str, scales: dict | None = None):
    """LAP's neighbour factors of layer ``name``: ``(prev, next)`` with ``prev: (n_in,)``, ``next: (n_out,)``.

    ``prev[k] = sqrt(Σ_producers (scale_k · ‖W_{i−1}[k, :]‖)²)`` and ``next[j] = sqrt(Σ_consumers (scale_j ·
    ‖W_{i+1}[:, j]‖)²)``; a missing neighbour (model input / output) contributes 1. ``weights`` maps names to the
    (possibly masked) weights of every layer in the graph; ``scales`` are :func:`bn_scales`.
    """
    scales = scales or {}
    layer = graph.layers[name]
    w = weights[name]
    dev = w.device
    prev = torch.zeros(layer.n_in, device=dev)
    for link in graph.producers.get(name, []):
        prev += _producer_sq(link, layer, graph, weights, scales, dev)
    if not graph.producers.get(name):
        prev += 1.0
    nxt = torch.zeros(layer.n_out, device=dev)
    for link in graph.consumers.get(name, []):
        nxt += _consumer_sq(link, layer, graph, weights, scales, dev)
    if not graph.consumers.get(name):
        nxt += 1.0
    return prev.sqrt(), nxt.sqrt()


def _producer_sq(link, layer, graph, weights, scales, dev) -> torch.Tensor:
    d_in = layer.n_in
    if link.layer is None:
        return _apply_scales(torch.ones(d_in, device=dev), link.near_bn, scales)
    norms = out_unit_sq_norms(weights[link.layer]).to(dev)  # producer's channel space (C,)
    norms = _apply_scales(norms, link.far_bn, scales)
    c = norms.numel()
    if c != d_in:
        if d_in % c == 0:  # conv channels -> linear features after a flatten: f // HW is the channel
            norms = norms.repeat_interleave(d_in // c)
        else:
            return _apply_scales(torch.ones(d_in, device=dev), link.near_bn, scales)
    return _apply_scales(norms, link.near_bn, scales)


def _consumer_sq(link, layer, graph, weights, scales, dev) -> torch.Tensor:
    d_out = layer.n_out
    if link.layer is None:
        return _apply_scales(torch.ones(d_out, device=dev), link.near_bn, scales)
    consumer = graph.layers[link.layer]
    norms = in_unit_sq_norms(weights[link.layer], consumer.groups).to(dev)  # consumer's input space
    norms = _apply_scales(norms, link.far_bn, scales)
    n = norms.numel()
    if n != d_out:
        if n % d_out == 0:  # channel j is read as the features j·HW … (j+1)·HW − 1
            norms = norms.reshape(d_out, n // d_out).sum(1)
        else:
            return _apply_scales(torch.ones(d_out, device=dev), link.near_bn, scales)
    return _apply_scales(norms, link.near_bn, scales)
