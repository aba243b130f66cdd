"""Named data sources: the one place a source name becomes a reader.

Every source is random access and yields uint8 images at the pipeline's size:
    len(source) -> N
    source.image_shape -> (S, S, C)      shape of the images read_batch returns
    source.num_classes -> int            0 for unconditional data (all labels 0)
    source.read_batch(indices [b] int) -> (images uint8 [b, S, S, C], labels int32 [b])

Names (see `SOURCES`):
  "fashion_mnist_idx"  Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package
                       (data_dir defaults to /usr/share/datasets/fashion-mnist); splits train/test
  "idx"                any folder of MNIST-format IDX files (`split_prefixes` maps split -> file
                       prefix, default {"train": "train", "test": "t10k"})
  "tfds:<name>"        a TFDS dataset through tfds.data_source, e.g. "tfds:cifar10",
                       "tfds:imagenet_resized/64x64" (data_dir = TFDS data dir, default TFDS's)
  "folder"             a folder of images in data_dir (one subfolder per class, or flat)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Protocol

import numpy as np

from diffjax.data import folder, idx, tfds_source
from diffjax.data.errors import DataError


class ImageSource(Protocol):
    """What the pipeline needs from a source (see module docstring)."""

    name: str

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def num_classes(self) -> int: ...

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def fashion_mnist_idx(split: str, *, data_dir: str | None = None, image_size: int | None = None,
                      resize: str = "none") -> idx.IdxSource:
    """Fashion-MNIST (60000 train / 10000 test, 28x28x1, 10 classes) from IDX files."""
    return idx.IdxSource(
        data_dir or idx.FASHION_MNIST_DIR, split, image_size=image_size, resize=resize,
        num_classes=len(idx.FASHION_MNIST_CLASSES), name="fashion_mnist_idx",
        split_prefixes=idx.DEFAULT_SPLIT_PREFIXES,
        how_to_get="install them with `apt-get install dataset-fashion-mnist` (Debian) or set "
                   "data_dir to a folder with the Fashion-MNIST IDX files")


def idx_files(split: str, *, data_dir: str | None = None, image_size: int | None = None,
              resize: str = "none", split_prefixes: dict[str, str] | None = None,
              num_classes: int | None = None) -> idx.IdxSource:
    """Any MNIST-format IDX dataset: {prefix}-images-idx3-ubyte[.gz] + labels-idx1 files."""
    if data_dir is None:
        raise DataError("source 'idx' needs data_dir (the folder holding the IDX files)")
    return idx.IdxSource(data_dir, split, image_size=image_size, resize=resize,
                         split_prefixes=split_prefixes, num_classes=num_classes, name="idx")


def image_folder(split: str, *, data_dir: str | None = None, image_size: int | None = None,
                 resize: str = "resize", channels: int = 3,
                 cache: bool = False) -> folder.FolderSource:
    """User images, always resized + centre-cropped (`resize` must be 'resize')."""
    if resize != "resize":
        raise DataError(f"folder source always resizes and centre-crops; got resize='{resize}', "
                         "use resize='resize'")
    if data_dir is None:
        raise DataError("source 'folder' needs data_dir (the folder of images)")
    return folder.FolderSource(data_dir, split, image_size=image_size, channels=channels,
                               cache=cache)


def tfds_dataset(name: str, split: str, *, data_dir: str | None = None,
                 image_size: int | None = None, resize: str = "none", image_key: str = "image",
                 label_key: str | None = "label") -> tfds_source.TfdsSource:
    """A TFDS dataset prepared as ArrayRecord (see tfds_source)."""
    return tfds_source.TfdsSource(name, split, data_dir=data_dir, image_size=image_size,
                                  resize=resize, image_key=image_key, label_key=label_key)


SOURCES: dict[str, Callable[..., Any]] = {
    "fashion_mnist_idx": fashion_mnist_idx,
    "idx": idx_files,
    "folder": image_folder,
    "tfds": tfds_dataset,  # used as "tfds:<name>"
}


def default_resize(source: str) -> str:
    """Resize mode used when the caller gives none: folders resize, the rest must match."""
    return "resize" if source == "folder" else "none"


def make_source(source: str, *, split: str, data_dir: str | None = None,
                image_size: int | None = None, resize: str | None = None,
                **options: Any) -> ImageSource:
    """Builds the named source (see module docstring); options go to the source's factory."""
    kind, _, tfds_name = source.partition(":")
    if kind not in SOURCES or (kind == "tfds") != bool(tfds_name):
        valid = ", ".join(n if n != "tfds" else "tfds:<name>" for n in SOURCES)
        raise DataError(f"unknown data source '{source}'; valid: {valid}")
    factory = SOURCES[kind]
    accepted = set(inspect.signature(factory).parameters) - {"name", "split"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(f"source '{source}' does not take option(s) {unknown}; it takes "
                         f"{sorted(accepted)}")
    resize = default_resize(kind) if resize is None else resize
    args = (tfds_name, split) if kind == "tfds" else (split,)
    return factory(*args, data_dir=data_dir, image_size=image_size, resize=resize, **options)
