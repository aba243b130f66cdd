"""A folder of the user's own images.

Layouts:
  class-conditional: data_dir/<class_name>/**/<image>  (one subfolder per class; labels are the
                     class folders' indices in sorted order);
  unconditional:     data_dir/<image> (flat; every label is 0 and num_classes is 0).
Every image is converted to RGB (or grayscale with channels=1), resized so its shorter side is
image_size and centre-cropped (see `sizing.resize_center_crop`). Files are listed in sorted
order, so indices, and hence the pipeline's order, do not depend on the file system.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffjax.data import sizing
from diffjax.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
FOLDER_SPLITS = ("train",)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(root: str) -> list[str]:
    """Sorted image paths under root (recursive)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return sorted(found)


def scan_folder(data_dir: str) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Returns (paths, labels int32 [N], class_names); class_names is () for a flat folder."""
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"folder source: data_dir={data_dir!r} is not a directory; set data_dir "
                         "to a folder of images (one subfolder per class, or flat)")
    entries = sorted(e for e in os.listdir(data_dir) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(data_dir, e))]
    top_images = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(data_dir, e))]
    if subdirs and top_images:
        raise DataError(f"folder source: {data_dir} has both images and subfolders; use one "
                         "subfolder per class, or put all images flat in the folder")
    if not subdirs:
        paths, labels, classes = [os.path.join(data_dir, e) for e in top_images], [], ()
        labels = [0] * len(paths)
    else:
        paths, labels, classes = [], [], tuple(subdirs)
        for label, name in enumerate(subdirs):
            class_paths = _images_under(os.path.join(data_dir, name))
            paths.extend(class_paths)
            labels.extend([label] * len(class_paths))
    if not paths:
        raise DataError(f"folder source: no images ({', '.join(IMAGE_EXTENSIONS)}) found in "
                         f"{data_dir}")
    return paths, np.asarray(labels, dtype=np.int32), classes


def load_image(path: str, size: int, channels: int) -> np.ndarray:
    """Decodes one file -> [size, size, channels] uint8 (resized, centre-cropped)."""
    with Image.open(path) as pil:
        pil = pil.convert("RGB" if channels == 3 else "L")
        array = np.asarray(pil)
    if channels == 1:
        array = array[:, :, None]
    return sizing.resize_center_crop(array, size)


class FolderSource:
    """Random access to an image folder; images are decoded on demand (or all at once with
    cache=True, which keeps the resized uint8 images in memory for fast epochs)."""

    def __init__(self, data_dir: str, split: str = "train", *, image_size: int | None,
                 channels: int = 3, cache: bool = False):
        if split not in FOLDER_SPLITS:
            raise DataError(f"folder source has only split(s) {FOLDER_SPLITS} (the whole "
                             f"folder), got '{split}'; point data_dir at another folder instead")
        if image_size is None or image_size <= 0:
            raise DataError(f"folder source needs a positive image_size (images are resized "
                             f"and centre-cropped to it), got {image_size}")
        if channels not in (1, 3):
            raise DataError(f"folder source: channels must be 1 or 3, got {channels}")
        self.name = "folder"
        self._paths, self._labels, self.class_names = scan_folder(data_dir)
        self._size = image_size
        self._channels = channels
        self._cache: np.ndarray | None = None
        if cache:
            self._cache = np.stack([self._load(i) for i in range(len(self._paths))])

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self._size, self._size, self._channels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _load(self, index: int) -> np.ndarray:
        path = self._paths[index]
        try:
            return load_image(path, self._size, self._channels)
        except (OSError, ValueError) as e:
            raise DataError(f"folder source: cannot read image {path}: {e}") from e

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """indices: [b] int -> (images uint8 [b, S, S, C], labels int32 [b])."""
        if self._cache is not None:
            images = self._cache[indices]
        else:
            images = np.empty((len(indices),) + self.image_shape, dtype=np.uint8)
            for j, index in enumerate(indices):
                images[j] = self._load(int(index))
        return images, self._labels[indices]
