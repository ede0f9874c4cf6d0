"""Data bundles: digits, synthetic, and MNIST from IDX folders (full, t10k-only, shared files, offline errors)."""
import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from prune_lab import data
from prune_lab.data import sources
from prune_lab.data.idx import write_idx

SHARED_T10K = Path(__file__).parents[2].parent / "shared/data/mnist-t10k"


def _labels(ds):
    return torch.stack([ds[i][1] for i in range(len(ds))])


# ----------------------------------------------------------------------------------------------------- digits
def test_digits_split_shapes_and_normalisation():
    b = data.digits()
    assert (b.name, len(b.train), len(b.test), b.num_classes, b.input_shape) == ("digits", 1347, 450, 10, (1, 8, 8))
    x, y = b.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = data.calibration_batch(b, n=len(b.train))
    assert abs(xs.mean().item()) < 1e-4 and xs.std().item() == pytest.approx(1.0, abs=1e-3)
    counts = torch.bincount(_labels(b.test), minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # stratified: each class ~10 % of 450
    assert "load_digits" in b.notes


def test_digits_split_is_deterministic_and_seeded():
    a, b, c = data.digits(), data.digits(), data.digits(seed=1)
    assert data.data_identity(a) == data.data_identity(b) != data.data_identity(c)
    assert torch.equal(a.test.images, b.test.images)
    assert len(data.digits(test_fraction=0.5).test) in (898, 899)


# -------------------------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (20,)])
def test_synthetic_any_shape_deterministic(shape):
    a = data.synthetic(n_train=64, n_test=16, input_shape=shape, num_classes=5, seed=0)
    b = data.synthetic(n_train=64, n_test=16, input_shape=shape, num_classes=5, seed=0)
    c = data.synthetic(n_train=64, n_test=16, input_shape=shape, num_classes=5, seed=1)
    assert a.input_shape == shape and a.train[0][0].shape == shape
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert len(torch.unique(a.train.labels)) >= 4  # the teacher uses (almost) every class


def test_synthetic_labels_follow_a_linear_teacher():
    b = data.synthetic(n_train=2000, n_test=10, input_shape=(4,), num_classes=3, seed=0)
    x, y = b.train.images, b.train.labels
    # least squares on one-hot targets recovers a linear rule that classifies far above chance (1/3)
    w = torch.linalg.lstsq(x, torch.nn.functional.one_hot(y, 3).float()).solution
    assert ((x @ w).argmax(1) == y).float().mean() > 0.8


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        data.synthetic(n_train=0)
    with pytest.raises(ValueError, match="input_shape"):
        data.synthetic(input_shape=(0, 3))


# --------------------------------------------------------------------------------------------- MNIST from IDX
def _write_mnist(folder: Path, *, n_train=30, n_test=20, gz=True, with_train=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    splits = (("train", n_train), ("t10k", n_test)) if with_train else (("t10k", n_test),)
    for split, n in splits:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = (images, labels)
    return arrays


def _no_download(kind, root):
    raise AssertionError("download must not be attempted when the files are present")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "MNIST/raw"])
def test_mnist_reads_idx_folders(tmp_path, monkeypatch, gz, layout):
    monkeypatch.setattr(sources, "_tv_download", _no_download)
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = _write_mnist(folder, gz=gz)
    b = data.mnist(tmp_path)
    assert (len(b.train), len(b.test), b.input_shape, b.num_classes) == (30, 20, (1, 28, 28), 10)
    x, y = b.test[3]
    expected = (torch.from_numpy(arrays["t10k"][0][3]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0], expected, atol=1e-6) and int(y) == 3
    assert torch.equal(b.train.labels, torch.from_numpy(arrays["train"][1].astype(np.int64)))


def test_fashion_mnist_layout_and_env_root(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_tv_download", _no_download)
    _write_mnist(tmp_path / "FashionMNIST" / "raw", n_train=12, n_test=8)
    monkeypatch.setenv("PRUNE_LAB_DATA", str(tmp_path))
    b = data.fashion_mnist()
    assert (b.name, len(b.train), len(b.test)) == ("fashion_mnist", 12, 8)


def test_t10k_only_folder_is_split_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_tv_download", _no_download)
    _write_mnist(tmp_path, n_test=100, with_train=False)
    with pytest.warns(UserWarning, match="only the 10,000-image test files"):
        b = data.mnist(tmp_path, download=False)
    assert (len(b.train), len(b.test)) == (80, 20)
    assert "split" in b.notes and "download=False" in b.notes
    assert torch.bincount(b.test.labels, minlength=10).tolist() == [2] * 10  # stratified
    with pytest.warns(UserWarning):
        again = data.mnist(tmp_path, download=False)
    assert torch.equal(b.train.images, again.train.images)  # deterministic
    with pytest.warns(UserWarning):
        other = data.mnist(tmp_path, download=False, seed=1)
    assert not torch.equal(b.test.images, other.test.images)


def test_failed_download_falls_back_to_t10k(tmp_path, monkeypatch):
    def offline(kind, root):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sources, "_tv_download", offline)
    _write_mnist(tmp_path, n_test=50, with_train=False)
    with pytest.warns(UserWarning, match="download failed"):
        b = data.mnist(tmp_path)
    assert "URLError" in b.notes and len(b.train) == 40


def test_offline_with_nothing_on_disk_is_a_clear_error(tmp_path, monkeypatch):
    calls = []

    def offline(kind, root):
        calls.append((kind, root))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sources, "_tv_download", offline)
    with pytest.raises(data.DataUnavailableError) as err:
        data.mnist(tmp_path / "empty")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert calls == [("MNIST", tmp_path / "empty")]
    for needle in ("t10k-images-idx3-ubyte", "train-labels-idx1-ubyte", str(tmp_path / "empty"), "download failed",
                   "Name or service not known", "PRUNE_LAB_DATA"):
        assert needle in msg
    with pytest.raises(data.DataUnavailableError, match="download=False"):
        data.mnist(tmp_path / "empty", download=False)
    assert len(calls) == 1  # download=False never calls the downloader


def test_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    def half_download(kind, root):  # like torchvision: create the raw folder, then fail
        (Path(root) / kind / "raw").mkdir(parents=True)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sources, "_tv_download", half_download)
    _write_mnist(tmp_path / "t10k", n_test=50, with_train=False)
    before = sorted(p.name for p in (tmp_path / "t10k").iterdir())
    with pytest.warns(UserWarning):
        data.mnist(tmp_path / "t10k")
    assert sorted(p.name for p in (tmp_path / "t10k").iterdir()) == before
    with pytest.raises(data.DataUnavailableError):
        data.mnist(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


def test_download_puts_files_where_they_are_read(tmp_path, monkeypatch):
    def fake_download(kind, root):
        _write_mnist(Path(root) / kind / "raw", n_train=10, n_test=10)

    monkeypatch.setattr(sources, "_tv_download", fake_download)
    b = data.mnist(tmp_path)
    assert (len(b.train), len(b.test)) == (10, 10)


def test_corrupt_idx_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_tv_download", _no_download)
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(data.IdxFormatError, match="train-images-idx3-ubyte"):
        data.mnist(tmp_path)


def test_cifar10_offline_error(tmp_path, monkeypatch):
    def offline(kind, root):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sources, "_tv_download", offline)
    with pytest.raises(data.DataUnavailableError) as err:
        data.cifar10(tmp_path)
    assert "cifar-10-batches-py" in str(err.value) and "download failed" in str(err.value)


@pytest.mark.skipif(not SHARED_T10K.is_dir(), reason=f"shared MNIST test files not found at {SHARED_T10K}")
def test_shared_mnist_t10k_files():
    files = sorted(p.name for p in SHARED_T10K.iterdir())
    assert files == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    md5 = hashlib.md5((SHARED_T10K / "t10k-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert md5 == "9fb629c4189551a2d022fa330f9573f3"
    images = data.read_idx(SHARED_T10K / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(SHARED_T10K / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first MNIST test labels
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]
    with pytest.warns(UserWarning, match="split"):
        b = data.mnist(SHARED_T10K, download=False)
    assert (len(b.train), len(b.test)) == (8000, 2000)
    x, _ = data.calibration_batch(b, n=512)
    assert abs(x.mean().item()) < 0.1 and x.std().item() == pytest.approx(1.0, abs=0.1)
