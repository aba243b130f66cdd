"""Fixtures for the data tests: tiny IDX datasets written byte by byte."""

import gzip
import struct

import numpy as np
import pytest

# IDX type byte of each NumPy dtype (big-endian storage).
_TYPE_BYTES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def write_idx(path, array, compress=None):
    """Writes `array` as an IDX file (gzip if compress or path ends with .gz)."""
    array = np.asarray(array)
    header = bytes([0, 0, _TYPE_BYTES[array.dtype], array.ndim])
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(payload)


def coded_images(n, height=4, width=5):
    """[n, H, W] uint8; image i has min value i in column 0 and rises to the right, so it is
    identifiable (its min) and mirror-asymmetric (column 0 holds the min)."""
    columns = np.arange(width, dtype=np.int64) * 30
    images = np.arange(n)[:, None, None] + np.zeros((1, height, 1), np.int64) + columns
    assert images.max() < 256
    return images.astype(np.uint8)


def decode_ids(image_batch):
    """float images [B, H, W, 1] in [-1, 1] -> (ids [B], flipped [B] bool)."""
    u8 = np.rint((np.asarray(image_batch, np.float64) + 1) * 127.5).astype(np.int64)[..., 0]
    ids = u8.min(axis=(1, 2))
    flipped = u8[:, 0, 0] != ids
    return ids, flipped


@pytest.fixture
def idx_dir(tmp_path):
    """A folder with train (24 examples) and t10k (10) splits of 4x5 coded images."""
    for prefix, n in (("train", 24), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", coded_images(n))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 7).astype(np.uint8))
    return str(tmp_path)


@pytest.fixture
def tools():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(write_idx=write_idx, coded_images=coded_images,
                                 decode_ids=decode_ids)
