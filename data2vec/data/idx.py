"""Reading (and writing) IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimension sizes, then the array itself in C order, big-endian. The files are usually
distributed gzip-compressed (``*.gz``).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from data2vec.errors import DataError, DataNotFoundError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four ``*-ubyte.gz`` files."""

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
"""The ten Fashion-MNIST class names, in label order 0..9."""

# IDX dtype code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its suffix)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"IDX file not found: {path}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        # gzip reports a cut-off download as EOFError and a damaged one as BadGzipFile/zlib.error.
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not.

    Args:
        path: The ``.gz`` or raw IDX file.

    Returns:
        The array with the declared shape, e.g. uint8 ``(N, 28, 28)`` for MNIST images or
        ``(N,)`` for labels, in native byte order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Bad magic number, unknown dtype code, or a payload whose size does not match
            the declared shape (a truncated or padded file); the message names the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(data)} bytes, the header needs 4")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{path}: not an IDX file: magic number {data[:4].hex()} should start with 0000"
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x} (expected one of {known})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dims need {header_len} header bytes, "
            f"file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {what}: declared shape {tuple(shape)} of {dtype.name} needs "
            f"{expected} bytes of data, found {payload}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    # Native byte order and a writable copy, so callers can use it like any other array.
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends with ``.gz``).

    Args:
        path: Output file.
        array: Any shape with at most 255 dims, of dtype uint8, int8, int16, int32, float32 or
            float64.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"cannot write dtype {array.dtype} to IDX file {path}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    data = header + body
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)  # mtime=0: identical arrays give identical files
    path.write_bytes(data)
    return path
