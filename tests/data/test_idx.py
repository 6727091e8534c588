"""IDX reading: exact round trips, malformed files, and the installed Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from data2vec.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx, write_idx


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Hand-built IDX bytes, independent of write_idx."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_read_uint8_images_exactly(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    data = _idx_bytes(images, 0x08)
    path = tmp_path / ("x-images-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(data) if compress else data)
    got = read_idx(path)
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3)
    np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
def test_read_other_dtypes_big_endian(tmp_path: Path, dtype: type, code: int) -> None:
    arr = (np.arange(12).reshape(3, 4) * 37 - 100).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(arr, code))
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_write_idx_round_trip(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    path = write_idx(tmp_path / "l-labels-idx1-ubyte.gz", labels)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(path), labels)
    assert gzip.decompress(path.read_bytes()) == _idx_bytes(labels, 0x08)


def test_truncated_payload_names_the_file(tmp_path: Path) -> None:
    data = _idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8), 0x08)
    path = tmp_path / "cut-images-idx3-ubyte"
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    data = gzip.compress(_idx_bytes(np.arange(1000, dtype=np.int32), 0x0C))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_trailing_bytes_rejected(tmp_path: Path) -> None:
    path = tmp_path / "long.idx"
    path.write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8), 0x08) + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x00", "magic number"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x00", "dtype code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00", "only 2 bytes"),
    ],
)
def test_bad_header_names_the_file(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        read_idx(tmp_path / "nope.idx")


def test_fashion_mnist_class_names() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_installed_fashion_mnist() -> None:
    images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,)
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    test_labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert test_labels.shape == (10000,)
