"""MNIST-format IDX files (Fashion-MNIST from Debian's `dataset-fashion-mnist`, MNIST, ...).

IDX layout (LeCun's MNIST format): two zero bytes, one type byte, one byte giving the number of
dimensions d, then d big-endian uint32 sizes, then the data in C order, big-endian.
Files may be gzip-compressed (`.gz`). A whole file is decompressed once per process and kept
as uint8 in memory (`load_idx` is cached), so a pipeline only gathers and converts batches.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct

import numpy as np

from diffjax.data import sizing
from diffjax.data.errors import DataError

# IDX type byte -> big-endian NumPy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# split name -> file prefix, as in the MNIST / Fashion-MNIST distributions.
DEFAULT_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _parse_header(head: bytes, path: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Returns (dtype, shape, header_length) from the first bytes of an IDX file."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {head[:4].hex()}); "
                         "expected MNIST-format *-idx?-ubyte[.gz] files")
    ndim = head[3]
    header_length = 4 + 4 * ndim
    if len(head) < header_length:
        raise DataError(f"{path} is truncated: IDX header needs {header_length} bytes")
    shape = struct.unpack(f">{ndim}I", head[4:header_length])
    return IDX_DTYPES[head[2]], tuple(int(s) for s in shape), header_length


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Reads only the header of an IDX file: (dtype, shape). Cheap even for .gz files."""
    with _open(path) as f:
        head = f.read(4 + 4 * 255)[: 4 + 4 * 255]
    dtype, shape, _ = _parse_header(head, path)
    return dtype, shape


@functools.lru_cache(maxsize=8)
def load_idx(path: str) -> np.ndarray:
    """Reads a whole IDX file (decompressed once, cached): array of the file's shape.

    Returns native-endian data; uint8 files come back as read-only uint8 arrays.
    """
    with _open(path) as f:
        raw = f.read()
    dtype, shape, offset = _parse_header(raw, path)
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - offset != count * dtype.itemsize:
        raise DataError(f"{path} is corrupt: header says shape {shape} ({count * dtype.itemsize} "
                         f"bytes) but the file holds {len(raw) - offset} bytes of data")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def find_idx_file(data_dir: str, prefix: str, kind: str) -> str | None:
    """Path of `{prefix}-{kind}-ubyte` (kind 'images-idx3' / 'labels-idx1'), .gz or not."""
    for stem in (f"{prefix}-{kind}-ubyte", f"{prefix}-{kind.replace('-', '.')}-ubyte"):
        for path in (os.path.join(data_dir, stem + ".gz"), os.path.join(data_dir, stem)):
            if os.path.isfile(path):
                return path
    return None


class IdxSource:
    """Images and labels from a pair of IDX files, held in memory as uint8.

    Images: IDX [N, H, W] (grayscale) or [N, H, W, C] uint8; labels: IDX [N] integers.
    """

    def __init__(self, data_dir: str, split: str, *, image_size: int | None = None,
                 resize: str = "none", split_prefixes: dict[str, str] | None = None,
                 num_classes: int | None = None, how_to_get: str = "",
                 name: str = "idx"):
        prefixes = dict(DEFAULT_SPLIT_PREFIXES if split_prefixes is None else split_prefixes)
        prefix = prefixes.get(split, split)
        self.name = name
        self._images_path = find_idx_file(data_dir, prefix, "images-idx3")
        self._labels_path = find_idx_file(data_dir, prefix, "labels-idx1")
        if self._images_path is None or self._labels_path is None:
            missing = f"{prefix}-images-idx3-ubyte[.gz]" if self._images_path is None else (
                f"{prefix}-labels-idx1-ubyte[.gz]")
            hint = how_to_get or "point data_dir at the folder holding the IDX files"
            raise DataError(f"{name}: split '{split}' needs {missing} in {data_dir}, which is "
                             f"missing; {hint} (known splits: {sorted(prefixes)})")
        dtype, shape = read_idx_header(self._images_path)
        _, label_shape = read_idx_header(self._labels_path)
        if dtype != np.uint8 or len(shape) not in (3, 4):
            raise DataError(f"{self._images_path}: expected uint8 images [N, H, W] or "
                             f"[N, H, W, C], got {dtype} {shape}")
        if label_shape != shape[:1]:
            raise DataError(f"{self._labels_path} holds {label_shape} labels for {shape[0]} "
                             f"images in {self._images_path}; the files do not belong together")
        self._native_shape = tuple(shape[1:]) + ((1,) if len(shape) == 3 else ())
        self._num_examples = shape[0]
        self._num_classes = num_classes
        self._sizer = sizing.Sizer(self._native_shape, image_size, resize, name)

    def __len__(self) -> int:
        return self._num_examples

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._sizer.output_shape

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = int(self._labels().max()) + 1 if len(self) else 0
        return self._num_classes

    def _images(self) -> np.ndarray:
        """[N, H, W, C] uint8, decompressed once per process."""
        images = load_idx(self._images_path)
        return images.reshape(images.shape[:3] + (self._native_shape[2],))

    def _labels(self) -> np.ndarray:
        return load_idx(self._labels_path)

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """indices: [b] int -> (images uint8 [b, S, S, C], labels int32 [b])."""
        images = self._images()[indices]
        labels = self._labels()[indices].astype(np.int32)
        return self._sizer.apply_batch(images), labels
