"""PruneResult: what a pruning call returns. Per-layer counts and distortions are there at once; the masks are
built only when first asked for (by ``result.masks``: evaluation, export, a mask figure, the lookahead of another
method's masks), not by the pruning call itself."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .weights import fingerprint

FORMAT = "prune_lab.PruneResult"
FORMAT_VERSION = 1


def read_payload(path, fmt: str, version: int, *, what: str, how: str) -> dict:
    """Load a prune_lab file (``torch.load`` with ``weights_only=True``) and check its header: a clear
    ``ValueError`` when it is not ``what`` or was written in a newer format."""
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not our file
        raise ValueError(f"{path!r} is not {what} (could not read it: {type(exc).__name__}: {exc}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path!r} is not {what} (no {fmt!r} header); write one with {how}.")
    got = payload.get("format_version", 0)
    if isinstance(got, bool) or not isinstance(got, int) or got < 0:
        raise ValueError(f"{path!r} is not {what}: its format_version is {got!r} ({type(got).__name__}), not a "
                         f"non-negative int; the file is damaged or was not written by prune_lab ({how}).")
    if got > version:
        raise ValueError(f"{path!r} was written by prune_lab {payload.get('library_version')} in format "
                         f"{payload['format_version']}; this prune_lab reads format {version} and older. "
                         f"Upgrade prune_lab.")
    return payload


def require_keys(payload: dict, keys, path, *, what: str) -> None:
    """``ValueError`` naming the entries a prune_lab file lacks (a damaged or hand-edited file), instead of a bare
    ``KeyError`` later."""
    missing = [k for k in keys if k not in payload]
    if missing:
        raise ValueError(f"{os.fspath(path)!r} is not a complete {what}: it lacks {', '.join(map(repr, missing))}. "
                         f"The file is damaged or incomplete; write it again.")


_RESULT_KEYS = ("method", "allocation", "target_sparsity", "hyperparameters", "seed", "layers", "numel", "pruned",
                "frobenius", "weight_norms", "model_fingerprint", "mask_shapes", "masks", "weights")


def plain(value):
    """``value`` as plain Python (numbers, strings, None, tuples, lists, dicts) for files read with
    ``torch.load(weights_only=True)``: numpy and 0-d tensor scalars become numbers; anything else its ``repr``.

    >>> plain({"lam": np.float64(0.5), "shape": (1, np.int64(28))})
    {'lam': 0.5, 'shape': (1, 28)}
    """
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()  # before the float test: numpy.float64 is a float subclass
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return repr(value)


@dataclass
class PruneResult:
    """The outcome of pruning at one sparsity.

    ``masks``: ``{name: BoolTensor}`` of the parameters' shapes, True = kept (built on first access);
    ``weights``: ``{name: Tensor}`` of updated kept weights for methods that update them, else ``None``;
    ``layer_sparsity``: ``{name: float}``; ``sparsity``: achieved over the prunable set; ``frobenius``:
    ``{name: ‖W − M⊙W‖_F}``; ``target_sparsity``: what was asked for; ``model_fingerprint``: the content hash
    of the model's weights it was computed on (:attr:`PruneSession.fingerprint`); ``empty_layers``: the layers
    that lose every weight; ``info``: what the method reports about its mask (CBS: ``cbs_objective`` and
    ``cbs_loss`` of the kept mask beside ``magnitude_objective`` and ``magnitude_loss`` of the magnitude start).
    ``orders``: for methods scored once (a cached ranking), ``{name: order}``, each layer's weights as flat indices
    in the order they are pruned (the mask removes the first ``pruned[i]``): incremental measures use it; ``None``
    for sparsity-dependent methods and updated weights (not saved). ``query``: the
    :class:`~prune_lab.engine.query.Query` that made it (the key its evaluations are cached under; ``None`` for a
    loaded result).

    :meth:`save` / :meth:`load` keep it on disk (masks packed as bits); :meth:`check_model` tells whether a model
    is the one it was computed on.

    >>> import torch, prune_lab as pl
    >>> res = pl.prune(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), "magnitude", 0.5)
    >>> res.layer_sparsity
    {'0.weight': 0.5, '2.weight': 0.5}
    """

    method: str
    allocation: str
    target_sparsity: float
    hyperparameters: dict
    seed: int | None
    layers: tuple
    numel: tuple
    pruned: tuple
    frobenius: dict
    weight_norms: dict
    model_fingerprint: str = ""
    weights: dict | None = None
    info: dict = field(default_factory=dict)  # what the method reports about this mask (plain numbers)
    library_version: str | None = field(default=None, repr=False)  # set on results read by load()
    _mask_builder: Callable | None = field(default=None, repr=False)
    _masks: dict | None = field(default=None, repr=False)
    orders: dict | None = field(default=None, repr=False, compare=False)  # see the class docstring
    query: "Query | None" = field(default=None, repr=False, compare=False)  # see the class docstring

    @property
    def masks(self) -> dict:
        if self._masks is None:
            self._masks = self._mask_builder()
            self._mask_builder = None
        return self._masks

    @property
    def masks_built(self) -> bool:
        """Whether the masks have been materialised (they are built lazily)."""
        return self._masks is not None

    @property
    def layer_sparsity(self) -> dict:
        return {n: (p / t if t else 0.0) for n, p, t in zip(self.layers, self.pruned, self.numel)}

    @property
    def sparsity(self) -> float:
        total = sum(self.numel)
        return sum(self.pruned) / total if total else 0.0

    @property
    def empty_layers(self) -> tuple:
        """Names of the layers that lose every weight (the network is cut there); the engine warns when there are
        any. ``()`` when none."""
        return tuple(n for n, p, t in zip(self.layers, self.pruned, self.numel) if t and p >= t)

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def n_kept(self) -> int:
        return int(sum(self.numel) - sum(self.pruned))

    @property
    def relative_frobenius(self) -> dict:
        return {n: (self.frobenius[n] / self.weight_norms[n] if self.weight_norms[n] > 0 else 0.0)
                for n in self.layers}

    @property
    def label(self) -> str:
        return f"{self.method} ({self.allocation}) @ {self.target_sparsity:g}"

    def __repr__(self) -> str:
        return (f"PruneResult(method={self.method!r}, allocation={self.allocation!r}, "
                f"sparsity={self.sparsity:.4f}, layers={len(self.layers)}, kept={self.n_kept})")

    # ------------------------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the result to ``path`` (one file, read back by :meth:`load`): the masks packed as bits
        (``numpy.packbits``, 1 bit per weight), the updated weights when there are any (their dtype), the method,
        allocation, target sparsity, hyperparameters, seed, per-layer counts and distortions, the model's
        fingerprint and the library version. Loading needs no pickled code (``torch.load(weights_only=True)``).

        >>> import tempfile, os, torch, prune_lab as pl
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> res = pl.prune(net, "magnitude", 0.5)
        >>> path = os.path.join(tempfile.mkdtemp(), "res.pt"); res.save(path)
        >>> back = pl.PruneResult.load(path, model=net)
        >>> torch.equal(back.masks["0.weight"], res.masks["0.weight"])
        True
        """
        from .._version import __version__

        masks = self.masks
        packed, shapes = {}, {}
        for n in self.layers:
            m = masks[n].detach().to("cpu", torch.bool)
            shapes[n] = tuple(m.shape)
            packed[n] = torch.from_numpy(np.packbits(m.numpy().reshape(-1)))
        payload = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
            "method": self.method, "allocation": self.allocation, "target_sparsity": float(self.target_sparsity),
            "hyperparameters": plain(dict(self.hyperparameters)), "seed": plain(self.seed), "layers": list(self.layers),
            "numel": plain(list(self.numel)), "pruned": plain(list(self.pruned)),
            "frobenius": plain(dict(self.frobenius)), "weight_norms": plain(dict(self.weight_norms)), "model_fingerprint": self.model_fingerprint,
            "mask_shapes": shapes, "masks": packed, "info": plain(dict(self.info)),
            "weights": None if self.weights is None else {n: w.detach().cpu() for n, w in self.weights.items()},
        }
        torch.save(payload, os.fspath(path))

    @classmethod
    def load(cls, path, *, model=None, map_location="cpu") -> "PruneResult":
        """Read a result written by :meth:`save`. ``model``: when given, :meth:`check_model` runs on it (a model
        whose layers or weights differ from the one the result was computed on raises ``ValueError``).
        ``map_location``: where the masks and weights go (default CPU).

        >>> import tempfile, os, torch, prune_lab as pl
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "res.pt"); pl.prune(net, "lamp", 0.5).save(path)
        >>> pl.PruneResult.load(path).sparsity
        0.5
        """
        payload = read_payload(path, FORMAT, FORMAT_VERSION, what="a saved PruneResult",
                               how="result.save(path)")
        require_keys(payload, _RESULT_KEYS, path, what="saved PruneResult")
        missing = [n for n in payload["layers"] if n not in payload["mask_shapes"] or n not in payload["masks"]]
        if missing:
            raise ValueError(f"{os.fspath(path)!r} is not a complete saved PruneResult: no mask for layer "
                             f"{missing[0]!r}. The file is damaged or incomplete; write it again.")
        masks = {}
        for n in payload["layers"]:
            shape = tuple(payload["mask_shapes"][n])
            count = int(np.prod(shape, dtype=np.int64))
            bits = np.unpackbits(payload["masks"][n].numpy(), count=count).astype(bool)
            masks[n] = torch.from_numpy(bits.reshape(shape)).to(map_location)
        weights = payload["weights"]
        if weights is not None:
            weights = {n: w.to(map_location) for n, w in weights.items()}
        res = cls(method=payload["method"], allocation=payload["allocation"],
                  target_sparsity=payload["target_sparsity"], hyperparameters=payload["hyperparameters"],
                  seed=payload["seed"], layers=tuple(payload["layers"]), numel=tuple(payload["numel"]),
                  pruned=tuple(payload["pruned"]), frobenius=payload["frobenius"],
                  weight_norms=payload["weight_norms"], model_fingerprint=payload["model_fingerprint"],
                  weights=weights, info=dict(payload.get("info") or {}),
                  library_version=payload.get("library_version"), _masks=masks)
        if model is not None:
            res.check_model(model)
        return res

    def check_model(self, model, *, weights: bool = True) -> None:
        """Raise ``ValueError`` unless ``model`` is the model this result was computed on: every masked weight must
        exist with the mask's shape (the first mismatch is named), and with ``weights=True`` the weights' content
        fingerprint (:attr:`PruneSession.fingerprint`) must match. ``weights=False`` checks only the layers (e.g.
        to apply masks found on a pretrained model to the same architecture retrained).

        >>> import torch, prune_lab as pl
        >>> a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
        >>> res = pl.prune(a, "magnitude", 0.5)
        >>> res.check_model(a); res.check_model(b, weights=False)
        >>> res.check_model(b)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: this result was computed on a model with other weights (fingerprint ...); ...
        """
        from torch import nn

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        params = dict(model.named_parameters())
        for n in self.layers:
            if n not in params:
                raise ValueError(f"this result does not fit the model {type(model).__name__}: it has no "
                                 f"parameter {n!r} (the result's layers: {', '.join(self.layers[:5])}"
                                 f"{', …' if len(self.layers) > 5 else ''}).")
            want = tuple(self.masks[n].shape)
            if tuple(params[n].shape) != want:
                raise ValueError(f"this result does not fit the model {type(model).__name__}: {n!r} has shape "
                                 f"{tuple(params[n].shape)}, the result's mask {want}.")
        if weights and self.model_fingerprint:
            fp = fingerprint(model)
            if fp != self.model_fingerprint:
                raise ValueError(f"this result was computed on a model with other weights (fingerprint "
                                 f"{self.model_fingerprint[:12]}…, this model {fp[:12]}…); its masks may not "
                                 f"suit these weights. Use check_model(model, weights=False) to check only the "
                                 f"layers.")
