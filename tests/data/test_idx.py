"""The IDX reader: round trips, gzip detection by content, and clear errors on corrupt files."""
import gzip

import numpy as np
import pytest

from prune_lab.data import IdxFormatError, read_idx, write_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, dtype, compress):
    a = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "a-idx3"
    write_idx(p, a, compress=compress)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_header_bytes_are_the_mnist_layout(tmp_path):
    p = tmp_path / "labels"
    write_idx(p, np.array([7, 2, 1], dtype=np.uint8))
    assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])  # magic 0x00000801, count 3, data


def test_bad_magic(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(p)


def test_unknown_type_code(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 9]))
    with pytest.raises(IdxFormatError, match="type code"):
        read_idx(p)


def test_truncated_data(tmp_path):
    p = tmp_path / "short.gz"
    write_idx(p, np.zeros((4, 5, 5), dtype=np.uint8))
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(IdxFormatError, match="truncated") as err:
        read_idx(p)
    assert str(p) in str(err.value)


def test_corrupt_gzip_stream(tmp_path):
    p = tmp_path / "broken.gz"
    write_idx(p, np.zeros((50, 5, 5), dtype=np.uint8))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")
