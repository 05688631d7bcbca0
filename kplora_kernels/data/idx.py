"""The IDX format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/): a 4-byte magic
number (two zero bytes, a type code, the number of dimensions), one big-endian 32-bit size per
dimension, then the values in C order, big-endian."""
from __future__ import annotations

import gzip
import zlib

import numpy as np

# IDX type codes → numpy dtypes (big-endian, as the format stores them)
_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """The array stored in the IDX file at ``path``, gzip-compressed when the name ends in ``.gz``;
    shape and dtype from its header (MNIST's images are ``(n, 28, 28)`` uint8, its labels ``(n,)``).

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` naming ``path`` when
    a ``.gz`` file is not valid gzip (or is cut short), the header is not IDX or the file holds fewer or more values than the header announces."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # a damaged or foreign .gz
        raise ValueError(f"{path} is not a readable gzip file: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES or data[3] == 0:
        raise ValueError(f"{path} is not an IDX file: magic number {data[:4].hex() or 'missing'}")
    ndim, dtype = data[3], _DTYPES[data[2]]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: the IDX header announces {ndim} dimensions but the file ends at byte {len(data)}")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: the IDX header announces shape {tuple(shape)} ({expected} bytes of data), "
                         f"the file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
