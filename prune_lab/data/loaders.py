"""Turning any accepted data argument into batches: ``as_loader``, ``calibration_batch``, ``data_identity`` and the
fast in-memory batch iterator ``iter_batches`` that training and evaluation use.

Accepted ``data`` everywhere: a :class:`DataBundle` (the ``split`` is picked), a map-style ``Dataset`` yielding
``(x, y)``, a ``DataLoader`` (used as is), or an ``(inputs, targets)`` tuple of tensors (``inputs: (N, ...)``,
``targets: (N,)`` integer class labels). Token ids for a causal LM come as a
:class:`~prune_lab.data.tokens.TokenBatches` (or a bundle of two): their batches are ``(input_ids (B, L),
attention_mask (B, L))``.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from .bundle import DataBundle, TensorImageDataset
from .tokens import TokenBatches

__all__ = ["as_loader", "calibration_batch", "data_identity", "iter_batches", "resolve_dataset"]

_SPLITS = ("train", "test")
_EXPECTED = "a DataBundle, a torch Dataset, a DataLoader or an (inputs, targets) tuple of tensors"


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _tuple_dataset(data, what: str) -> TensorDataset:
    if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
        kinds = ", ".join(type(t).__name__ for t in data)
        raise TypeError(f"{what} as a tuple must be (inputs, targets), two tensors; got ({kinds})")
    x, y = data
    if x.dim() < 2:
        raise ValueError(f"{what}: inputs must have shape (N, ...) with a batch dimension, got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: targets must have shape ({x.shape[0]},) to match the inputs, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{what}: targets must be integer class labels, got dtype {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: the (inputs, targets) tuple is empty (N = 0)")
    return TensorDataset(x, y.to(torch.int64))


def resolve_dataset(data, *, split: str = "test", what: str = "data"):
    """The ``Dataset`` (or ``DataLoader``, returned as is) behind ``data``; validates types, ``split`` and emptiness.

    >>> from prune_lab.data import synthetic
    >>> len(resolve_dataset(synthetic(n_train=8, n_test=4), split="train"))
    8
    """
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, DataBundle):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, _SPLITS))}, got {split!r}")
        dataset = getattr(data, split)
        what = f"{what}.{split}"
    elif isinstance(data, (tuple, list)):
        dataset = _tuple_dataset(data, what)
    elif isinstance(data, Dataset):
        dataset = data
    else:
        hint = ("; token ids of a language model: wrap them with prune_lab.data.tokens(ids)"
                if isinstance(data, torch.Tensor) and not data.dtype.is_floating_point else "")
        raise TypeError(f"{what} must be {_EXPECTED}; got {type(data).__name__}{hint}")
    if not isinstance(dataset, IterableDataset):
        try:
            n = len(dataset)
        except TypeError as exc:
            raise TypeError(f"{what}: a map-style Dataset must define __len__") from exc
        if n == 0:
            raise ValueError(f"{what} is empty (0 samples)")
    return dataset


def as_loader(data, *, split: str = "test", batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` over ``data`` (a ``DataLoader`` is returned unchanged). Shuffling uses a generator seeded
    with ``seed``, so two loaders built alike yield the same batches; the global RNG is not touched.

    Batches are ``(x: (B, C, H, W) float32, y: (B,) int64)``.

    >>> from prune_lab.data import digits
    >>> x, y = next(iter(as_loader(digits(), batch_size=32)))
    >>> x.shape, y.dtype
    (torch.Size([32, 1, 8, 8]), torch.int64)
    """
    dataset = resolve_dataset(data, split=split)
    if isinstance(dataset, DataLoader):
        return dataset
    batch_size = _check_positive_int(batch_size, "batch_size")
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=bool(shuffle), generator=generator)


def _gather(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``indices`` of a map-style dataset as one batch, vectorised for in-memory datasets."""
    if isinstance(dataset, (TensorImageDataset, TokenBatches)):
        return dataset.batch(indices)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return x[indices], y[indices]
    if isinstance(dataset, Subset):
        inner = torch.as_tensor(dataset.indices)[indices]
        return _gather(dataset.dataset, inner)
    batch = default_collate([dataset[int(i)] for i in indices])
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"a dataset item must be an (x, y) pair, got {type(batch).__name__} of length {len(batch)}")
    return batch[0], batch[1]


def iter_batches(
    data,
    *,
    split: str = "train",
    batch_size: int = 256,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``data`` in batches ``(x, y)``, without DataLoader overhead for in-memory datasets.

    A ``DataLoader`` is iterated as is (its own batch size and shuffling apply). For other inputs the order is
    ``torch.randperm(n, generator=generator)`` when ``shuffle`` (one fresh permutation per call), else ``0..n-1``.

    >>> from prune_lab.data import synthetic
    >>> [x.shape[0] for x, _ in iter_batches(synthetic(n_train=10, n_test=2), batch_size=4)]
    [4, 4, 2]
    """
    dataset = resolve_dataset(data, split=split)
    if isinstance(dataset, (DataLoader, IterableDataset)):
        loader = dataset if isinstance(dataset, DataLoader) else DataLoader(dataset, batch_size=batch_size)
        for batch in loader:
            yield batch[0], batch[1]
        return
    batch_size = _check_positive_int(batch_size, "batch_size")
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield _gather(dataset, order[start : start + batch_size])


def calibration_batch(data, n: int = 256, *, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch of ``min(n, len)`` samples drawn without replacement (seeded), as ``(x, y)``:
    ``x: (n, C, H, W)`` float32, ``y: (n,)`` int64. For a ``DataLoader`` the samples come from its dataset
    (or its first batches, for an iterable dataset). For token data (:class:`TokenBatches`) the pair is
    ``(input_ids (n, L), attention_mask (n, L))``, both int64.

    >>> from prune_lab.data import digits
    >>> x, y = calibration_batch(digits(), n=64)
    >>> x.shape, torch.equal(x, calibration_batch(digits(), n=64)[0])
    (torch.Size([64, 1, 8, 8]), True)
    """
    n = _check_positive_int(n, "n")
    dataset = resolve_dataset(data, split=split)
    if isinstance(dataset, DataLoader):
        dataset = dataset.dataset
        if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError("data is empty (0 samples): the DataLoader's dataset has no samples")
    if isinstance(dataset, IterableDataset):
        xs, ys, have = [], [], 0
        for x, y in DataLoader(dataset, batch_size=n):
            xs.append(x)
            ys.append(y)
            have += x.shape[0]
            if have >= n:
                break
        if not xs or have == 0:
            raise ValueError("data is empty (0 samples: the iterable dataset yielded nothing)")
        return torch.cat(xs)[:n], torch.cat(ys)[:n]
    g = torch.Generator().manual_seed(int(seed))
    indices = torch.randperm(len(dataset), generator=g)[:n]
    return _gather(dataset, indices)


# ------------------------------------------------------------------------------------------------------ identity
def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def _hash_dataset(h, dataset, what: str) -> None:
    if isinstance(dataset, DataLoader):
        _hash_dataset(h, dataset.dataset, what)
        return
    if isinstance(dataset, TokenBatches):
        h.update(f"TokenBatches|{dataset.identity()}|".encode())
        return
    if isinstance(dataset, TensorImageDataset):
        h.update(f"TensorImageDataset|{dataset.scale}|".encode())
        for t in (dataset.images, dataset.labels):
            _hash_tensor(h, t)
        for t in (dataset.mean, dataset.std):
            h.update(b"none|" if t is None else b"")
            if t is not None:
                _hash_tensor(h, t)
        return
    if isinstance(dataset, TensorDataset):
        h.update(b"TensorDataset|")
        for t in dataset.tensors:
            _hash_tensor(h, t)
        return
    if isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        n = len(dataset)
        h.update(f"{type(dataset).__module__}.{type(dataset).__qualname__}|{n}|".encode())
        for i in sorted(set(np.linspace(0, n - 1, num=min(n, 16), dtype=np.int64).tolist())) if n else []:
            for part in dataset[i]:
                _hash_tensor(h, torch.as_tensor(part))
        return
    raise TypeError(f"{what} must be {_EXPECTED} with a length; got {type(dataset).__name__}")


def data_identity(data) -> str:
    """A stable content hash (32 hex characters) of ``data``, for cache keys: equal for equal content in any
    process, different when samples, labels, normalisation, split sizes or the bundle name differ. In-memory
    datasets are hashed in full; other map-style datasets by their class, length and 16 evenly spaced samples.

    >>> from prune_lab.data import synthetic
    >>> data_identity(synthetic(seed=0)) == data_identity(synthetic(seed=0)) != data_identity(synthetic(seed=1))
    True
    """
    h = hashlib.sha256()
    if isinstance(data, DataBundle):
        h.update(f"DataBundle|{data.name}|{data.num_classes}|{data.input_shape}|".encode())
        _hash_dataset(h, resolve_dataset(data, split="train", what="data"), "data.train")
        h.update(b"|test|")
        _hash_dataset(h, resolve_dataset(data, split="test", what="data"), "data.test")
    elif isinstance(data, torch.Tensor):
        _hash_tensor(h, data)
    else:
        _hash_dataset(h, resolve_dataset(data, what="data"), "data")
    return h.hexdigest()[:32]
