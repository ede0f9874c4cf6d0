"""Score once, threshold many: scores sorted once, after which any sparsity is a lookup.

A :class:`Ranking` holds, for every layer, the order in which its weights are pruned (ascending score, ties broken
by position: a stable sort), the cumulative sum of ``w²`` in that order sampled every ``block`` entries, and the
sorted scores as order-preserving int32 keys, stored losslessly compressed
(:class:`~prune_lab.core.sorted_keys.SortedKeys`). The single-layer Frobenius distortion of pruning the k lowest is
``sqrt(csum[k // block] + Σ w²`` of the rest of that block``)``, the rest (fewer than ``block`` weights) gathered
from the weights through the order: exact up to float64 rounding.
"How many of each layer's weights fall among the K lowest scores of the whole model" is a search of the key space:
the threshold's upper 16 bits from a table of all layers' counts per upper half, its lower 16 bits four at a time
in the layers holding keys of that upper half (one vectorised ``searchsorted`` each per step): no global sort, no
concatenation of all scores.

Memory per weight (``Ranking.nbytes``; tests/core/test_ranking.py checks it):

- order: 4 bytes (int32, on the session's device; int64 only in a layer of 2³¹ weights or more);
- cumulative ``w²``: ``8 / block`` bytes (float64 every ``block = 256`` entries, on the device): 0.03 bytes;
- keys, in host memory: sorted keys have non-decreasing upper 16 bits, so a layer keeps a table of how many keys
  lie below each upper half in its range (4 bytes per upper half) and only the lower 16 bits per weight: 2 bytes
  for float32 scores, 1 for float16 scores, none for bfloat16 scores (their lower bits are zero). A small layer
  keeps plain int32 keys when that is smaller.

A float32-score ranking therefore holds about 6 bytes per weight: 1.5× float32 weights, 3.0× bfloat16 weights; a
bfloat16-score ranking (``|w|`` of bfloat16 weights, or any scores with ``score_dtype=torch.bfloat16``) about 4:
2.0× bfloat16 weights. Rankings that share an order (LAMP ranks weights in magnitude order) share order and
cumulative sums. The keys stay on the host on purpose: the bisection then runs without a single device
synchronisation, whatever the device. The weights are referenced, not copied (the partial blocks are read from
them): keep them unchanged while the ranking is used (the session fingerprints them and ranks again when they
change).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sorted_keys import SortedKeys, ordered_int32

BLOCK = 256  # entries per stored sample of the cumulative w² (8 bytes per 256 weights)
_CHUNK = 1 << 22  # entries per step when a layer is processed in pieces (bounds the temporaries)
_KEY_NEG_INF = int(ordered_int32(torch.tensor([-float("inf")]))[0])
_KEY_POS_INF = int(ordered_int32(torch.tensor([float("inf")]))[0])
_NIBBLE = np.arange(16, dtype=np.int64)


@dataclass(eq=False)
class LayerRank:
    """One layer's sorted scores: ``order: (n,)`` indices, lowest score first (on the device); ``csum: (n // block
    + 1,)`` float64, ``csum[j]`` = Σ ``w²`` of the ``j · block`` first weights in that order (on the device);
    ``keys``: the sorted scores as :class:`SortedKeys` (host memory); ``weight``: the weights (referenced, not
    copied; any layout); ``norm2``: ``‖W‖²`` (a host float)."""

    order: torch.Tensor
    csum: torch.Tensor
    keys: SortedKeys
    shape: tuple
    weight: torch.Tensor
    norm2: float = 0.0
    block: int = BLOCK

    @property
    def numel(self) -> int:
        return self.order.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of order, cumulative sums and keys (the referenced weights not counted)."""
        return self.order.numel() * self.order.element_size() + self.csum.numel() * 8 + self.keys.nbytes

    def arrays(self) -> tuple:
        """The tensors and host arrays held: order, cumulative sums, keys (the referenced weights not included)."""
        return (self.order, self.csum) + self.keys.arrays()

    def gather_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """The weights at flat (row-major) positions ``idx``, any layout of ``weight``."""
        w = self.weight
        if w.is_contiguous():
            return w.reshape(-1)[idx]
        return w[torch.unravel_index(idx.long(), tuple(w.shape))]

    def _host_path(self) -> bool:
        """Weights and order in host memory (contiguous weights): numpy reads them without torch's per-op cost."""
        return self.weight.device.type == "cpu" and self.order.device.type == "cpu" and self.weight.is_contiguous()

    def pruned_w2_one(self, c: int):
        """``Σ w²`` of the ``c`` (< n) first weights in the order: a host float for a CPU ranking (numpy, a few
        µs), else a 0-d float64 tensor on the device (no synchronisation)."""
        b = self.block
        j = c // b
        seg = self.order[j * b: c]
        w = self.weight
        if self._host_path():
            flat = self.__dict__.get("_flat_np")
            if flat is None:
                flat = w.reshape(-1).view(torch.int16).numpy() if w.dtype == torch.bfloat16 else \
                    w.reshape(-1).numpy()
                self.__dict__["_flat_np"] = flat
            vals = flat[seg.numpy()]
            if w.dtype == torch.bfloat16:  # bfloat16 = the upper half of a float32
                vals = (vals.astype(np.int32) << 16).view(np.float32)
            vals = vals.astype(np.float64)
            return float(self.csum.numpy()[j]) + float(np.dot(vals, vals))
        vals = self.gather_weights(seg).to(torch.float64)
        return self.csum[j] + torch.dot(vals, vals)

    def pruned_w2(self, counts: torch.Tensor) -> torch.Tensor:
        """``Σ w²`` of the ``counts[p]`` first weights in the order, ``counts: (P,)`` int64 on the device →
        ``(P,)`` float64: the stored block sum plus fewer than ``block`` weights gathered through the order."""
        n, b = self.numel, self.block
        if n == 0:
            return torch.zeros(counts.shape, dtype=torch.float64, device=counts.device)
        j = torch.div(counts, b, rounding_mode="floor")
        pos = (j * b)[:, None] + torch.arange(b, device=counts.device)[None, :]
        inside = pos < counts[:, None]
        vals = self.gather_weights(self.order[pos.clamp_max_(n - 1)]).to(torch.float64)
        return self.csum[j] + (vals * vals * inside).sum(1)


def _nan_error(name):
    return ValueError(f"scores of layer {name!r} contain NaN; check the weights and data of that layer.")


def _check_keys(name, keys: SortedKeys):
    """NaN scores map to keys outside [key(-inf), key(+inf)]; sorted, they sit at either end."""
    if keys.n and (keys.first < _KEY_NEG_INF or keys.last > _KEY_POS_INF):
        raise _nan_error(name)


def _flat_scores(s: torch.Tensor, score_dtype) -> torch.Tensor:
    s = s.detach().reshape(-1)
    if score_dtype is not None and s.is_floating_point() and s.dtype != score_dtype:
        s = s.to(score_dtype)  # rounded to bfloat16: a coarser ranking, ties broken by position
    return s


def _sort_cpu(box: list):
    """Stable argsort of the int32 keys in ``box`` (a one-element list, emptied) on the CPU: ``torch.sort(stable)``
    of the int32 keys (a radix sort of integer keys: at one thread 24 ns per key for 2.4 M keys and 42 ns for 102 M,
    where numpy's comparison sort of ``key << 32 | index`` took 67 and 104 ns). The int64 indices it returns live
    only until they are narrowed to the int32 order. Returns ``(order int32 tensor, SortedKeys)``."""
    keys = box.pop()
    sorted_keys, idx = torch.sort(keys, stable=True)
    del keys
    order = idx.to(torch.int32)
    del idx
    return order, SortedKeys(sorted_keys.numpy()), sorted_keys


def _sort_torch(box: list):
    """Stable argsort of the int32 keys in ``box`` (a one-element list, emptied) with ``torch.sort`` where they
    live (a GPU): the order stays there, the sorted keys come to the host once (compressed there). Returns
    ``(order, SortedKeys)``."""
    keys = box.pop()
    n = keys.numel()
    sorted_keys, idx = torch.sort(keys, stable=True)
    del keys
    order = idx.to(torch.int32) if n < 2**31 else idx
    del idx
    return order, SortedKeys(sorted_keys.cpu().numpy()), sorted_keys


def _are_magnitudes(scores: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether flat float32 ``scores`` are exactly ``|w|`` (a sample first, then every entry, piece by piece)."""
    if scores.dtype != torch.float32 or scores.shape != w.shape or scores.device != w.device or not w.numel():
        return False
    step = max(1, w.numel() // 64)
    if not torch.equal(scores[::step], w[::step].abs().to(torch.float32)):
        return False
    return all(torch.equal(scores[a:a + _CHUNK], w[a:a + _CHUNK].abs().to(torch.float32))
               for a in range(0, w.numel(), _CHUNK))


def _block_sums(w: torch.Tensor, order: torch.Tensor, block: int, in_order: torch.Tensor | None = None):
    """``(csum (n // block + 1,) float64, Σ w² (0-d float64))`` of ``w`` (flat) in ``order``, piece by piece.
    ``in_order``: the values ``±w[order]`` already in that order (the sorted ``|w|`` of magnitude scores), read
    instead of gathering ``w`` through the order (a random access that misses the cache on big layers)."""
    n = order.numel()
    nb = n // block
    sums = torch.empty(nb, dtype=torch.float64, device=order.device)
    total = torch.zeros((), dtype=torch.float64, device=order.device)
    step = max(block, (_CHUNK // block) * block)
    for a in range(0, n, step):
        b = min(a + step, n)
        g = (w.index_select(0, order[a:b]) if in_order is None else in_order[a:b]).to(torch.float64)
        g.mul_(g)
        full = (b - a) // block
        if full:
            sums[a // block: a // block + full] = g[: full * block].view(full, block).sum(1)
        if full * block < b - a:
            total += g[full * block:].sum()
        del g
    csum = torch.zeros(nb + 1, dtype=torch.float64, device=order.device)
    torch.cumsum(sums, 0, out=csum[1:])
    return csum, total + csum[-1]


def _to_host(parts: list) -> np.ndarray:
    """Concatenate 1-d tensors (on one device or several) into one float64 host array: one transfer per device."""
    devices = {p.device for p in parts}
    if len(devices) == 1:
        return torch.cat(parts).cpu().numpy()
    return np.concatenate([p.cpu().numpy() for p in parts])


def _flat_weight(w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    return w.view(-1) if w.is_contiguous() else w.reshape(-1)


def _queries(ls: np.ndarray):
    """``form -> queries``: the lower halves ``ls`` (int64) as search values for a :meth:`SortedKeys.lower_segment`
    of that form (plain int32 keys of an upper half, or lower halves shifted and narrowed), each form made once."""
    made: dict = {}

    def get(form):
        q = made.get(form)
        if q is None:
            q = (form[1] | ls).astype(np.int32) if form[0] == "plain" else (ls >> form[0]).astype(form[1])
            made[form] = q
        return q

    return get


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
        self._table = None  # (g0, counts): keys of all layers whose upper half is at most g0 + j (built lazily)

    def _upper_table(self):
        if self._table is None:
            keys = [k_ for k_ in self._keys if k_.n]
            g0, g1 = min(k_.first for k_ in keys) >> 16, max(k_.last for k_ in keys) >> 16
            table = np.zeros(g1 - g0 + 1, dtype=np.int64)
            for k_ in keys:
                k_.add_upper_counts(table, g0)
            self._table = (g0, table)
        return self._table

    @classmethod
    def from_scores(cls, names, scores: dict, weights: dict, *, score_dtype=None, consume: bool = False,
                    block: int = BLOCK) -> "Ranking":
        """Sort ``scores`` (``{name: Tensor}``, any shape) layer by layer; ``weights`` of the same shapes give the
        cumulative ``w²`` (and are referenced by the ranking). ``score_dtype``: ``None`` ranks the scores at their
        own precision (float32 at most); ``torch.bfloat16`` rounds other float scores to bfloat16 first (keys of
        no bytes per weight; the ranking of the rounded scores, ties broken by position). ``consume``: drop each
        layer's scores from ``scores`` once ranked (the dict is emptied), so that the scores and the ranking are
        never both held whole.

        Layer after layer, the temporaries (keys, the sort's output, pieces of ``w²``) are freed before the next.
        The sort is ``torch.sort(stable=True)`` of the int32 keys where they live.
        """
        layers, totals = {}, []
        for name in names:
            s = _flat_scores(scores.pop(name) if consume else scores[name], score_dtype)
            shape = tuple(weights[name].shape)
            n = s.numel()
            w = weights[name].detach()
            magnitudes = _are_magnitudes(s, _flat_weight(w))
            box = [ordered_int32(s)]  # handed over in a list: the sort frees the keys as soon as it has read them
            del s
            order, sk, sorted_keys = (_sort_cpu if box[0].device.type == "cpu" and n < 2**31 else _sort_torch)(box)
            _check_keys(name, sk)
            # scores |w|: the sorted keys are the float bits of |w| in order, so w² needs no gather through the order
            in_order = sorted_keys.view(torch.float32) if magnitudes else None
            del sorted_keys
            csum, total = _block_sums(_flat_weight(w), order, block, in_order)
            del in_order
            layers[name] = LayerRank(order, csum, sk, shape, w, 0.0, block)
            totals.append(total)
        if totals:  # one transfer for every layer's ‖W‖²
            for n, t in zip(names, torch.stack(totals).cpu().tolist()):
                layers[n].norm2 = float(t)
        return cls(names, layers)

    def with_sorted_values(self, values: dict, *, score_dtype=None, consume: bool = False) -> "Ranking":
        """A ranking with the same orders (and cumulative sums, shared, not copied) and new sorted score values
        ``{name: (n,) non-decreasing}``: for scores known to rank weights in this ranking's order (LAMP).
        ``score_dtype`` and ``consume`` as in :meth:`from_scores`."""
        layers = {}
        for n in self.names:
            v = _flat_scores(values.pop(n) if consume else values[n], score_dtype)
            keys = ordered_int32(v)
            del v
            host = keys.cpu().numpy()
            del keys
            if host.size and np.any(host[1:] < host[:-1]):
                if host.min() < _KEY_NEG_INF or host.max() > _KEY_POS_INF:
                    raise _nan_error(n)
                raise ValueError(f"sorted values of layer {n!r} are not non-decreasing.")
            sk = SortedKeys(host)
            del host
            _check_keys(n, sk)
            lr = self.layers[n]
            layers[n] = LayerRank(lr.order, lr.csum, sk, lr.shape, lr.weight, lr.norm2, lr.block)
        return Ranking(self.names, layers)

    def subset(self, names) -> "Ranking":
        """The ranking of some layers only (shares their arrays): a global threshold over those layers."""
        return Ranking(list(names), {n: self.layers[n] for n in names})

    # ------------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held (orders, cumulative sums, keys and, once built, the global count table; shared tensors
        counted in each ranking; the referenced weights not counted)."""
        return sum(lr.nbytes for lr in self.layers.values()) + (self._table[1].nbytes if self._table else 0)

    def global_counts(self, k: int) -> np.ndarray:
        """Per-layer number of weights among the ``k`` lowest scores of all layers (ties: earlier layer, then
        earlier position, as a stable sort of the concatenated scores would give). The threshold's upper key half
        comes from one ``searchsorted`` in a table of all layers' counts per upper half (built on first use: 8
        bytes per distinct upper half, at most 512 KiB), its lower half four bits at a time, each step one
        vectorised ``searchsorted`` (16 candidates) per layer holding keys of that upper half; host memory only, no
        device synchronisation.
        """
        k = int(k)
        if k <= 0:
            return np.zeros(len(self.names), dtype=np.int64)
        if k >= self.total:
            return self.sizes.copy()
        g0, table = self._upper_table()
        h = g0 + int(np.searchsorted(table, k, side="left"))  # smallest upper half h with #(upper <= h) >= k
        segments = [k_.lower_segment(h) for k_ in self._keys]
        # layers without keys in h's bucket (or without lower halves) count a constant; the others are searched
        # inside the bucket's lower halves
        const = sum(b for _, b, seg, _ in segments if seg is None)
        active = [(a, seg, form) for a, _, seg, form in segments if seg is not None]
        # the smallest lower half l with #(key <= h:l) >= k, four bits at a time: 16 candidates per layer and step
        lo = 0
        for shift in (12, 8, 4, 0):
            queries = _queries((((lo << 4) | _NIBBLE) << shift) | ((1 << shift) - 1))
            total = np.full(16, const + sum(a for a, _, _ in active), dtype=np.int64)
            for _, seg, form in active:
                total += seg.searchsorted(queries(form), "right")
            lo = (lo << 4) | int(np.searchsorted(total, k, side="left"))
        queries = _queries(np.array([lo - 1, lo] if lo else [0, 0], dtype=np.int64))
        le, lt = [], []
        for a, b, seg, form in segments:
            if seg is None:  # keys < h:lo: below the bucket, plus (no lower halves stored: all are h:0) the bucket
                le.append(b)
                lt.append(a if lo == 0 else b)
            else:
                below, at = seg.searchsorted(queries(form), "right")
                le.append(a + int(at))
                lt.append(a + int(below) if lo else a)
        le, lt = np.asarray(le, dtype=np.int64), np.asarray(lt, dtype=np.int64)
        eq = le - lt
        before = np.cumsum(eq) - eq
        take = np.clip(k - int(lt.sum()) - before, 0, eq)
        return lt + take

    def critical_count(self) -> int:
        """Number of weights scoring below ``t* = min over layers of the layer's highest score``: pruning more than
        this under a global threshold empties a layer (critical sparsity = this ÷ total)."""
        keys = [k_ for k_ in self._keys if k_.n]
        t = min(k_.last for k_ in keys)
        return int(sum(k_.count_lt(t) for k_ in keys))

    def frobenius(self, counts) -> np.ndarray:
        """``‖W − M⊙W‖_F`` per layer when the ``counts[l]`` lowest-scoring weights of layer l are pruned. Computed
        where the ranking lives, with one transfer to the host for all layers."""
        out = np.asarray([self.layers[n].norm2 for n in self.names], dtype=np.float64)
        part = [(i, self.layers[n], int(c)) for i, (n, c) in enumerate(zip(self.names, counts))
                if int(c) < self.layers[n].numel]
        on_device = []
        for i, lr, c in part:
            v = lr.pruned_w2_one(c)
            if isinstance(v, torch.Tensor):
                on_device.append((i, v.reshape(1)))
            else:
                out[i] = v
        if on_device:
            out[[i for i, _ in on_device]] = _to_host([v for _, v in on_device])
        return np.sqrt(np.maximum(out, 0.0))

    def weight_norms(self) -> np.ndarray:
        """``‖W‖_F`` per layer (kept on the host: no device access)."""
        return np.sqrt(np.asarray([self.layers[n].norm2 for n in self.names], dtype=np.float64))

    def frobenius_curve(self, counts) -> np.ndarray:
        """Distortion for many count vectors at once: ``counts: (points, layers) → (points, layers)``; one transfer
        to the host."""
        counts = np.asarray(counts, dtype=np.int64)
        if not self.names:
            return np.zeros(counts.shape, dtype=np.float64)
        cols = []
        for j, n in enumerate(self.names):
            lr = self.layers[n]
            cols.append(lr.pruned_w2(torch.as_tensor(np.minimum(counts[:, j], lr.numel), device=lr.order.device)))
        return np.sqrt(np.maximum(_to_host(cols).reshape(len(cols), -1).T, 0.0)).reshape(counts.shape)

    def masks(self, counts, device=None) -> dict:
        """``{name: BoolTensor}`` (True = kept) pruning the ``counts[l]`` lowest-scoring weights of each layer,
        built where the ranking lives (then moved to ``device`` if given)."""
        out = {}
        for n, c in zip(self.names, counts):
            lr = self.layers[n]
            c = int(c)
            # scattered writes for the smaller side only (the kept weights at high sparsity), int64 indices a
            # piece at a time
            pruned_side = c <= lr.numel - c
            m = torch.full((lr.numel,), pruned_side, dtype=torch.bool, device=lr.order.device)
            a, b = (0, c) if pruned_side else (c, lr.numel)
            for i in range(a, b, _CHUNK):
                m.index_fill_(0, lr.order[i:min(i + _CHUNK, b)].long(), not pruned_side)
            m = m.reshape(lr.shape)
            out[n] = m.to(device) if device is not None else m
        return out
