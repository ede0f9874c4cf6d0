"""One layer's sorted scores as int32 keys: :func:`ordered_int32` maps float scores to int32 keys of the same order,
and :class:`SortedKeys` stores a layer's sorted keys losslessly in host memory — a table of counts per upper 16
bits plus the lower 16 bits per key (2 bytes per key for float32 scores, 1 for float16, none for bfloat16) — with
the counts below a key that the rankings' threshold search (:mod:`prune_lab.core.ranking`) reads.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

__all__ = ["SortedKeys", "ordered_int32"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_LITTLE = sys.byteorder == "little"


def ordered_int32(values: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int32 keys with the same order (``-0.0`` and ``0.0`` equal). ``(n,) → (n,)``.

    >>> ordered_int32(torch.tensor([-2.0, -0.5, 0.0, 1.5])).diff().gt(0).all().item()
    True
    """
    # a buffer of our own (changed in place below); -0.0 + 0.0 == +0.0
    v = torch.add(values, 0.0) if values.dtype == torch.float32 else values.to(torch.float32).add_(0.0)
    bits = v.view(torch.int32)
    flip = bits >> 31  # -1 where negative, else 0
    flip &= 0x7FFFFFFF
    bits ^= flip  # negative floats: reverse their order below the positive ones
    return bits



class SortedKeys:
    """One layer's sorted int32 keys (non-decreasing, ``n`` of them), stored losslessly in host memory.

    Sorted keys have non-decreasing upper 16 bits (``key >> 16``), so unless plain int32 keys are smaller, a table
    ``starts[j]`` = number of keys whose upper half is below ``h0 + j`` replaces them, and the lower 16 bits are
    kept per key, shifted right by the trailing zero bits they all share: 2 bytes per key for float32 scores, 1
    for float16 scores, none for bfloat16 scores. :meth:`count_le` is then a table lookup plus a ``searchsorted``
    inside one upper half.

    >>> k = SortedKeys(np.arange(-3, 300_000, 3, dtype=np.int32))
    >>> k.count_le(0), k.count_le(-4), k.count_le(10**9), np.array_equal(k.array(), np.arange(-3, 300_000, 3))
    (2, 0, 100001, True)
    """

    __slots__ = ("n", "first", "last", "plain", "h0", "starts", "lo", "shift")

    def __init__(self, keys: np.ndarray | None = None, *, composite: np.ndarray | None = None):
        """``keys``: a sorted int32 array; or ``composite``: sorted int64 ``key << 32 | index`` (a sort's output,
        read in place: no int32 copy of the keys)."""
        lo16 = hi16 = None
        if composite is not None:
            if not _LITTLE:
                keys = (composite >> 32).astype(np.int32)
                composite = None
            else:
                lo16, hi16 = composite.view(np.uint16)[2::4], composite.view(np.int16)[3::4]
        if keys is not None:
            keys = np.asarray(keys)
            if keys.dtype != np.int32 or keys.ndim != 1:
                raise TypeError("SortedKeys needs a 1-d int32 array.")
            if _LITTLE and keys.flags.c_contiguous:
                halves = keys.view(np.uint16)
                lo16, hi16 = halves[0::2], keys.view(np.int16)[1::2]
            else:
                lo16, hi16 = (keys & 0xFFFF).astype(np.uint16), (keys >> 16).astype(np.int16)
        self.n = n = int(lo16.shape[0])
        self.plain = self.starts = self.lo = None
        self.h0, self.shift = 0, 0
        if n == 0:
            self.first = self.last = 0
            self.plain = np.zeros(0, dtype=np.int32)
            return
        h0, h1 = int(hi16[0]), int(hi16[-1])
        self.first = (h0 << 16) | int(lo16[0])
        self.last = (h1 << 16) | int(lo16[-1])
        span = h1 - h0 + 1
        bits = int(np.bitwise_or.reduce(lo16))
        shift = 16 if bits == 0 else (bits & -bits).bit_length() - 1  # trailing zeros shared by every lower half
        lo_bytes = 0 if shift >= 16 else (1 if shift >= 8 else 2)
        idx_dtype = np.int32 if n < 2**31 else np.int64
        if np.dtype(idx_dtype).itemsize * (span + 1) + lo_bytes * n >= 4 * n:  # plain keys are smaller
            if keys is not None and keys.flags.c_contiguous:
                self.plain = keys
            else:
                self.plain = (hi16.astype(np.int32) << 16) | lo16.astype(np.int32)
            return
        starts = np.empty(span + 1, dtype=idx_dtype)
        if composite is not None:  # key >= h << 16  ⟺  key << 32 | index >= h << 48
            starts[:span] = np.searchsorted(composite, np.arange(h0, h1 + 1, dtype=np.int64) << 48, side="left")
        else:
            starts[:span] = np.searchsorted(np.ascontiguousarray(hi16), np.arange(h0, h1 + 1, dtype=np.int16),
                                            side="left")
        starts[span] = n
        self.h0, self.starts, self.shift = h0, starts, (shift if lo_bytes == 1 else 0)
        if lo_bytes == 2:
            self.lo = np.ascontiguousarray(lo16)
        elif lo_bytes == 1:
            self.lo = (lo16 >> shift).astype(np.uint8)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.plain, self.starts, self.lo) if a is not None)

    def arrays(self) -> tuple:
        """The host arrays held (for memory accounting that counts shared arrays once)."""
        return tuple(a for a in (self.plain, self.starts, self.lo) if a is not None)

    def count_le(self, v: int) -> int:
        """Number of keys ``<= v`` (``v``: any int)."""
        if self.plain is not None:
            if v < _INT32_MIN:
                return 0
            return int(self.plain.searchsorted(np.int32(min(v, _INT32_MAX)), "right"))
        j = (v >> 16) - self.h0
        if j < 0:
            return 0
        starts = self.starts
        if j >= starts.shape[0] - 1:
            return self.n
        a, b = int(starts[j]), int(starts[j + 1])
        if self.lo is None or a == b:
            return b
        return a + int(self.lo[a:b].searchsorted(self.lo.dtype.type((v & 0xFFFF) >> self.shift), "right"))

    def count_lt(self, v: int) -> int:
        """Number of keys ``< v``."""
        return self.count_le(v - 1)

    def bucket(self, h: int) -> tuple:
        """``(number of keys whose upper half is below h, … at most h)``."""
        if self.plain is not None:
            return self.count_le((h << 16) - 1), self.count_le((h << 16) | 0xFFFF)
        j = h - self.h0
        last = self.starts.shape[0] - 1
        a = 0 if j < 0 else (self.n if j >= last else int(self.starts[j]))
        b = 0 if j < 0 else (self.n if j + 1 >= last else int(self.starts[j + 1]))
        return a, b

    def add_upper_counts(self, table: np.ndarray, g0: int):
        """``table[j] += number of keys whose upper half is at most g0 + j`` (``table`` covers this layer's upper
        halves)."""
        if not self.n:
            return
        h0, h1 = self.first >> 16, self.last >> 16
        if self.plain is not None:
            bounds = (np.arange(h0, h1 + 1, dtype=np.int64) << 16) | 0xFFFF
            counts = np.searchsorted(self.plain.astype(np.int64), bounds, side="right")
        else:
            counts = self.starts[1:]
        table[h0 - g0:h1 - g0 + 1] += counts
        table[h1 - g0 + 1:] += self.n

    def lower_segment(self, h: int):
        """The keys whose upper half is ``h``: ``(a, b, seg, form)``, ``a`` / ``b`` the numbers of keys whose upper
        half is below / at most ``h``, ``seg`` the sorted array to search for lower halves ``ls`` (int64) turned
        into queries by :func:`_queries` with ``form`` (``seg`` is ``None`` when the count is ``b`` for every
        lower half: no keys in the bucket, or no lower halves stored)."""
        a, b = self.bucket(h)
        if a == b or (self.plain is None and self.lo is None):
            return a, b, None, None
        if self.plain is not None:
            return a, b, self.plain[a:b], ("plain", h << 16)
        return a, b, self.lo[a:b], (self.shift, self.lo.dtype.char)

    def array(self) -> np.ndarray:
        """The keys as a plain int32 array (a copy; for tests and conversions)."""
        if self.plain is not None:
            return self.plain.copy()
        hi = np.repeat(np.arange(self.h0, self.h0 + self.starts.shape[0] - 1, dtype=np.int64),
                       np.diff(self.starts))
        lo = np.zeros(self.n, dtype=np.int64) if self.lo is None else self.lo.astype(np.int64) << self.shift
        return ((hi << 16) | lo).astype(np.int32)

    # ------------------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Plain tensors and numbers (for ``torch.save`` with ``weights_only`` loading)."""
        d = {"n": self.n, "first": self.first, "last": self.last, "h0": self.h0, "shift": self.shift}
        if self.plain is not None:
            d["plain"] = torch.from_numpy(self.plain)
        else:
            d["starts"] = torch.from_numpy(self.starts)
            if self.lo is not None:
                d["lo"] = torch.from_numpy(self.lo.view(np.int16) if self.lo.dtype == np.uint16 else self.lo)
        return d

    @classmethod
    def from_state(cls, d: dict) -> "SortedKeys":
        k = cls.__new__(cls)
        k.n, k.first, k.last, k.h0, k.shift = (int(d[x]) for x in ("n", "first", "last", "h0", "shift"))
        k.plain = d["plain"].numpy() if "plain" in d else None
        k.starts = d["starts"].numpy() if "starts" in d else None
        lo = d.get("lo")
        k.lo = None if lo is None else (lo.numpy().view(np.uint16) if lo.dtype == torch.int16 else lo.numpy())
        return k
