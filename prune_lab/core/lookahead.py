"""The lookahead distortion, fast enough to follow a slider on ResNet-50: Gram factors cached once per weights.

The lookahead distortion of layer i (:func:`prune_lab.core.distortion.lookahead_distortion`) is a quadratic form
of the layer's change ``D`` (per kernel tap ``D_t``, grouped convolutions expanded):

    f(D) = Σ_{p,c} Σ_t ‖C_c D_t P_p‖²_F = Σ_t tr(A D_t B D_tᵀ),   A = Σ_c C_cᵀ C_c  (out×out),  B = Σ_p P_p P_pᵀ  (in×in)

``A`` and ``B`` depend only on the dense neighbours (not on the method or the sparsity), so they are computed once
per weights; an identity neighbour (the model's input or output, an operation the graph does not see through)
makes a diagonal, kept as a vector. For any reference change ``D_a`` with ``Y_a = A D_a B`` and ``f_a = f(D_a)``,

    f(D) = f_a + 2 ⟨Y_a, Δ⟩ + f(Δ),   Δ = D − D_a,

and ``f(Δ)`` of a sparse ``Δ`` costs ``nnz(Δ) · (out + in)`` (``Δ B`` as a sparse product, then ``A (Δ B)`` only
at Δ's entries: a sampled product; on ``Δᵀ`` for a layer with more inputs than outputs, so that the larger factor
is the one whose rows the sampled product reuses) instead of the dense ``out · in · (out + in)``. Three kinds of
reference serve:
nothing removed (``D_a = 0``), everything removed (``D_a = W``, ``Y_W`` also gives the full-layer distortion that
relative lookahead divides by) and the last few dense evaluations (per layer, least recently used dropped first).
The nearest reference is used whenever ``Δ`` has fewer than :data:`SPARSE_FRACTION` of the layer's entries, so
sparsities near 0 and near 1 and small slider moves cost a fraction of a dense product; otherwise one dense product
is made and kept as a new reference. (A sparse step costs about ten times more per multiply-add than a dense
product, but a lower threshold than that break-even keeps the references nearer where the slider is: on ResNet-50
slider moves, 3–5 % took about 10 % less time than 8 %.) Every path is exact (float32 products, float64 sums):
tests compare it with :func:`~prune_lab.core.distortion.lookahead_distortion`.

Memory per layer: ``A`` and ``B`` (out² + in² floats, vectors for identity neighbours), ``Y_W`` and the weight's
tap layout (a float per weight each) and up to ``max_references`` references (a float and a bool per weight each:
4 for one method per layer and a few at once, fewer when they would take more than ``reference_bytes`` in all).
On ResNet-50 that is about 0.9 GB with four references per layer.
"""
from __future__ import annotations

import warnings

import torch

from .distortion import consumer_matrix, per_tap, producer_matrix
from .graph import LayerGraph, Link

CHUNKS = 8  # a dense product that may be stopped is made in this many slices per side
_CHUNKED_FROM = 1 << 16  # smaller layers are computed in one go
SPARSE_FRACTION = 0.04  # below this fraction of changed entries, the sparse path is cheaper than a dense product


def _gram(parts: list, n: int) -> torch.Tensor:
    """Σ of Gram matrices (``(n, n)``) or, when every part is a diagonal, their sum as a vector ``(n,)``."""
    mats = [p for p in parts if p.dim() == 2]
    diag = sum((p for p in parts if p.dim() == 1), torch.zeros(n))
    if not mats:
        return diag
    out = sum(mats[1:], mats[0].clone())
    out.diagonal().add_(diag.to(out.device))
    return out


def layer_factors(graph: LayerGraph, weights: dict, name: str, scales: dict | None = None) -> tuple:
    """``(A, B, L, M)`` of layer ``name``: ``A`` ``(out, out)`` or ``(out,)`` (diagonal), ``B`` ``(in, in)`` or
    ``(in,)``; ``L`` (``(r, out)``, ``A = LᵀL``) and ``M`` (``(in, r')``, ``B = MMᵀ``) are the stacked neighbour
    matrices when they are thin enough to make a dense product cheaper (``2r < out``; e.g. a transformer MLP's
    first layer, whose one consumer has a quarter of its rows), else ``None``; ``A`` (``B``) is ``None`` when ``L``
    (``M``) stands for it (:class:`LayerLookahead` forms it only if a sparse change needs it)."""
    scales = scales or {}
    layer = graph.layers[name]
    rows, cols, row_mats, col_mats = [], [], [], []
    for link in graph.producers.get(name) or [Link(None)]:
        pm, pv = producer_matrix(link, layer.n_in, graph, weights, scales)
        cols.append(pm if pm is not None else pv.float().pow(2).cpu())
    for link in graph.consumers.get(name) or [Link(None)]:
        cm, cv = consumer_matrix(link, layer.n_out, graph, weights, scales)
        rows.append(cm if cm is not None else cv.float().pow(2).cpu())
    dev = weights[name].device
    left = torch.cat(rows, 0) if all(m.dim() == 2 for m in rows) else None
    right = torch.cat(cols, 1) if all(m.dim() == 2 for m in cols) else None
    left = left.to(dev) if left is not None and 2 * left.shape[0] < layer.n_out else None
    right = right.to(dev) if right is not None and 2 * right.shape[1] < layer.n_in else None
    a = _gram([m.T @ m if m.dim() == 2 else m for m in rows], layer.n_out).to(dev) if left is None else None
    b = _gram([m @ m.T if m.dim() == 2 else m for m in cols], layer.n_in).to(dev) if right is None else None
    return a, b, left, right


def _left(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.unsqueeze(1) * x if a.dim() == 1 else torch.matmul(a, x)


def _right(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x * b if b.dim() == 1 else torch.matmul(x, b)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)).double()) if a.numel() < 2 ** 24 else \
        float((a.double() * b.double()).sum())


class LayerLookahead:
    """The lookahead quadratic form of one layer, with its references (see the module docstring).

    ``weight``: the layer's weight (``(out, in/groups, *kernel)``); ``groups``: its convolution groups.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, groups: int = 1,
                 max_references: int = 4, left: torch.Tensor | None = None, right: torch.Tensor | None = None,
                 stop=None):
        self.left, self.right = left, right  # thin factors of A and B (see layer_factors), or None
        self._a, self._b, self.groups = a, b, groups
        self.weight = weight.detach().float()
        self.w = per_tap(self.weight, groups)  # (T, out, in)
        self.max_references = max_references
        self.y_full = self.apply(self.w, stop)
        self.full_sq = max(_dot(self.y_full, self.w), 0.0)
        self.references: list = []  # [(removed mask, Y_a, f_a)], most recent first
        self.ordered: list = []  # [(order, k, Y_a, f_a)]: the first k of a pruning order removed, most recent first
        self.paths = {"dense": 0, "sparse": 0}  # how each value was computed (for tests and benchmarks)

    @property
    def a(self) -> torch.Tensor:
        if self._a is None:
            self._a = self.left.T @ self.left
        return self._a

    @property
    def b(self) -> torch.Tensor:
        if self._b is None:
            self._b = self.right @ self.right.T
        return self._b

    @property
    def numel(self) -> int:
        return self.weight.numel()

    def apply(self, x: torch.Tensor, stop=None) -> torch.Tensor:
        """``A x_t B`` for every tap: ``(T, out, in) → (T, out, in)`` (through the thin factors when present).
        ``stop``: a ``threading.Event``; a large layer is computed in slices (a tap each, or for one tap
        :data:`CHUNKS` column blocks of ``B`` then row blocks of ``A``: products as fast as the whole) and
        :class:`Interrupted` is raised between slices once it is set."""
        taps, n_out, n_in = x.shape
        if stop is None or x.numel() < _CHUNKED_FROM:
            return self._a_side(self._b_side(x))
        _check(stop)
        x = x.contiguous()  # per_tap of a convolution is a strided view: one copy, not one per slice
        if self.right is not None or self.b.dim() == 1:  # a thin factor or a diagonal: cheap in one go
            xb = self._b_side(x)
        else:
            xb = torch.empty_like(x)
            for part in range(taps) if taps > 1 else _slices(n_in):
                _check(stop)
                if taps > 1:
                    torch.matmul(x[part], self.b, out=xb[part])
                else:
                    xb[..., part] = torch.matmul(x, self.b[:, part])
        _check(stop)
        if self.left is not None or self.a.dim() == 1:
            return self._a_side(xb)
        y = torch.empty_like(x)
        for part in range(taps) if taps > 1 else _slices(n_out):
            _check(stop)
            if taps > 1:
                torch.matmul(self.a, xb[part], out=y[part])
            else:
                y[:, part] = torch.matmul(self.a[part], xb)
        return y

    def _b_side(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(x, self.right), self.right.T) if self.right is not None else _right(x, self.b)

    def _a_side(self, x: torch.Tensor) -> torch.Tensor:
        return _left(self.a, x) if self.left is None else torch.matmul(self.left.T, torch.matmul(self.left, x))

    def _coordinates(self, flat: torch.Tensor) -> tuple:
        """Weight-layout flat indices → ``(tap, out, in)`` of the expanded tap matrices."""
        shape = self.weight.shape
        in_g = shape[1]
        taps = self.weight[0, 0].numel() if self.weight.dim() > 2 else 1
        o = flat // (in_g * taps)
        rest = flat % (in_g * taps)
        i, t = rest // taps, rest % taps
        if self.groups > 1:
            i = (o // (shape[0] // self.groups)) * in_g + i
        return t, o, i

    @property
    def transposed(self) -> bool:
        """Whether :meth:`quadratic_sparse` works on ``Δ_tᵀ`` (``f = Σ_t tr(B Δ_tᵀ A Δ_t)``): when the layer has
        more inputs than outputs, so that the larger factor is the one whose rows the sampled product reuses and the
        sparse product reads the smaller one (e.g. a 2048-input 1×1 convolution: 20–30 % less time)."""
        return self.w.shape[2] > self.w.shape[1]

    def quadratic_sparse(self, t: torch.Tensor, o: torch.Tensor, i: torch.Tensor, v: torch.Tensor) -> float:
        """``f(Δ)`` of the sparse change with entries ``v`` at ``(t, o, i)``: ``Σ_t Σ_{(o,i) ∈ Δ_t} δ_oi
        (A Δ_t B)_oi``, the products formed at Δ's entries only (see :func:`_sparse_form`), on ``Δ_t`` or, for a
        layer with more inputs than outputs, on ``Δ_tᵀ`` (:attr:`transposed`)."""
        taps, n_out, n_in = self.w.shape
        if self.transposed:
            return _sparse_form(t, i, o, v, taps, n_in, n_out, self.b, self.a)
        return _sparse_form(t, o, i, v, taps, n_out, n_in, self.a, self.b)

    def _step(self, idx: torch.Tensor, v: torch.Tensor, y: torch.Tensor | None = None, f: float = 0.0) -> float:
        """``f(D_a + Δ) = f_a + 2⟨Y_a, Δ⟩ + f(Δ)`` for ``Δ`` = ``v`` at flat positions ``idx``, from the reference
        ``(Y_a, f_a)`` (none: nothing removed)."""
        t, o, i = self._coordinates(idx)
        cross = 0.0 if y is None else 2 * _dot(y[t, o, i], v)
        return max(f + cross + self.quadratic_sparse(t, o, i, v), 0.0)

    def _from_an_end(self, k: int, removed_idx, kept_idx):
        """From "nothing removed" (Δ = W ⊙ R) or "everything removed" (Δ = −W ⊙ K) when either is near enough, else
        None. ``removed_idx()`` / ``kept_idx()``: the flat positions of R and K."""
        n = self.numel
        if min(k, n - k) > SPARSE_FRACTION * n:
            return None
        self.paths["sparse"] += 1
        flat_w = self.weight.reshape(-1)
        if k <= n - k:
            idx = removed_idx()
            return self._step(idx, flat_w[idx])
        idx = kept_idx()
        return self._step(idx, -flat_w[idx], self.y_full, self.full_sq)

    def _dense(self, removed: torch.Tensor, stop=None) -> tuple:
        """``(Y, f)`` of ``D = W ⊙ R`` (``removed``: bool, weight layout) by dense products."""
        self.paths["dense"] += 1
        d = per_tap(self.weight * removed, self.groups)
        y = self.apply(d, stop)
        return y, max(_dot(y, d), 0.0)

    def _keep(self, refs: list, entry: tuple):
        if self.max_references > 0:
            refs.insert(0, entry)
            del refs[self.max_references:]

    def value_removed(self, removed: torch.Tensor, k: int | None = None, stop=None) -> float:
        """``f(W ⊙ R)`` for the bool mask ``R`` of removed weights (weight layout; ``k``: how many, when known):
        the squared lookahead distortion of plain pruning, from the nearest reference."""
        removed = removed.to(self.weight.device, torch.bool)
        flat = removed.reshape(-1)
        k = int(removed.sum()) if k is None else int(k)
        hit = self._from_an_end(k, lambda: flat.nonzero().squeeze(1), lambda: (~flat).nonzero().squeeze(1))
        if hit is not None:
            return hit
        flat_w = self.weight.reshape(-1)
        sample = self._sample()
        for r, (ref, y, f) in enumerate(self.references):
            # a cheap look first: a reference more than twice the threshold away on a fixed sample is skipped
            if sample is not None and int((flat[sample] != ref.reshape(-1)[sample]).sum()) > \
                    2 * SPARSE_FRACTION * sample.numel():
                continue
            changed = flat != ref.reshape(-1)
            if int(changed.sum()) <= SPARSE_FRACTION * self.numel:
                self.paths["sparse"] += 1
                self.references.insert(0, self.references.pop(r))
                idx = changed.nonzero().squeeze(1)
                return self._step(idx, torch.where(flat[idx], flat_w[idx], -flat_w[idx]), y, f)
        y, f = self._dense(removed, stop)
        self._keep(self.references, (removed.clone(), y, f))
        return f

    def value_ordered(self, order: torch.Tensor, k: int, stop=None) -> float:
        """``f(W ⊙ R)`` where ``R`` is the first ``k`` weights of ``order`` (flat indices, a cached ranking's pruning
        order): the change from the nearest of "nothing removed", "everything removed" and the references on the
        same order is a slice of the order, found without scanning the layer."""
        k, n = int(k), self.numel
        # (entries that differ, which): -1 nothing removed, -2 everything removed, j ≥ 0 self.ordered[j]
        near, j = min([(k, -1), (n - k, -2)] + [(abs(k - r[1]), j) for j, r in enumerate(self.ordered)
                                                 if r[0] is order])
        if near <= SPARSE_FRACTION * n:
            self.paths["sparse"] += 1
            flat_w = self.weight.reshape(-1)
            if j == -1:
                idx = order[:k].long()
                return self._step(idx, flat_w[idx])
            if j == -2:
                idx = order[k:].long()
                return self._step(idx, -flat_w[idx], self.y_full, self.full_sq)
            _, k_ref, y, f = self.ordered[j]
            self.ordered.insert(0, self.ordered.pop(j))
            idx = order[min(k, k_ref):max(k, k_ref)].long()
            return self._step(idx, flat_w[idx] if k > k_ref else -flat_w[idx], y, f)  # newly removed, or given back
        if k <= n - k:  # the smaller side is written
            removed = torch.zeros(n, dtype=torch.bool, device=self.weight.device)
            removed[order[:k].long()] = True
        else:
            removed = torch.ones(n, dtype=torch.bool, device=self.weight.device)
            removed[order[k:].long()] = False
        y, f = self._dense(removed.reshape(self.weight.shape), stop)
        self._keep(self.ordered, (order, k, y, f))
        return f

    def _sample(self):
        """A fixed sample of 4,096 positions of the layer (None for small layers, compared whole)."""
        if self.numel <= 1 << 14:
            return None
        if getattr(self, "_sample_idx", None) is None:
            g = torch.Generator().manual_seed(0)
            self._sample_idx = torch.randint(0, self.numel, (4096,), generator=g).to(self.weight.device)
        return self._sample_idx

    def value(self, change: torch.Tensor, stop=None) -> float:
        """``f(D)`` for any change ``D`` of the weight (weight layout; e.g. with updated kept weights): dense."""
        self.paths["dense"] += 1
        d = per_tap(change.float(), self.groups)
        return max(_dot(self.apply(d, stop), d), 0.0)

    def nbytes(self) -> int:
        tensors = [self.y_full, self.w] + [t for r in self.references for t in r[:2]] + [r[2] for r in self.ordered]
        tensors += [t for t in (self._a, self._b, self.left, self.right) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def _sparse_form(t: torch.Tensor, r: torch.Tensor, c: torch.Tensor, v: torch.Tensor, taps: int, n_r: int,
                 n_c: int, left: torch.Tensor, right: torch.Tensor) -> float:
    """``Σ_t Σ_{(r,c) ∈ X_t} x_rc (L X_t R)_rc`` for sparse ``X_t`` (``n_r × n_c``) with entries ``v`` at
    ``(t, r, c)``; ``L``, ``R`` symmetric (``(n, n)``) or diagonal (``(n,)``). ``X_t R`` for all taps as one sparse
    product of the taps stacked by rows, then ``L (X_t R)`` sampled at ``X_t``'s entries, tap by tap: ``nnz · (n_r +
    n_c)`` multiply-adds instead of a dense product's ``taps · n_r · n_c · (n_r + n_c)``."""
    rows = t * n_r + r
    order = torch.argsort(rows * n_c + c)  # by tap, then (r, c): CSR order, each tap's entries together
    t, r, c, v, rows = t[order], r[order], c[order], v[order], rows[order]
    if right.dim() == 1:  # X_t R: X_t with its columns scaled
        z = torch.zeros(taps * n_r, n_c, device=v.device)
        z[rows, c] = v * right[c]
    else:
        z = _csr(rows, c, v, taps * n_r, n_c) @ right  # (T·n_r, n_c), dense
    if left.dim() == 1:
        return _dot(v * left[r], z[rows, c])
    z = z.reshape(taps, n_r, n_c)
    bounds = torch.searchsorted(t, torch.arange(taps + 1, device=t.device)).tolist() if taps > 1 else [0, len(v)]
    total = 0.0
    for tap in range(taps):  # L (X_t R) at X_t's entries, on a view of Z: no copy
        a, b = bounds[tap], bounds[tap + 1]
        if a == b:
            continue
        vv = v[a:b]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            sampled = torch.sparse.sampled_addmm(_csr(r[a:b], c[a:b], vv, n_r, n_c), left, z[tap], beta=0.0)
        total += _dot(sampled.values(), vv)
    return total


class Interrupted(Exception):
    """Raised inside a dense product when its ``stop`` event is set (see :meth:`LayerLookahead.apply`)."""


def _slices(n: int) -> list:
    return [slice(i, i + -(-n // CHUNKS)) for i in range(0, n, -(-n // CHUNKS))]


def _check(stop):
    if stop.is_set():
        raise Interrupted


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int):
    """A CSR matrix from entries sorted by ``(row, col)``."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, (n_rows, n_cols))


class LookaheadCache:
    """Lookahead distortions of every layer of one set of weights, factors built on first use per layer.

    >>> from torch import nn
    >>> from prune_lab.core.graph import build_graph
    >>> m = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    >>> w = {n: p.detach() for n, p in m.named_parameters()}
    >>> c = LookaheadCache(build_graph(m), w)
    >>> keep, drop = torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 3, dtype=torch.bool)
    >>> c.distortion("0.weight", keep) == 0.0, round(c.distortion("0.weight", drop), 4) == round(c.full("0.weight"), 4)
    (True, True)
    """

    def __init__(self, graph: LayerGraph, weights: dict, scales: dict | None = None, *,
                 max_references: int | None = None, reference_bytes: int = 3 << 29):
        self.graph, self.weights, self.scales = graph, weights, scales or {}
        if max_references is None:  # a reference costs 5 bytes per weight: as many as fit in reference_bytes, ≤ 4
            total = sum(weights[n].numel() for n in graph.prunable if n in weights)
            max_references = int(min(4, reference_bytes // max(5 * total, 1)))
        self.max_references = max_references
        self.layers: dict = {}
        self._factors: dict = {}  # a layer's (A, B, L, M) while its first visit is not complete

    def layer(self, name: str, stop=None) -> LayerLookahead:
        hit = self.layers.get(name)
        if hit is None:
            # the factors are kept apart until the layer is complete: a first visit stopped in Y_W keeps them
            if name not in self._factors:
                self._factors[name] = layer_factors(self.graph, self.weights, name, self.scales)
            a, b, left, right = self._factors[name]
            hit = self.layers[name] = LayerLookahead(a, b, self.weights[name], self.graph.layers[name].groups,
                                                     self.max_references, left, right, stop)
            del self._factors[name]
        return hit

    def full(self, name: str) -> float:
        """``‖W₊ W W₋‖``: the lookahead distortion of removing the whole layer."""
        return self.layer(name).full_sq ** 0.5

    def distortion(self, name: str, mask: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                   n_removed: int | None = None, order: torch.Tensor | None = None, stop=None) -> float:
        """``‖W₊ (W − W̃) W₋‖`` of layer ``name`` pruned by ``mask`` (bool, True = kept; ``W̃ = M ⊙ W``; ``n_removed``:
        its count of False, when known; ``order``: when the mask removes the first ``n_removed`` weights of this
        pruning order, a cached ranking's, which finds the change from a reference without a scan) or, when the
        method updates kept weights, for the new weight ``weight`` (``W̃``; computed densely). ``stop``: a
        ``threading.Event``; a dense product raises :class:`Interrupted` between its slices once it is set."""
        layer = self.layer(name, stop)  # kept only once complete: a stopped first visit leaves nothing behind
        if weight is None and order is not None and n_removed is not None:
            return layer.value_ordered(order, n_removed, stop) ** 0.5
        if weight is not None:
            w = self.weights[name].detach()
            return layer.value(w.float() - weight.detach().to(w.device).float(), stop) ** 0.5
        return layer.value_removed(~mask.to(torch.bool), n_removed, stop) ** 0.5

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())
