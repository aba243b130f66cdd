"""TFDS datasets by name through `tfds.data_source` (random access, no TensorFlow at run time).

`tfds.data_source` reads datasets prepared in the ArrayRecord format. Preparing one (downloading
and converting) is a separate, one-time step that needs TensorFlow:
    tfds build cifar10 --data_dir=DIR --file_format=array_record
Reading them here does not.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import os
import tempfile

import numpy as np

from diffjax.data import sizing
from diffjax.data.errors import DataError


def _tfds():
    import tensorflow_datasets as tfds  # imported lazily: it is slow and optional at import

    return tfds


def _build_command(name: str, data_dir: str | None) -> str:
    where = f" --data_dir={data_dir}" if data_dir else ""
    return f"`tfds build {name}{where} --file_format=array_record` (building needs tensorflow)"


@contextlib.contextmanager
def _no_leftover_tempdirs():
    """Removes the empty ``tmp*tfds`` directories that appear in the system's temporary folder
    during the block. TFDS makes one each time it builds the info of a dataset that is not
    prepared where it looks (``DatasetInfo.initialize_from_bucket``, which fills it from GCS
    when that is enabled) and never removes it: one per open of an unprepared dataset, and
    tfds.data_source makes a builder of its own."""
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for path in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):  # not empty (in use): left alone
                os.rmdir(path)


def _builder(name: str, data_dir: str | None):
    tfds = _tfds()
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0], known, n=5, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}?" if close else "see tfds.list_builders()"
        raise DataError(f"unknown tfds dataset '{name}'; {hint}") from None


class TfdsSource:
    """One split of a TFDS dataset as random-access uint8 images and int labels.

    image_key / label_key name the features; label_key=None gives unconditional data (labels 0,
    num_classes 0).
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None,
                 image_size: int | None = None, resize: str = "none",
                 image_key: str = "image", label_key: str | None = "label"):
        self.name = f"tfds:{name}"
        with _no_leftover_tempdirs():
            features = self._open(name, split, data_dir, image_key, label_key)
        self._image_key = image_key
        self._label_key = label_key
        shape = tuple(features[image_key].shape)
        self._num_classes = features[label_key].num_classes if label_key is not None else 0
        if None in shape:
            if resize != "resize" or image_size is None:
                raise DataError(f"{self.name} images vary in size {shape}; set image_size and "
                                 "resize='resize'")
            self._sizer = None
            self._image_shape = (image_size, image_size, shape[-1])
        else:
            self._sizer = sizing.Sizer(shape, image_size, resize, self.name)
            self._image_shape = self._sizer.output_shape
        self._size = image_size

    def _open(self, name: str, split: str, data_dir: str | None, image_key: str,
              label_key: str | None):
        """Checks the dataset and its features, opens the split's source: the features."""
        builder = _builder(name, data_dir)
        features = builder.info.features
        if image_key not in features:
            raise DataError(f"{self.name} has no feature '{image_key}'; its features are "
                             f"{sorted(features.keys())} (set image_key)")
        if label_key is not None and label_key not in features:
            raise DataError(f"{self.name} has no feature '{label_key}'; its features are "
                             f"{sorted(features.keys())} (set label_key, or None if unlabelled)")
        tfds = _tfds()
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several unrelated types here; name the fix
            if not builder.is_prepared():
                raise DataError(f"{self.name} is not prepared in {builder.data_dir}; prepare it "
                                 f"with {_build_command(name, data_dir)}") from e
            if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
                raise DataError(f"{self.name} in {builder.data_dir} is stored as "
                                 f"{builder.info.file_format.value}, random access needs "
                                 f"array_record: rebuild with {_build_command(name, data_dir)}"
                                 ) from e
            raise DataError(f"{self.name}: cannot open split '{split}': {e}".split("\n")[0]) from e
        return features

    def __len__(self) -> int:
        return len(self._source)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """indices: [b] int, b >= 1 -> (images uint8 [b, S, S, C], labels int32 [b])."""
        # Record by record: tfds 4.9.10's mock_data breaks the batched __getitems__ (its mock
        # installs an unbound function), and grain's read threads already overlap the reads.
        records = [self._source[int(i)] for i in indices]
        images = [np.asarray(r[self._image_key], dtype=np.uint8) for r in records]
        if self._label_key is None:
            labels = np.zeros(len(records), dtype=np.int32)
        else:
            labels = np.asarray([r[self._label_key] for r in records], dtype=np.int32)
        if self._sizer is None:
            return np.stack([sizing.resize_center_crop(im, self._size) for im in images]), labels
        return self._sizer.apply_batch(np.stack(images)), labels
