"""Datasets as :class:`DataBundle` objects (train / test / shape / classes) and helpers turning any accepted data
argument into batches.

>>> from prune_lab import data
>>> bundle = data.digits()            # 1,797 real 8x8 digits shipped with scikit-learn, no download
>>> x, y = data.calibration_batch(bundle, n=16)
>>> x.shape
torch.Size([16, 1, 8, 8])
"""
from .bundle import DataBundle, TensorImageDataset
from .idx import IdxFormatError, read_idx, write_idx
from .loaders import as_loader, calibration_batch, data_identity, iter_batches, resolve_dataset
from .tokens import TokenBatches, as_tokens, token_bundle, tokens
from .sources import DataUnavailableError, cifar10, default_data_root, digits, fashion_mnist, mnist, synthetic

__all__ = [
    "DataBundle", "TensorImageDataset", "TokenBatches", "tokens", "token_bundle", "as_tokens",
    "digits", "mnist", "fashion_mnist", "cifar10", "synthetic", "default_data_root",
    "as_loader", "calibration_batch", "data_identity", "iter_batches", "resolve_dataset",
    "read_idx", "write_idx", "IdxFormatError", "DataUnavailableError",
]
