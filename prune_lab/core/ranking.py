"""Score once, threshold many: scores sorted once, after which any sparsity is a lookup.

A :class:`Ranking` holds, for every layer, the order in which its weights are pruned (ascending score, ties broken
by position: a stable sort), the cumulative sum of ``w²`` in that order (so the single-layer Frobenius distortion of
pruning the k lowest is ``sqrt(csum[k])``), and the sorted scores as order-preserving int32 keys. "How many of each
layer's weights fall among the K lowest scores of the whole model" is a bisection over the key space with one
``searchsorted`` per layer and step: no global sort, no concatenation of all scores.

Memory per weight: 4 bytes of order (int32, on the session's device), 4 bytes of cumulative ``w²`` (float32, summed
in float64) and 4 bytes of key (int32, host memory, where the bisection runs). Rankings that share an order (LAMP
ranks weights in magnitude order) share the first two.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def ordered_int32(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int32 keys with the same order (``-0.0`` and ``0.0`` equal). ``(n,) → (n,)``.

    >>> ordered_int32(torch.tensor([-2.0, -0.5, 0.0, 1.5])).diff().gt(0).all().item()
    True
    """
    v = values.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0
    bits = v.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@dataclass
class LayerRank:
    """One layer's sorted scores: ``order: (n,)`` indices, lowest score first; ``csum: (n+1,)`` cumulative ``w²`` in
    that order; ``keys: (n,)`` the sorted scores as int32 keys (host memory)."""

    order: torch.Tensor
    csum: torch.Tensor
    keys: np.ndarray
    shape: tuple

    @property
    def numel(self) -> int:
        return self.order.numel()


def _check_scores(name, s: torch.Tensor):
    if s.is_floating_point() and torch.isnan(s).any():
        raise ValueError(f"scores of layer {name!r} contain NaN; check the weights and data of that layer.")


def _keys(sorted_values: torch.Tensor) -> np.ndarray:
    return ordered_int32(sorted_values).cpu().numpy()


class Ranking:
    """Sorted scores of every layer (see the module docstring). Build with :meth:`from_scores`.

    >>> w = {"a": torch.tensor([0.1, -0.5, 0.3]), "b": torch.tensor([0.2, 0.05])}
    >>> r = Ranking.from_scores(["a", "b"], {k: v.abs() for k, v in w.items()}, w)
    >>> r.global_counts(2).tolist()
    [1, 1]
    >>> r.masks([1, 1])["a"].tolist()
    [False, True, True]
    """

    def __init__(self, names, layers: dict):
        self.names = list(names)
        self.layers = layers
        self.sizes = np.asarray([layers[n].numel for n in self.names], dtype=np.int64)
        self.total = int(self.sizes.sum())
        self._keys = [layers[n].keys for n in self.names]

    @classmethod
    def from_scores(cls, names, scores: dict, weights: dict) -> "Ranking":
        """Sort ``scores`` (``{name: Tensor}``, any shape) layer by layer; ``weights`` of the same shapes give the
        cumulative ``w²``."""
        layers = {}
        for name in names:
            s = scores[name].detach().reshape(-1)
            _check_scores(name, s)
            # Sorting the order-preserving int32 keys gives the same stable order as sorting the float scores,
            # about twice as fast on the CPU, and the sorted keys are what the global bisection needs.
            keys, order = torch.sort(ordered_int32(s), stable=True)
            idx_dtype = torch.int32 if s.numel() < 2**31 else torch.int64
            order = order.to(idx_dtype)
            w2 = weights[name].detach().reshape(-1).index_select(0, order).to(torch.float64).pow(2)
            csum = torch.zeros(w2.numel() + 1, dtype=torch.float64, device=w2.device)
            torch.cumsum(w2, 0, out=csum[1:])
            layers[name] = LayerRank(order, csum.to(torch.float32), keys.cpu().numpy(), tuple(scores[name].shape))
            del w2, csum
        return cls(names, layers)

    def with_sorted_values(self, values: dict) -> "Ranking":
        """A ranking with the same orders (and cumulative sums, shared, not copied) and new sorted score values
        ``{name: (n,) non-decreasing}``: for scores known to rank weights in this ranking's order (LAMP)."""
        layers = {}
        for n in self.names:
            v = values[n].detach().reshape(-1)
            _check_scores(n, v)
            lr = self.layers[n]
            layers[n] = LayerRank(lr.order, lr.csum, _keys(v), lr.shape)
        return Ranking(self.names, layers)

    def subset(self, names) -> "Ranking":
        """The ranking of some layers only (shares their arrays): a global threshold over those layers."""
        return Ranking(list(names), {n: self.layers[n] for n in names})

    # ------------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held (orders, cumulative sums and keys; shared tensors counted in each ranking)."""
        n = 0
        for lr in self.layers.values():
            n += lr.order.numel() * lr.order.element_size() + lr.csum.numel() * lr.csum.element_size()
            n += lr.keys.nbytes
        return n

    def _count(self, v: np.int32, side: str) -> np.ndarray:
        return np.fromiter((k.searchsorted(v, side) for k in self._keys), dtype=np.int64, count=len(self._keys))

    def global_counts(self, k: int) -> np.ndarray:
        """Per-layer number of weights among the ``k`` lowest scores of all layers (ties: earlier layer, then
        earlier position, as a stable sort of the concatenated scores would give). ``O(#layers · log n)`` per
        bisection step, 32 steps at most.
        """
        k = int(k)
        if k <= 0:
            return np.zeros(len(self.names), dtype=np.int64)
        if k >= self.total:
            return self.sizes.copy()
        keys = [k_ for k_ in self._keys if k_.size]
        lo, hi = int(min(k_[0] for k_ in keys)), int(max(k_[-1] for k_ in keys))
        while lo < hi:  # smallest key v with #(key <= v) >= k
            mid = (lo + hi) // 2
            q = np.int32(mid)
            if sum(k_.searchsorted(q, "right") for k_ in keys) >= k:
                hi = mid
            else:
                lo = mid + 1
        v = np.int32(lo)
        le, lt = self._count(v, "right"), self._count(v, "left")
        eq = le - lt
        before = np.cumsum(eq) - eq
        take = np.clip(k - int(lt.sum()) - before, 0, eq)
        return lt + take

    def critical_count(self) -> int:
        """Number of weights scoring below ``t* = min over layers of the layer's highest score``: pruning more than
        this under a global threshold empties a layer (critical sparsity = this ÷ total)."""
        keys = [k_ for k_ in self._keys if k_.size]
        t = min(k_[-1] for k_ in keys)
        return int(sum(k_.searchsorted(t, "left") for k_ in keys))

    def frobenius(self, counts) -> np.ndarray:
        """``‖W − M⊙W‖_F`` per layer when the ``counts[l]`` lowest-scoring weights of layer l are pruned."""
        return np.sqrt(np.maximum([float(self.layers[n].csum[int(c)]) for n, c in zip(self.names, counts)], 0.0))

    def weight_norms(self) -> np.ndarray:
        """``‖W‖_F`` per layer."""
        return self.frobenius(self.sizes)

    def frobenius_curve(self, counts) -> np.ndarray:
        """Distortion for many count vectors at once: ``counts: (points, layers) → (points, layers)``."""
        counts = np.asarray(counts, dtype=np.int64)
        out = np.empty(counts.shape, dtype=np.float64)
        for j, n in enumerate(self.names):
            csum = self.layers[n].csum
            idx = torch.as_tensor(counts[:, j], device=csum.device)
            out[:, j] = csum[idx].double().clamp_min(0).sqrt().cpu().numpy()
        return out

    def masks(self, counts, device=None) -> dict:
        """``{name: BoolTensor}`` (True = kept) pruning the ``counts[l]`` lowest-scoring weights of each layer."""
        out = {}
        for n, c in zip(self.names, counts):
            lr = self.layers[n]
            m = torch.ones(lr.numel, dtype=torch.bool, device=lr.order.device)
            m.index_fill_(0, lr.order[: int(c)].long(), False)
            m = m.reshape(lr.shape)
            out[n] = m.to(device) if device is not None else m
        return out
