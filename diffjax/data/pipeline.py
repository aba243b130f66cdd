"""grain pipelines: sources -> seeded global order -> per-process batches -> devices.

Order. Each epoch visits examples 0..N-1 in a permutation seeded by (seed, epoch) (or in
stored order without shuffling); epochs follow each other num_epochs times (None = forever)
and the stream is cut into *global* batches of global_batch_size that run across epoch
boundaries. The pipeline is a grain MapDataset over batch numbers whose map computes a
batch's indices vectorised (grain's per-element shuffle + batch cost ~20 us per example).
Process i of n reads only rows [i * B, (i + 1) * B) of each global batch (B = global_batch_size / n), so the concatenation of
all processes' local batches is the global batch that a single process would see, whatever n.
Horizontal flips are drawn per global batch from (seed, batch number), so they too do not
depend on n.

Output: {"image": float32 [B, S, S, C] in [-1, 1] (uint8 / 127.5 - 1), "label": int32 [B]};
with drop_remainder=False the last global batch is padded to full size and every batch also
has "mask": bool [B] (False on padding rows, whose image is -1 and label 0). A source of
arrays (``yields_arrays``: a latent cache, :mod:`diffjax.data.latent_cache`) gives its own
dict instead ({"mean", "std", "label"}), padding rows zero, never flipped. A source with
``read_columns(indices)`` adds its columns (a captioned source's "tokens" [B, L] int32).

Checkpointing. The returned iterators are grain `DatasetIterator`s: `it.get_state()` is a small
JSON-able dict and `it.set_state(state)` makes the next batch the first one not yet seen. With
orbax use `grain.checkpoint.CheckpointSave(item=it)` / `grain.checkpoint.CheckpointRestore(
item=it)` inside `ocp.args.Composite` (one JSON file per process).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Iterator

from absl import flags
import grain
import jax
import numpy as np

from diffjax.data import sources
from diffjax.data.errors import DataError

_SHUFFLE_STREAM, _FLIP_STREAM = 0, 1  # separate random streams derived from `seed`


@functools.lru_cache(maxsize=4)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: [N] int64, a seeded permutation (cached per process)."""
    rng = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch])
    return rng.permutation(num_examples)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1]: x / 127.5 - 1 (exact at 0 and 255)."""
    image = images.astype(np.float32)
    image /= np.float32(127.5)
    image -= np.float32(1)
    return image


class _LocalBatchReader:
    """Batch number k -> this process's batch dict (picklable, so grain workers can run it).

    Global batch k holds stream positions [k * G, (k + 1) * G); position p is example
    perm_e[p mod N] of epoch e = p // N (perm_e the identity when not shuffling); positions
    past the last epoch are padding.
    """

    def __init__(self, source: sources.ImageSource, *, global_batch_size: int,
                 process_index: int, process_count: int, random_flip: bool, seed: int,
                 shuffle: bool, num_epochs: int | None, with_mask: bool):
        self.source = source
        self.num_examples = len(source)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.random_flip = random_flip
        self.seed = seed
        self.shuffle = shuffle
        self.end = None if num_epochs is None else num_epochs * self.num_examples
        self.with_mask = with_mask

    def _local_indices(self, k: int) -> np.ndarray:
        """[B] example indices of this process's rows of global batch k (-1 = padding)."""
        b, n = self.local_batch_size, self.num_examples
        start = k * self.global_batch_size + self.process_index * b
        positions = np.arange(start, start + b, dtype=np.int64)
        epochs, offsets = np.divmod(positions, n)
        indices = offsets.copy()
        if self.shuffle:
            for epoch in np.unique(epochs):
                rows = epochs == epoch
                indices[rows] = _permutation(n, self.seed, int(epoch))[offsets[rows]]
        if self.end is not None:
            indices[positions >= self.end] = -1
        return indices

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        b = self.local_batch_size
        local = self._local_indices(k)
        mask = local >= 0
        if getattr(self.source, "yields_arrays", False):
            batch = self._arrays(local, mask)
            if hasattr(self.source, "read_columns"):  # a latent cache with captions
                batch.update(self._columns(local, mask))
            return batch
        images = np.zeros((b,) + tuple(self.source.image_shape), dtype=np.uint8)
        labels = np.zeros(b, dtype=np.int32)
        if mask.all():
            images, labels = self.source.read_batch(local)
        elif mask.any():
            images[mask], labels[mask] = self.source.read_batch(local[mask])
        if self.random_flip:
            rng = np.random.default_rng([self.seed, _FLIP_STREAM, k])
            flips = rng.random(self.global_batch_size) < 0.5
            flips = flips[self.process_index * b:(self.process_index + 1) * b]
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        batch = {"image": to_model_range(images), "label": np.asarray(labels, dtype=np.int32)}
        if hasattr(self.source, "read_columns"):  # e.g. tokenized captions (text_source)
            batch.update(self._columns(local, mask))
        if self.with_mask:
            batch["mask"] = mask
        return batch


    def _columns(self, local: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The source's columns beyond image and label (``read_columns(indices) -> {name:
        [b, ...]}``) of the unflipped examples; padding rows zero."""
        got = self.source.read_columns(local[mask])
        if mask.all():
            return dict(got)
        out = {}
        for key, value in got.items():
            out[key] = np.zeros((len(local),) + value.shape[1:], value.dtype)
            out[key][mask] = value
        return out

    def _arrays(self, local: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """A batch of a source of arrays (a latent cache): its dict as read, padding rows
        zero; no flips (flipping latents is not flipping images)."""
        got = self.source.read_batch(local[mask])
        if mask.all():
            batch = dict(got)
        else:
            batch = {}
            for key, value in got.items():
                full = np.zeros((len(local),) + value.shape[1:], value.dtype)
                full[mask] = value
                batch[key] = full
        if self.with_mask:
            batch["mask"] = mask
        return batch


def _check_batching(global_batch_size: int, process_index: int, process_count: int,
                    seed: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}; change the batch size or processes")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed={seed} must be in [0, 2**32)")


def _allow_grain_flags() -> None:
    """grain 0.2.18's worker start-up reads an absl flag and fails in scripts that never parse
    flags (google/grain#1355, fixed after 0.2.18); mark flags parsed there, keeping defaults.
    Under absl.app (diffjax.main) flags are already parsed and this does nothing."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(source: sources.ImageSource, *, global_batch_size: int, seed: int,
                  shuffle: bool, random_flip: bool, process_index: int, process_count: int,
                  num_epochs: int | None, drop_remainder: bool, num_workers: int = 0,
                  num_threads: int = 2, prefetch_batches: int = 4) -> grain.IterDataset:
    """The grain pipeline over an already built source (see module docstring)."""
    _check_batching(global_batch_size, process_index, process_count, seed)
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs={num_epochs} must be >= 1, or None to repeat forever")
    if random_flip and getattr(source, "yields_arrays", False):
        raise DataError(f"{source.name} holds encoded latents, which cannot be flipped like "
                        "images; set --config.data.random_flip=False (or encode on the fly)")
    n = len(source)
    if n == 0:
        raise DataError(f"{source.name}: the split is empty")
    if drop_remainder and num_epochs is not None and n * num_epochs < global_batch_size:
        raise DataError(f"{source.name}: {n} examples x {num_epochs} epoch(s) give no full "
                         f"batch of {global_batch_size}; lower the batch size or set "
                         "drop_remainder=False")
    total = None if num_epochs is None else n * num_epochs
    if total is None:
        num_batches = sys.maxsize // global_batch_size
    elif drop_remainder:
        num_batches = total // global_batch_size
    else:
        num_batches = -(-total // global_batch_size)
    reader = _LocalBatchReader(source, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count,
                               random_flip=random_flip, seed=seed, shuffle=shuffle,
                               num_epochs=num_epochs, with_mask=not drop_remainder)
    ds = grain.MapDataset.range(num_batches).map(reader)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        _allow_grain_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def make_train_iterator(*, source: str, split: str, image_size: int | None,
                        global_batch_size: int, seed: int, random_flip: bool,
                        process_index: int, process_count: int, num_workers: int = 0,
                        drop_remainder: bool = True, num_epochs: int | None = None,
                        data_dir: str | None = None, resize: str | None = None,
                        shuffle: bool = True, num_threads: int = 2, prefetch_batches: int = 4,
                        **source_options: Any) -> grain.DatasetIterator:
    """Training batches of this process, shuffled and repeated (see module docstring).

    source: a name from `sources.SOURCES` ("fashion_mnist_idx", "idx", "folder", "tfds:<name>");
    data_dir: where the source's files are (IDX folder, TFDS data dir, image folder);
    resize: "none" | "pad" | "resize" (default "none", "resize" for folders), see sizing;
    source_options: e.g. channels/cache (folder), split_prefixes (idx), image_key/label_key
    (tfds). Returns a checkpointable iterator of {"image": [B, S, S, C], "label": [B]} with
    B = global_batch_size / process_count.
    """
    _check_batching(global_batch_size, process_index, process_count, seed)
    src = sources.make_source(source, split=split, data_dir=data_dir, image_size=image_size,
                              resize=resize, **source_options)
    ds = build_dataset(src, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                       random_flip=random_flip, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs,
                       drop_remainder=drop_remainder, num_workers=num_workers,
                       num_threads=num_threads, prefetch_batches=prefetch_batches)
    return iter(ds)


def make_eval_iterator(*, source: str, split: str, image_size: int | None,
                       global_batch_size: int, process_index: int, process_count: int,
                       data_dir: str | None = None, resize: str | None = None,
                       num_workers: int = 0, num_threads: int = 2, prefetch_batches: int = 4,
                       **source_options: Any) -> grain.DatasetIterator:
    """One pass over a split in its stored order, no flips; the last batch padded.

    Yields {"image", "label", "mask"} with B = global_batch_size / process_count rows; count
    only rows where mask is True. Each example appears in exactly one process's batches.
    """
    _check_batching(global_batch_size, process_index, process_count, 0)
    src = sources.make_source(source, split=split, data_dir=data_dir, image_size=image_size,
                              resize=resize, **source_options)
    ds = build_dataset(src, global_batch_size=global_batch_size, seed=0, shuffle=False,
                       random_flip=False, process_index=process_index,
                       process_count=process_count, num_epochs=1, drop_remainder=False,
                       num_workers=num_workers, num_threads=num_threads,
                       prefetch_batches=prefetch_batches)
    return iter(ds)


def dataset_info(source: str, *, split: str = "train", image_size: int | None = None,
                 data_dir: str | None = None, resize: str | None = None,
                 **source_options: Any) -> tuple[int, tuple[int, int, int], int]:
    """(num_examples, image_shape (S, S, C) as the pipeline yields it, num_classes).

    Reads headers / metadata / file lists, not the images (folder with cache=True excepted).
    image_size=None gives the stored shape (folders need an image_size). num_classes is 0 for
    unconditional data. Raises the same one-line errors as the iterators, early.
    """
    src = sources.make_source(source, split=split, data_dir=data_dir, image_size=image_size,
                              resize=resize, **source_options)
    return len(src), tuple(src.image_shape), src.num_classes


class _OnDevices:
    """Checkpointable iterator putting each host batch on the mesh (one global jax.Array)."""

    def __init__(self, iterator: Iterator[dict[str, np.ndarray]], sharding: Any):
        self._iterator = iterator
        self._sharding = sharding

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self._iterator)
        out = {}
        for key, value in batch.items():
            sharding = self._sharding[key] if isinstance(self._sharding, dict) else self._sharding
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        return out

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)


def prefetch_to_mesh(iterator: grain.DatasetIterator, sharding: Any,
                     size: int = 2) -> grain.DatasetIterator:
    """Transfers batches to the devices `size` batches ahead, in a background thread.

    iterator: a checkpointable iterator of host batches (e.g. from make_train_iterator).
    sharding: a `jax.sharding.Sharding` valid for every array of the batch (e.g.
      NamedSharding(mesh, P("data")), which shards dim 0 and replicates the rest), or a dict
      {key: Sharding}. Each process's local batch becomes its part of one global jax.Array of
      batch size global_batch_size (jax.make_array_from_process_local_data).
    Returns a grain DatasetIterator whose get_state()/set_state() refer to the batches the
    caller has consumed, not the ones sitting in the buffer, so it is what to checkpoint.
    """
    if size < 0:
        raise DataError(f"prefetch size must be >= 0, got {size}")
    return grain.experimental.ThreadPrefetchDatasetIterator(_OnDevices(iterator, sharding), size)
