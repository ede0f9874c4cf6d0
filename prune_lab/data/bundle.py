"""``DataBundle`` (a named train/test pair) and ``TensorImageDataset`` (in-memory images + labels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = ["DataBundle", "TensorImageDataset"]


class TensorImageDataset(Dataset):
    """In-memory images and labels, normalised on access.

    Args:
        images: ``(N, C, H, W)`` tensor, uint8 (scaled by 1/255 on access) or floating point (used as is).
        labels: ``(N,)`` integer tensor.
        mean, std: per-channel ``(C,)`` sequences (or scalars) subtracted / divided after scaling; ``None`` = no-op.

    Item ``i`` is ``(x, y)``: ``x`` a float32 ``(C, H, W)`` tensor, ``y`` a 0-d int64 tensor. :meth:`batch` returns
    a whole index set at once (``(B, C, H, W)``, ``(B,)``), which the training loop uses instead of a DataLoader.

    >>> ds = TensorImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4))
    >>> x, y = ds[1]; x.shape, x.dtype, y.dtype
    (torch.Size([1, 2, 2]), torch.float32, torch.int64)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, mean=None, std=None):
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise ValueError(
                f"images must be a (N, C, H, W) (or (N, *shape)) tensor, got {getattr(images, 'shape', type(images))}"
            )
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        self.mean = self._per_channel(mean, "mean")
        self.std = self._per_channel(std, "std")

    def _per_channel(self, value, what: str):
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
        c = self.images.shape[1]
        if value.numel() not in (1, c):
            raise ValueError(f"{what} must be a scalar or hold one value per channel ({c}), got {value.numel()} values")
        return value.expand(c).clone().reshape(c, *([1] * (self.images.dim() - 2)))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x

    def __getitem__(self, index):
        return self._transform(self.images[index]), self.labels[index]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``indices`` (a 1-D index tensor or slice) as ``(x: (B, C, H, W) float32, y: (B,) int64)``."""
        return self._transform(self.images[indices]), self.labels[indices]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.images.shape[1:])

    def __repr__(self) -> str:
        return f"TensorImageDataset(n={len(self)}, shape={self.sample_shape}, dtype={self.images.dtype})"


@dataclass(eq=False)
class DataBundle:
    """A named dataset: train and test splits plus what a model needs to know about them.

    Attributes:
        name: e.g. ``"digits"``, ``"mnist"``.
        train, test: ``torch.utils.data.Dataset`` objects yielding ``(x: (C, H, W) float32, y: int64)``.
        num_classes: number of classes.
        input_shape: ``(C, H, W)`` of one sample.
        notes: provenance and caveats (e.g. "train/test split from the 10,000 MNIST test images").

    >>> from prune_lab.data import synthetic
    >>> b = synthetic(n_train=8, n_test=4); (b.name, len(b.train), b.input_shape)
    ('synthetic', 8, (1, 8, 8))
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple
    notes: str = ""

    def __post_init__(self):
        self.input_shape = tuple(int(d) for d in self.input_shape)
        self.num_classes = int(self.num_classes)

    def __repr__(self) -> str:
        n_train = len(self.train) if hasattr(self.train, "__len__") else "?"
        n_test = len(self.test) if hasattr(self.test, "__len__") else "?"
        notes = f", notes={self.notes!r}" if self.notes else ""
        return (
            f"DataBundle(name={self.name!r}, train={n_train}, test={n_test}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}{notes})"
        )
