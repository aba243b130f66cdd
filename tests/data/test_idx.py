"""IDX reading against an independent byte-level parse and the real Debian files."""

import gzip
import os
import struct

import numpy as np
import pytest

from diffjax.data import idx, sources

DEBIAN = "/usr/share/datasets/fashion-mnist"


def _parse_independently(raw: bytes) -> np.ndarray:
    """Reference IDX parse with struct + np.frombuffer (uint8 / int32 / float32 only)."""
    zero, type_byte, ndim = struct.unpack(">HBB", raw[:4])
    assert zero == 0
    shape = struct.unpack(">" + "i" * ndim, raw[4:4 + 4 * ndim])
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_byte]
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=dtype).reshape(shape)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_load_idx_matches_independent_parse(tmp_path, tools, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.integers(0, 250, size=(7, 3, 5)) * (1.5 if dtype == np.float32 else 1)
             ).astype(dtype)
    if dtype == np.int32:
        array -= 100  # negative values exercise the big-endian sign handling
    path = str(tmp_path / f"x-{np.dtype(dtype).name}{suffix}")
    tools.write_idx(path, array)
    raw = open(path, "rb").read()
    raw = gzip.decompress(raw) if suffix else raw
    expected = _parse_independently(raw)
    idx.load_idx.cache_clear()
    got = idx.load_idx(path)
    assert got.shape == expected.shape == array.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, array)
    assert idx.read_idx_header(path) == (np.dtype(dtype).newbyteorder(">")
                                         if dtype != np.uint8 else np.dtype(np.uint8), (7, 3, 5))


def test_bad_magic_and_truncated_files(tmp_path, tools):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x08\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not an IDX file"):
        idx.load_idx(str(bad))
    short = tmp_path / "short-images-idx3-ubyte"
    tools.write_idx(short, np.zeros((4, 2, 2), np.uint8))
    short.write_bytes(short.read_bytes()[:-3])
    idx.load_idx.cache_clear()
    with pytest.raises(ValueError, match="corrupt"):
        idx.load_idx(str(short))


def test_idx_source_reads_images_and_labels(idx_dir, tools):
    src = sources.make_source("idx", split="test", data_dir=idx_dir)
    assert len(src) == 10 and src.image_shape == (4, 5, 1) and src.num_classes == 7
    images, labels = src.read_batch(np.array([3, 0, 9]))
    np.testing.assert_array_equal(images[..., 0], tools.coded_images(10)[[3, 0, 9]])
    np.testing.assert_array_equal(labels, np.array([3, 0, 9]) % 7)
    assert images.dtype == np.uint8 and labels.dtype == np.int32


def test_pad_and_resize_modes(idx_dir, tools):
    padded = sources.make_source("idx", split="test", data_dir=idx_dir, image_size=8,
                                 resize="pad")
    images, _ = padded.read_batch(np.array([5]))
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 1:6] = tools.coded_images(10)[5]  # (8-4)//2 = 2 rows, (8-5)//2 = 1 column
    np.testing.assert_array_equal(images[0, :, :, 0], expected)
    resized = sources.make_source("idx", split="test", data_dir=idx_dir, image_size=3,
                                  resize="resize")
    assert resized.read_batch(np.array([1, 2]))[0].shape == (2, 3, 3, 1)


def test_size_mismatch_and_missing_files_errors(idx_dir, tmp_path):
    with pytest.raises(ValueError, match=r"4x5 but image_size=8.*resize='pad'"):
        sources.make_source("idx", split="train", data_dir=idx_dir, image_size=8)
    with pytest.raises(ValueError, match="cannot pad"):
        sources.make_source("idx", split="train", data_dir=idx_dir, image_size=3, resize="pad")
    with pytest.raises(ValueError, match="unknown resize mode"):
        sources.make_source("idx", split="train", data_dir=idx_dir, image_size=4, resize="zoom")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist") as e:
        sources.make_source("fashion_mnist_idx", split="train", data_dir=str(empty))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="known splits"):
        sources.make_source("idx", split="validation", data_dir=idx_dir)


@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
    src = sources.make_source("fashion_mnist_idx", split="train")
    assert len(src) == 60000 and src.image_shape == (28, 28, 1) and src.num_classes == 10
    raw = gzip.decompress(open(os.path.join(DEBIAN, "train-images-idx3-ubyte.gz"), "rb").read())
    expected = _parse_independently(raw)
    assert expected.shape == (60000, 28, 28)
    picks = np.array([0, 1, 12345, 59999])
    images, labels = src.read_batch(picks)
    np.testing.assert_array_equal(images[..., 0], expected[picks])
    all_labels = idx.load_idx(os.path.join(DEBIAN, "train-labels-idx1-ubyte.gz"))
    assert all_labels.shape == (60000,) and set(np.unique(all_labels)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(all_labels), np.full(10, 6000))
    np.testing.assert_array_equal(labels, all_labels[picks])
    test = sources.make_source("fashion_mnist_idx", split="test")
    assert len(test) == 10000
