"""The weights a session prunes: the model's prunable structure, change detection and a content fingerprint.

:class:`WeightSnapshot` reads the model's structure once (the layer graph, the prunable layers, the Parameters that
hold their values, the BatchNorm modules) and, on every :meth:`~WeightSnapshot.current` call, checks cheaply whether
the weights changed: tensor version counters, plus a fixed sample of 64 entries per weight for changes made through
``.data``, which skip the counters. When they changed it reads them again (detached copies on the session's device,
the BatchNorm factors) and takes a new content fingerprint. A change through ``.data`` of only a few entries can
escape the sample: :meth:`~WeightSnapshot.forget` makes the next call read everything again. Replaced Parameters
(``load_state_dict(sd, assign=True)``, ``layer.weight = nn.Parameter(...)``) and swapped, added or removed modules
are seen on every call too (the module sequence and each weight's registration are compared by identity): the
structure is then read again before fingerprinting.

:func:`fingerprint` is the same content hash for a model without a session (``PruneResult.check_model``, export).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.device import host_cat, masks_key  # re-exported: the engine's keys
from ..core.graph import build_graph
from ..core.neighbours import bn_scales

__all__ = ["Weights", "WeightSnapshot", "fingerprint", "host_cat", "masks_key", "pruned_counts"]

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Weights:
    """The weights at one moment: ``fingerprint`` (a content hash of the Linear/Conv weights and BatchNorm factors),
    ``weights`` (every Linear/Conv weight of the graph, detached, on the session's device) and ``scales`` (the
    BatchNorm factors ``|γ/√(var+ε)|``). ``token``: what the cheap change check compares."""

    token: tuple
    fingerprint: str
    weights: dict
    scales: dict


def pruned_counts(masks: dict, names) -> np.ndarray:
    """Per layer, how many entries of the bool masks are False: one transfer."""
    return host_cat([(~masks[n]).sum().reshape(1) for n in names]).astype(np.int64)


def fingerprint(model: nn.Module, *, include=None, exclude=None) -> str:
    """The content fingerprint of ``model``'s prunable weights and BatchNorm factors (``session.fingerprint``).

    >>> import torch
    >>> a = torch.nn.Linear(4, 2)
    >>> fingerprint(a) == fingerprint(a), len(fingerprint(a))
    (True, 32)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied-weight notes belong to sessions, not to a hash
        return WeightSnapshot(model, torch.device("cpu"), include=include, exclude=exclude).fingerprint


class WeightSnapshot:
    """The prunable structure of ``model`` and its weights now (see the module docstring).

    Public: ``model``, ``device``, ``include``, ``exclude``, ``graph``, ``layer_names`` (data-flow order),
    ``params`` (``{name: Parameter}``), ``shapes``, ``is_conv``, ``sizes``, ``tied_weights``; :meth:`current`,
    :attr:`fingerprint`, :meth:`check_masks`, :meth:`forget`.
    """

    _SAMPLE = 64  # entries per tensor compared on every call (changes through ``.data`` skip version counters)

    def __init__(self, model: nn.Module, device: torch.device, *, include=None, exclude=None):
        self.model = model
        self.device = device
        self.include, self.exclude = include, exclude
        self.tied_weights: dict = {}
        self._state: Weights | None = None
        self._sample_indices: dict = {}
        self._bind()

    @property
    def fingerprint(self) -> str:
        """A content hash of the model's Linear/Conv weights and BatchNorm factors."""
        return self.current().fingerprint

    @property
    def sizes(self) -> np.ndarray:
        """Weights per prunable layer (int64)."""
        return np.asarray([math.prod(s) for s in self.shapes], dtype=np.int64)

    def forget(self):
        """Drop the fingerprint: the next :meth:`current` reads every weight again."""
        self._state = None

    def _bind(self):
        """Read the model's structure: the layer graph, the prunable layers, the Parameters that hold their values
        (and the module and attribute where each is registered) and the BatchNorm modules. At construction, and
        again whenever :meth:`_refresh` sees replaced Parameters or changed modules."""
        model = self.model
        graph = build_graph(model, include=self.include, exclude=self.exclude)
        layer_names = list(graph.prunable)
        if not layer_names:
            what = "no Linear or Conv1d/2d/3d weight" if not graph.layers else \
                "no Linear or Conv weight left after include/exclude"
            raise ValueError(f"model {type(model).__name__} has nothing to prune: {what}. prune_lab prunes the "
                             f"weights used in matrix products and convolutions: nn.Linear and nn.Conv1d/2d/3d, "
                             f"nn.MultiheadAttention's projections, RNN/LSTM/GRU matrices, parameters passed to "
                             f"F.linear / F.conv*.")
        params = dict(model.named_parameters())
        new_params = {n: params[n] for n in graph.layers}
        for n, p in new_params.items():
            if p.device.type == "meta":
                raise ValueError(f"weight {n!r} is on the 'meta' device (a placeholder without values); load or "
                                 f"materialise the model's weights first (e.g. model.to_empty(device='cpu') and "
                                 f"load_state_dict).")
        modules = dict(model.named_modules())
        self.graph = graph
        self.layer_names = layer_names
        self.params = new_params
        # where each Parameter is registered: a replaced one (load_state_dict(assign=True)) is seen there
        self._owners = {n: (modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in new_params}
        self._modules = tuple(model.modules())  # a swapped, added or removed module changes this sequence
        tied = self._find_tied(model)
        if tied and tied != self.tied_weights:
            shared = "; ".join(f"{n!r} also as {', '.join(map(repr, o))}" for n, o in tied.items())
            warnings.warn(f"tied (shared) weights are pruned once, under their first name: {shared}.",
                          UserWarning, stacklevel=4)
        self.tied_weights = tied
        self._bn = {n: modules[n] for n in graph.bn_modules}
        self.shapes = tuple(tuple(self.params[n].shape) for n in self.layer_names)
        self.is_conv = tuple(self.graph.layers[n].is_conv for n in self.layer_names)
        self._sample_indices = {}

    def _refresh(self):
        """Re-read the structure (:meth:`_bind`) when a module was swapped, added or removed, or a weight's
        Parameter replaced (``load_state_dict(sd, assign=True)``, ``layer.weight = nn.Parameter(...)``): one pass
        over ``model.modules()`` and one dict lookup per layer (tens of µs on ResNet-50)."""
        mods = self._modules
        current = tuple(self.model.modules())
        changed = len(current) != len(mods) or any(a is not b for a, b in zip(current, mods))
        if not changed:
            params = self.params
            for n, (owner, attr) in self._owners.items():
                if owner._parameters.get(attr) is not params[n]:
                    changed = True
                    break
        if changed:
            self._bind()

    def _find_tied(self, model: nn.Module) -> dict:
        """``{prunable name: [other names of the same Parameter]}`` for weights shared by several modules."""
        first: dict = {}
        others: dict = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                others.setdefault(first[id(p)], []).append(name)
            else:
                first[id(p)] = name
        return {n: others[n] for n in self.layer_names if n in others}

    def _token(self) -> tuple:
        self._refresh()
        tensors = list(self.params.values())
        for bn in self._bn.values():
            tensors += [t for t in (bn.weight, bn.running_var) if t is not None]
        # Version counters see in-place changes and load_state_dict; ``p.data.mul_(…)`` / ``p.data.copy_(…)`` do
        # not bump them, so a fixed sample of each weight's entries is compared too (a few µs per weight).
        parts, on_device = [], []
        for i, t in enumerate(self.params.values()):  # the Linear/Conv weights (BatchNorm: counters only)
            t = t.detach()
            n = t.numel()
            if not n:
                continue
            if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS and t.is_contiguous():  # numpy views: ~µs
                parts.append(t.numpy().reshape(-1)[:: max(1, n // self._SAMPLE)][: self._SAMPLE].astype(np.float64))
            elif t.is_contiguous():
                on_device.append(t.view(-1)[:: max(1, n // self._SAMPLE)][: self._SAMPLE].to(torch.float64))
            else:
                on_device.append(t[self._sample_index(i, t)].reshape(-1).to(torch.float64))
        if on_device:  # one transfer for every tensor off the CPU
            parts.append(torch.cat(on_device).cpu().numpy())
        sample = np.concatenate(parts).tobytes() if parts else b""
        # the tensors themselves too (compared by identity): a replaced BatchNorm tensor may reuse a freed address
        return (tuple(tensors),) + tuple((t.data_ptr(), t._version, str(t.device)) for t in tensors) + (sample,)

    def _sample_index(self, i: int, t: torch.Tensor) -> tuple:
        """Index tensors of the fixed sample of a non-contiguous weight (e.g. channels-last), per device."""
        cache = self._sample_indices
        key = (i, tuple(t.shape), str(t.device))
        idx = cache.get(key)
        if idx is None:
            n = t.numel()
            flat = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, self._SAMPLE)).round().astype(np.int64))
            idx = tuple(torch.as_tensor(a, device=t.device) for a in np.unravel_index(flat, tuple(t.shape))) \
                if n else (torch.zeros(0, dtype=torch.long, device=t.device),) * t.dim()
            cache[key] = idx
        return idx

    @staticmethod
    def _same_token(a: tuple, b: tuple) -> bool:
        return len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0])) and a[1:] == b[1:]

    def current(self) -> Weights:
        """The weights now: the last :class:`Weights` when nothing changed (a version-counter and sample check,
        µs per layer), else read again and fingerprinted (one host read per weight). ``ValueError`` for NaN/Inf."""
        token = self._token()
        if self._state is not None and self._same_token(self._state.token, token):
            return self._state
        weights = {}
        h = hashlib.blake2b(digest_size=16)
        for n, p in self.params.items():
            w = p.detach()
            # The fingerprint reads every weight once on the host (one copy per layer for a GPU model, none on
            # the CPU); the finiteness check runs on that host copy: no device synchronisation of its own.
            host = w.cpu()
            # a float64 sum is finite exactly when every entry is (float32/16 values cannot overflow it): one pass
            # without a temporary; the exact test only to name the problem
            if not math.isfinite(float(host.sum(dtype=torch.float64))) and not torch.isfinite(host).all():
                bad = "NaN" if torch.isnan(host).any() else "Inf"
                raise ValueError(f"weight {n!r} contains {bad} values; prune_lab cannot rank them. Fix or "
                                 f"re-initialise that layer first.")
            h.update(n.encode())
            h.update(host.contiguous().numpy() if host.dtype != torch.bfloat16 else host.float().numpy())
            del host
            weights[n] = w.to(self.device)
        scales = {k: v.to(self.device) for k, v in bn_scales(self.model, self._bn).items()}
        for k in sorted(scales):
            h.update(k.encode())
            h.update(scales[k].cpu().numpy().tobytes())
        self._state = Weights(token, h.hexdigest(), weights, scales)
        return self._state

    def check_masks(self, masks) -> dict | None:
        """Starting masks checked against the model's current prunable layers (names and shapes), as bool tensors
        on the session's device; ``None`` stays ``None``."""
        self._refresh()
        if masks is None:
            return None
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict {{name: BoolTensor}}, got {type(masks).__name__}.")
        for n in masks:
            if n not in self.layer_names:
                raise ValueError(f"masks do not fit this model: {n!r} is not one of its prunable weights "
                                 f"({', '.join(self.layer_names[:5])}{', …' if len(self.layer_names) > 5 else ''}).")
        out = {}
        for n in self.layer_names:
            if n not in masks:
                raise ValueError(f"masks do not fit this model: no mask for prunable weight {n!r}.")
            m = torch.as_tensor(masks[n])
            if tuple(m.shape) != tuple(self.params[n].shape):
                raise ValueError(f"masks do not fit this model: the mask of {n!r} has shape {tuple(m.shape)}, "
                                 f"the weight {tuple(self.params[n].shape)}.")
            out[n] = m.to(device=self.device, dtype=torch.bool)
        return out
