"""Data bundles: scikit-learn digits (embedded), MNIST / Fashion-MNIST / CIFAR-10 (torchvision or IDX files on disk)
and seeded synthetic data. Every function returns a :class:`DataBundle` of in-memory datasets."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .bundle import DataBundle, TensorImageDataset
from .idx import IdxFormatError, read_idx

__all__ = [
    "DataUnavailableError",
    "default_data_root",
    "digits",
    "synthetic",
    "mnist",
    "fashion_mnist",
    "cifar10",
]

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MNIST_STATS = {"mnist": ((0.1307,), (0.3081,)), "fashion_mnist": ((0.2860,), (0.3530,))}
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class DataUnavailableError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable (offline, a read-only folder, a failed mirror ...)."""


def default_data_root() -> Path:
    """Where datasets live: ``$PRUNE_LAB_DATA`` when set, else ``~/.cache/prune_lab/data`` (read at call time).

    >>> isinstance(default_data_root(), Path)
    True
    """
    return Path(os.environ.get("PRUNE_LAB_DATA") or "~/.cache/prune_lab/data").expanduser()


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=float(test_fraction), random_state=int(seed), stratify=labels, shuffle=True
    )
    return np.sort(train_idx), np.sort(test_idx)


def digits(seed: int = 0, test_fraction: float = 0.25) -> DataBundle:
    """scikit-learn's ``load_digits``: 1,797 real 8×8 handwritten digits (shipped with scikit-learn, no download).

    Fixed stratified split (``seed``), pixels scaled by 1/16 then standardised with the train mean and std
    (one scalar each). Samples are ``(1, 8, 8)`` float32, 10 classes; 1,347 train / 450 test by default.

    >>> b = digits(); (len(b.train), len(b.test), b.input_shape)
    (1347, 450, (1, 8, 8))
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = d.target.astype(np.int64)
    train_idx, test_idx = _split_indices(labels, test_fraction, seed)
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    x = torch.from_numpy((images - mean) / std).unsqueeze(1)
    y = torch.from_numpy(labels)
    t_tr, t_te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return DataBundle(
        name="digits",
        train=TensorImageDataset(x[t_tr].clone(), y[t_tr].clone()),
        test=TensorImageDataset(x[t_te].clone(), y[t_te].clone()),
        num_classes=10,
        input_shape=(1, 8, 8),
        notes=(
            f"scikit-learn load_digits (1,797 8x8 images); stratified split {len(train_idx)}/{len(test_idx)} "
            f"(seed {seed}); pixels/16 standardised with the train mean {mean:.4f} and std {std:.4f}"
        ),
    )


def synthetic(
    n_train: int = 1024,
    n_test: int = 256,
    input_shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    seed: int = 0,
) -> DataBundle:
    """Seeded random data with learnable labels: ``x ~ N(0, I)`` of ``input_shape``, ``y = argmax(T x)`` for a random
    linear teacher ``T: (num_classes, prod(input_shape))``. Same arguments → identical tensors.

    >>> b = synthetic(n_train=32, n_test=8, input_shape=(3, 32, 32))
    >>> b.train[0][0].shape, b.train[0][1].dtype
    (torch.Size([3, 32, 32]), torch.int64)
    """
    for what, n in (("n_train", n_train), ("n_test", n_test), ("num_classes", num_classes)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{what} must be a positive int, got {n!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    g = torch.Generator().manual_seed(int(seed))
    d = math.prod(shape)
    teacher = torch.randn(int(num_classes), d, generator=g)
    x = torch.randn(int(n_train) + int(n_test), d, generator=g)
    y = (x @ teacher.T).argmax(dim=1)
    x = x.reshape(-1, *shape)
    return DataBundle(
        name="synthetic",
        train=TensorImageDataset(x[:n_train].clone(), y[:n_train].clone()),
        test=TensorImageDataset(x[n_train:].clone(), y[n_train:].clone()),
        num_classes=int(num_classes),
        input_shape=shape,
        notes=f"x ~ N(0, I), y = argmax of a random linear teacher (seed {seed})",
    )


# ---------------------------------------------------------------------------------------------- IDX-based MNISTs
def _tv_download(kind: str, root: Path) -> None:
    """Download a torchvision dataset (``kind`` = torchvision class name) into ``root``; raises on failure.
    Module-level so tests can replace it."""
    import torchvision.datasets as tvd

    getattr(tvd, kind)(str(root), train=True, download=True)


def _download(kind: str, root: Path, subdirs: Sequence[str] = ()) -> None:
    """Call :func:`_tv_download`; when it fails, remove the (empty) folders the attempt created, so a failed
    download leaves the user's disk as it was. Re-raises the download error."""
    candidates = [root.joinpath(*subdirs[: i + 1]) for i in reversed(range(len(subdirs)))] + [root, *root.parents]
    created = [d for d in candidates if not d.exists()]
    try:
        _tv_download(kind, root)
    except BaseException:
        for d in created:  # deepest first; rmdir refuses non-empty folders
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, shortened to about ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _locate(folders: Sequence[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            p = folder / name
            if p.is_file():
                return p
    return None


def _load_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise IdxFormatError(f"{images_path}: expected (N, H, W) images, found shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise IdxFormatError(
            f"{labels_path}: expected {images.shape[0]} labels to match {images_path.name}, found shape {labels.shape}"
        )
    if images.dtype != np.uint8:
        raise IdxFormatError(f"{images_path}: expected uint8 pixels, found {images.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise IdxFormatError(f"{labels_path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _idx_bundle(
    name: str, tv_kind: str, root, download: bool, seed: int, test_fraction: float
) -> DataBundle:
    root = default_data_root() if root is None else Path(root).expanduser()
    folders = [root, root / tv_kind / "raw", root / "raw"]
    mean, std = _MNIST_STATS[name]

    def locate_all() -> dict:
        return {key: _locate(folders, stem) for key, stem in _IDX_FILES.items()}

    files = locate_all()
    download_error: BaseException | None = None
    if not all(files.values()) and download:
        try:
            _download(tv_kind, root, (tv_kind, "raw"))
        except Exception as exc:  # offline, read-only folder, a failed mirror: report it below
            download_error = exc
        files = locate_all()

    if all(files.values()):
        x_tr, y_tr = _load_pair(files["train_images"], files["train_labels"])
        x_te, y_te = _load_pair(files["test_images"], files["test_labels"])
        return DataBundle(
            name=name,
            train=TensorImageDataset(x_tr, y_tr, mean=mean, std=std),
            test=TensorImageDataset(x_te, y_te, mean=mean, std=std),
            num_classes=10,
            input_shape=tuple(x_tr.shape[1:]),
            notes=f"IDX files from {files['train_images'].parent}; normalised with mean {mean[0]}, std {std[0]}",
        )

    why = (
        f"the download failed ({_first_line(download_error)})"
        if download_error is not None
        else ("download=False, so nothing was downloaded" if not download else "the download left no files")
    )
    if files["test_images"] and files["test_labels"]:
        x, y = _load_pair(files["test_images"], files["test_labels"])
        train_idx, test_idx = _split_indices(y.numpy(), test_fraction, seed)
        t_tr, t_te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
        notes = (
            f"only the 10,000-image test files were found in {files['test_images'].parent} ({why}); "
            f"train/test are a stratified {len(train_idx)}/{len(test_idx)} split of them (seed {seed})"
        )
        warnings.warn(f"{name}: {notes}", UserWarning, stacklevel=3)
        return DataBundle(
            name=name,
            train=TensorImageDataset(x[t_tr].clone(), y[t_tr].clone(), mean=mean, std=std),
            test=TensorImageDataset(x[t_te].clone(), y[t_te].clone(), mean=mean, std=std),
            num_classes=10,
            input_shape=tuple(x.shape[1:]),
            notes=notes,
        )

    expected = ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES.values())
    where = " or ".join(str(f) for f in folders[:2])
    raise DataUnavailableError(
        f"{name}: dataset files not found. Expected {expected} in {where}; {why}. "
        f"Copy the files there, pass root=<folder holding them>, or set PRUNE_LAB_DATA."
    ) from download_error


def mnist(root=None, download: bool = True, *, seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """MNIST as 1×28×28 float32 images normalised with mean 0.1307 and std 0.3081, 10 classes.

    ``root`` (default :func:`default_data_root`) may hold the four IDX files (gzip or plain) flat or in
    torchvision's ``MNIST/raw`` layout; missing files are downloaded with torchvision when ``download``. When only
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` are available, their 10,000 images are split into
    train/test (stratified, ``seed``, ``test_fraction``), with a ``UserWarning`` and a line in ``notes``.

    Raises:
        DataUnavailableError: no usable files and the download failed or was disabled (message names the files).
        IdxFormatError: a file is corrupt.

    >>> b = mnist("/path/to/mnist-t10k", download=False)  # doctest: +SKIP
    """
    return _idx_bundle("mnist", "MNIST", root, download, seed, test_fraction)


def fashion_mnist(root=None, download: bool = True, *, seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """Fashion-MNIST as 1×28×28 float32 images (mean 0.2860, std 0.3530); same file layout and fallbacks as
    :func:`mnist` (torchvision folder ``FashionMNIST/raw``).

    >>> b = fashion_mnist(download=False)  # doctest: +SKIP
    """
    return _idx_bundle("fashion_mnist", "FashionMNIST", root, download, seed, test_fraction)


def cifar10(root=None, download: bool = True) -> DataBundle:
    """CIFAR-10 through torchvision: 3×32×32 float32 images normalised per channel, 10 classes, 50,000 / 10,000.
    No augmentation. Files live in ``root/cifar-10-batches-py``.

    Raises:
        DataUnavailableError: files missing and the download failed or was disabled.

    >>> b = cifar10(download=False)  # doctest: +SKIP
    """
    import torchvision.datasets as tvd

    root = default_data_root() if root is None else Path(root).expanduser()

    def load() -> tuple:
        return tuple(tvd.CIFAR10(str(root), train=train, download=False) for train in (True, False))

    try:
        train, test = load()
    except RuntimeError as missing:
        if not download:
            why = "download=False, so nothing was downloaded"
        else:
            try:
                _download("CIFAR10", root)
                train, test = load()
                why = None
            except Exception as exc:
                why = f"the download failed ({_first_line(exc)})"
        if why is not None:
            raise DataUnavailableError(
                f"cifar10: dataset files not found. Expected data_batch_1 ... data_batch_5, test_batch and "
                f"batches.meta in {root / 'cifar-10-batches-py'}; {why}. Pass root=<folder>, or set PRUNE_LAB_DATA."
            ) from missing

    mean, std = _CIFAR10_STATS

    def to_dataset(ds) -> TensorImageDataset:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return TensorImageDataset(images, torch.as_tensor(ds.targets, dtype=torch.int64), mean=mean, std=std)

    return DataBundle(
        name="cifar10",
        train=to_dataset(train),
        test=to_dataset(test),
        num_classes=10,
        input_shape=(3, 32, 32),
        notes=f"torchvision CIFAR-10 from {root}; per-channel normalisation, no augmentation",
    )
