"""Score once, threshold many: scores sorted once, after which any sparsity is a lookup.

A :class:`Ranking` holds, for every layer, the order in which its weights are pruned (ascending score, ties broken
by position: a stable sort), the cumulative sum of ``w²`` in that order (so the single-layer Frobenius distortion of
pruning the k lowest is ``sqrt(csum[k])``), and one flat array of integer keys, sorted, that answers "how many of
each layer's weights fall among the K lowest scores of the whole model" with one ``searchsorted`` per step of a
32-step bisection, without a global sort.

Memory: 4 bytes (order, int32) + 4 bytes (cumulative w², float32, summed in float64) + 8 bytes (key) per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_INT32_SIGN = 1 << 31


def ordered_int32(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int32 keys with the same order (``-0.0`` and ``0.0`` equal). ``(n,) → (n,)``.

    >>> ordered_int32(torch.tensor([-2.0, -1.0, 0.0, 1.5])).tolist() == sorted(ordered_int32(torch.tensor([-2.0, -1.0, 0.0, 1.5])).tolist())
    True
    """
    v = values.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0
    bits = v.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@dataclass
class LayerRank:
    """One layer's sorted scores. ``order: (n,)`` indices, lowest score first; ``csum: (n+1,)`` cumulative ``w²``."""

    order: torch.Tensor
    csum: torch.Tensor
    shape: tuple

    @property
    def numel(self) -> int:
        return self.order.numel()


class Ranking:
    """Sorted scores of every layer (see the module docstring).

    ``scores`` and ``weights``: ``{name: Tensor}`` of equal shapes; ``names`` fixes the layer order (the order in
    which ties between layers are broken by the global selection).

    >>> w = {"a": torch.tensor([0.1, -0.5, 0.3]), "b": torch.tensor([0.2, 0.05])}
    >>> r = Ranking(["a", "b"], {k: v.abs() for k, v in w.items()}, w)
    >>> r.global_counts(2).tolist()
    [1, 1]
    >>> r.masks([1, 1])["a"].tolist()
    [False, True, True]
    """

    def __init__(self, names, scores: dict, weights: dict):
        self.names = list(names)
        self.layers: dict = {}
        keys = []
        for i, name in enumerate(self.names):
            s = scores[name].detach().reshape(-1)
            if s.is_floating_point() and torch.isnan(s).any():
                raise ValueError(f"scores of layer {name!r} contain NaN; check the weights and data of that layer.")
            s = s.to(torch.float32)
            vals, order = torch.sort(s, stable=True)
            w2 = weights[name].detach().reshape(-1).to(torch.float64)[order].pow(2)
            csum = torch.zeros(w2.numel() + 1, dtype=torch.float64, device=w2.device)
            torch.cumsum(w2, 0, out=csum[1:])
            idx_dtype = torch.int32 if s.numel() < 2**31 else torch.int64
            self.layers[name] = LayerRank(order.to(idx_dtype), csum.to(torch.float32), tuple(scores[name].shape))
            keys.append(ordered_int32(vals).to(torch.int64) + (_INT32_SIGN + (i << 32)))
            del vals, w2
        self.keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
        sizes = [self.layers[n].numel for n in self.names]
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._starts = torch.as_tensor(np.concatenate([[0], np.cumsum(self.sizes)[:-1]]), dtype=torch.int64,
                                       device=self.keys.device)
        self._layer_base = torch.arange(len(self.names), dtype=torch.int64, device=self.keys.device) << 32
        self.total = int(self.sizes.sum())

    # ------------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the cache (orders, cumulative sums and keys)."""
        n = self.keys.numel() * self.keys.element_size()
        for lr in self.layers.values():
            n += lr.order.numel() * lr.order.element_size() + lr.csum.numel() * lr.csum.element_size()
        return n

    def _counts_at(self, v: int, right: bool) -> torch.Tensor:
        q = self._layer_base + (v + _INT32_SIGN)
        return torch.searchsorted(self.keys, q, right=right) - self._starts

    def global_counts(self, k: int) -> np.ndarray:
        """Per-layer number of weights among the ``k`` lowest scores of all layers (ties: earlier layer, then
        earlier position, as a stable sort of the concatenated scores). ``O(#layers · log n)`` per bisection step.
        """
        k = int(k)
        if k <= 0:
            return np.zeros(len(self.names), dtype=np.int64)
        if k >= self.total:
            return self.sizes.copy()
        lo, hi = -_INT32_SIGN, _INT32_SIGN - 1  # smallest v with #(key <= v) >= k
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self._counts_at(mid, right=True).sum()) >= k:
                hi = mid
            else:
                lo = mid + 1
        le = self._counts_at(lo, right=True).cpu().numpy()
        lt = self._counts_at(lo, right=False).cpu().numpy()
        eq = le - lt
        remaining = k - int(lt.sum())
        before = np.cumsum(eq) - eq
        take = np.clip(remaining - before, 0, eq)
        return lt + take

    def frobenius(self, counts) -> np.ndarray:
        """``‖W − M⊙W‖_F`` per layer when the ``counts[l]`` lowest-scoring weights of layer l are pruned."""
        return np.sqrt(np.maximum([float(self.layers[n].csum[int(c)]) for n, c in zip(self.names, counts)], 0.0))

    def weight_norms(self) -> np.ndarray:
        """``‖W‖_F`` per layer."""
        return np.sqrt(np.maximum([float(self.layers[n].csum[-1]) for n in self.names], 0.0))

    def frobenius_curve(self, counts: np.ndarray) -> np.ndarray:
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
            m[lr.order[: int(c)].long()] = False
            out[n] = m.reshape(lr.shape).to(device) if device is not None else m.reshape(lr.shape)
        return out
