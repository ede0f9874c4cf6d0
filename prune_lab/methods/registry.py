"""The registry of pruning methods: one record per method, read by the engine, the lab's controls, the CLI and the
contract tests. No ``if method == ...`` chains anywhere else."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.device import masks_key
from ..core.graph import LayerGraph
from ..core.validation import check_choice, check_int
from ..data import as_tokens


@dataclass
class ScoreContext:
    """What a method's score function may use.

    ``weights``: every Linear/Conv weight of the graph (neighbours included), detached, on ``device``, already
    multiplied by the starting masks when there are any; ``prunable``: the names to score, in data-flow order;
    ``bn_scales``: ``{bn module: |γ/√(var+ε)|}``; ``model`` and ``data`` for data-driven methods (never modified);
    ``fingerprint``: a content hash of the weights; ``cache``: a dict owned by the session for expensive
    intermediate results (a Fisher matrix, captured activations), emptied when the weights change — key entries by
    everything they depend on besides the weights (hyperparameters, data identity, ``start_key``);
    ``start_key``: the content key of ``start_masks`` (``""`` without them; the query's ``start``, or computed from
    the masks when a context is built without it).
    """

    weights: dict
    prunable: list
    graph: LayerGraph
    bn_scales: dict
    seed: int = 0
    model: torch.nn.Module | None = None
    data: object = None
    device: torch.device = torch.device("cpu")
    start_masks: dict | None = None
    fingerprint: str = ""
    cache: dict = field(default_factory=dict)
    allocation: str | None = None  # the allocation in force (sparsity-dependent methods may prune globally)
    info: dict = field(default_factory=dict)  # what a masks function reports about its masks (-> result.info)
    start_key: str = ""

    def __post_init__(self):
        if self.start_masks is not None and not self.start_key:
            self.start_key = masks_key(self.start_masks)  # the engine's key (it passes that one in)


def hparam(default, *, low=None, high=None, choices=None, log=False, help=""):
    """A hyperparameter field: its default, range or choices and help text (the lab builds its controls from them)."""
    return field(default=default, metadata={"low": low, "high": high, "choices": choices, "log": log, "help": help})


@dataclass(frozen=True)
class NoHyperparameters:
    """This method has no hyperparameters."""


@dataclass(frozen=True)
class MethodSpec:
    """One pruning method.

    ``scores(ctx, hp) -> {name: Tensor}`` gives per-weight scores (higher = keep). Sparsity-dependent methods also
    give ``masks(ctx, counts, hp) -> {name: BoolTensor}`` or ``(masks, weights)`` when they also update the kept
    weights (OBS, CBS-U): the engine passes the per-layer pruned counts of the allocation (computed on ``scores``
    for global-type allocations). A method whose scores rank each layer's weights
    exactly as another method does may say so with ``order_of`` (that method's name) and give
    ``sorted_values(ctx, hp, order) -> {name: (n,) non-decreasing}``: the engine then reuses the other ranking's
    sort instead of sorting again.
    """

    name: str
    label: str
    reference: str
    scores: Callable
    default_allocation: str
    needs: frozenset = frozenset()  # subset of {"data", "gradients", "hessian", "graph"}
    sparsity_dependent: bool = False
    stochastic: bool = False  # the scores depend on the seed
    hyperparameters: type = NoHyperparameters
    masks: Callable | None = None
    order_of: str | None = None
    sorted_values: Callable | None = None
    description: str = ""
    keeps_every_layer: bool = False  # every layer's best weight has the top score (LAMP): never emptied globally
    unsupported: tuple = ()  # ((data kind, reason), ...): kinds of data (see data_kind) it refuses, and why

    def unavailable_reason(self, data=None) -> str:
        """Why this method cannot run on ``data`` (a session's data; ``None`` = no data), or ``""`` when it can:
        a method that needs data has none, or the kind of data (:func:`data_kind`) is one it refuses (its
        ``unsupported`` record, e.g. SynFlow on token data). The lab shows it as the disabled method's tooltip;
        running the method anyway raises a ``ValueError`` with the same reason.

        >>> get_method("magnitude").unavailable_reason(None)
        ''
        """
        kind = data_kind(data)
        if kind == "none" and "data" in self.needs:
            return "needs data: create the session with data=..."
        return dict(self.unsupported).get(kind, "")

    def make_hyperparameters(self, **hp):
        """Validate keyword hyperparameters against the method's declared ones; returns the dataclass instance."""
        fields = {f.name: f for f in dataclasses.fields(self.hyperparameters)}
        unknown = [k for k in hp if k not in fields]
        if unknown:
            valid = ", ".join(fields) if fields else "none"
            raise TypeError(f"method {self.name!r} got unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
                            f"its hyperparameters are: {valid}.")
        hp = dict(hp)
        for k, v in hp.items():
            meta = fields[k].metadata
            hp[k] = v = self._check_number(k, v, fields[k].default, meta)
            if meta.get("choices") is not None and v not in meta["choices"]:
                raise ValueError(f"hyperparameter {k!r} of method {self.name!r} must be one of {meta['choices']}, "
                                 f"got {v!r}.")
            low, high = meta.get("low"), meta.get("high")
            if (low is not None and v < low) or (high is not None and v > high):
                raise ValueError(f"hyperparameter {k!r} of method {self.name!r} must be in [{low}, {high}], got {v!r}.")
        return self.hyperparameters(**hp)

    def _check_number(self, name, value, default, meta):
        """A hyperparameter declared with a numeric range must be a number (an int where the default is an int):
        ``TypeError`` naming it, the method and the range otherwise (strings would fail later, in comparisons)."""
        low, high = meta.get("low"), meta.get("high")
        if low is None and high is None:
            return value
        span = f"[{low}, {high}]"
        if isinstance(default, numbers.Integral) and not isinstance(default, bool):
            try:
                return check_int(value, what=f"hyperparameter {name!r} of method {self.name!r}")
            except TypeError:
                raise TypeError(f"hyperparameter {name!r} of method {self.name!r} must be an int in {span}, got "
                                f"{value!r} of type {type(value).__name__}.") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"hyperparameter {name!r} of method {self.name!r} must be a number in {span}, got "
                            f"{value!r} of type {type(value).__name__}.")
        if math.isnan(float(value)):
            raise ValueError(f"hyperparameter {name!r} of method {self.name!r} must be in {span}, got {value!r}.")
        return float(value) if isinstance(default, float) else value

    def hyperparameter_fields(self) -> list:
        """``[(name, default, metadata)]`` of the declared hyperparameters."""
        return [(f.name, f.default, dict(f.metadata)) for f in dataclasses.fields(self.hyperparameters)]


DATA_KINDS = ("none", "tokens", "samples")


def data_kind(data) -> str:
    """The kind of a session's data, as method records name it: ``"none"`` (no data), ``"tokens"`` (token ids for a
    causal LM: :func:`prune_lab.data.tokens` or a bundle of them) or ``"samples"`` (inputs and labels: anything
    else).

    >>> data_kind(None), data_kind((torch.zeros(2, 3), torch.tensor([0, 1])))
    ('none', 'samples')
    """
    if data is None:
        return "none"
    if as_tokens(data, split="train") is not None or as_tokens(data, split="test") is not None:
        return "tokens"
    return "samples"


_METHODS: dict = {}
_UPDATERS: dict = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry. Registering a name twice is an error."""
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered.")
    bad = [k for k, _ in spec.unsupported if k not in DATA_KINDS]
    if bad:
        raise ValueError(f"method {spec.name!r}: unsupported data kinds must be among {DATA_KINDS}, got {bad}.")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The record of method ``name``; ``ValueError`` naming the valid choices otherwise."""
    return _METHODS[check_choice(name, _METHODS, what="method")]


def register_updater(name: str, fn: Callable, needs: frozenset = frozenset({"data"})):
    """Register a weight update applied after any selection: ``fn(ctx, masks) -> {name: updated weights}`` (e.g.
    the CBS-U / OBS update that makes MP+U and WF+U). ``session.prune(..., update=name)`` uses it."""
    if name in _UPDATERS:
        raise ValueError(f"update {name!r} is already registered.")
    _UPDATERS[name] = (fn, frozenset(needs))


def get_updater(name: str):
    """``(fn, needs)`` of the registered update ``name``; ``ValueError`` naming the valid choices otherwise."""
    if not _UPDATERS:
        raise ValueError("no weight update is registered; update=... needs the second-order methods.")
    return _UPDATERS[check_choice(name, _UPDATERS, what="update")]


def list_updaters() -> list:
    return list(_UPDATERS)


def list_methods() -> list:
    """Names of the registered methods, in registration order.

    >>> "lamp" in list_methods()
    True
    """
    return list(_METHODS)
