"""Query: what one pruning call asks for, as one hashable value — the key of every cache in prune_lab.

A query is the method, the sparsity (rounded to :data:`SPARSITY_DIGITS` decimals, so a slider's 0.9000000000000001
is 0.9), the allocation (resolved: ``None`` becomes the method's default), the method's hyperparameters (every
field, defaults included, as ``(name, value)`` pairs), per-layer overrides, the seed (``None`` when nothing
depends on it), the weight update, the starting masks' content key and, for the ``sensitivity`` allocation, the
measured table's key. Two calls that must give the same masks give equal queries, and equal queries give the same
masks on the same weights.

The session's rankings and mask sets, the evaluation cache, sweep points, the result store and the lab's lookups
are all keyed by a query (in memory: the value itself; on disk: :attr:`Query.key`, a content hash), together with
the identities of the weights (``session.fingerprint``) and of the data (``session.data_id(data)``).

>>> import prune_lab as pl
>>> q = pl.Query.make("lamp", 0.9000000000000001)
>>> q.sparsity, q.allocation, q.seed
(0.9, 'global', None)
>>> q == pl.Query.make("lamp", 0.9, allocation="global", seed=3)
True
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..core.allocation import get_allocation
from ..core.validation import check_int, check_sparsity
from ..methods.registry import get_method, get_updater, list_updaters

SPARSITY_DIGITS = 12  # decimals kept of a sparsity: float noise goes, any sparsity a user types stays

__all__ = ["Query", "SPARSITY_DIGITS", "freeze", "normalise_sparsity"]


def normalise_sparsity(sparsity, *, what: str = "sparsity") -> float:
    """``sparsity`` checked (a real number in [0, 1)) and rounded to :data:`SPARSITY_DIGITS` decimals.

    >>> normalise_sparsity(0.1 + 0.2)
    0.3
    """
    s = round(check_sparsity(sparsity, what=what), SPARSITY_DIGITS)
    return check_sparsity(s, what=what) + 0.0  # -0.0 → 0.0; a value that rounds to 1.0 is refused


def freeze(value):
    """``value`` made hashable: lists and tuples as tuples, dicts as sorted ``(key, value)`` tuples, sets as
    sorted tuples (recursively); anything else as it is."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(freeze(v) for v in value))
    return value


@dataclass(frozen=True)
class Query:
    """One pruning request, normalised; build it with :meth:`make` (or ``session.query(...)``).

    ``hyperparameters``: ``(name, value)`` pairs of every hyperparameter of the method (defaults included), in the
    order its dataclass declares them (values made hashable: lists as tuples);
    ``overrides``: sorted ``(layer, sparsity)`` pairs; ``seed``: ``None`` when nothing depends on it (a method whose
    scores ignore it, no weight update);
    ``update``: the name of the weight update applied after selection, or ``None``; ``start``: the content key of
    the starting masks (``""``: none; see :func:`prune_lab.engine.weights.masks_key`); ``table``: the key of the
    measured sensitivity table for allocations that read one (``SensitivityTable.key``; ``""`` otherwise).
    """

    method: str
    sparsity: float
    allocation: str
    hyperparameters: tuple = ()
    overrides: tuple = ()
    seed: int | None = None
    update: str | None = None
    start: str = ""
    table: str = ""

    @classmethod
    def make(cls, method: str, sparsity: float, *, allocation: str | None = None, seed: int = 0,
             overrides: dict | None = None, update=False, start: str = "", table: str = "", **hp) -> "Query":
        """Validate and normalise: an unknown method, allocation, update or hyperparameter, or a sparsity outside
        [0, 1), raises the same errors as ``session.prune``.

        >>> Query.make("magnitude", 0.5, allocation=None).allocation
        'uniform'
        """
        spec = get_method(method)
        s = normalise_sparsity(sparsity)
        seed = check_int(seed, what="seed")
        alloc = get_allocation(allocation if allocation is not None else spec.default_allocation).name
        hpo = spec.make_hyperparameters(**hp)
        update = _update(update)
        seeded = spec.stochastic or update is not None  # a weight update may sample data with the seed
        return cls(method=spec.name, sparsity=s, allocation=alloc,
                   hyperparameters=tuple((k, freeze(v)) for k, v in dataclasses.asdict(hpo).items()),
                   overrides=_overrides(overrides),
                   seed=int(seed) if seeded else None, update=update, start=str(start),
                   table=str(table) if "sensitivity" in get_allocation(alloc).needs else "")

    # ------------------------------------------------------------------------------------------------------------
    @property
    def hp(self) -> dict:
        """The hyperparameters as keyword arguments."""
        return dict(self.hyperparameters)

    @property
    def spec(self):
        """The method's registry record."""
        return get_method(self.method)

    def at(self, sparsity: float) -> "Query":
        """The same query at another sparsity (normalised).

        >>> Query.make("lamp", 0.5).at(0.75).sparsity
        0.75
        """
        return dataclasses.replace(self, sparsity=normalise_sparsity(sparsity))

    def replace(self, **changes) -> "Query":
        """A copy with some fields changed; ``sparsity`` and ``overrides`` are normalised again."""
        if "sparsity" in changes:
            changes["sparsity"] = normalise_sparsity(changes["sparsity"])
        if "overrides" in changes:
            changes["overrides"] = _overrides(changes["overrides"])
        return dataclasses.replace(self, **changes)

    @property
    def key(self) -> str:
        """A content hash of the query (32 hex digits), the same in every process and on every machine: the key on
        disk (result stores, sweep points). In memory the query itself is the key (it is hashable)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=repr)
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    @property
    def label(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.hyperparameters)
        return f"{self.method} ({self.allocation}{extra}) @ {self.sparsity:g}"


def _overrides(overrides) -> tuple:
    if not overrides:
        return ()
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict {{layer: sparsity}}, got {type(overrides).__name__}.")
    return tuple(sorted((str(n), normalise_sparsity(v, what=f"overrides[{n!r}]")) for n, v in overrides.items()))


def _update(update) -> str | None:
    if update is False or update is None:
        return None
    if update is True:
        if not list_updaters():
            raise ValueError("update=True needs a registered weight update (the second-order methods).")
        return list_updaters()[0]
    get_updater(update)  # an unknown name: ValueError naming the valid ones
    return update
