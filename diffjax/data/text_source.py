"""Captioned image sources: each example's caption, tokenized, as the batch's "tokens" column.

A captioner (``text.captions``, table :data:`CAPTIONERS`) says what each example's caption
is, which prompts a model of its data is shown by default, and how to score whether samples
follow a prompt. One today:

  "fashion_mnist_attributes"  Fashion-MNIST: the class word and the garment's measured
                              brightness and size, each split at its class's median over the
                              train split (:mod:`diffjax.data.captions`), e.g. "a dark small
                              sneaker"; each attribute word kept with probability
                              ``text.caption_keep_prob``, fixed per example.

:class:`CaptionedSource` wraps an image source and adds ``read_columns(indices) ->
{"tokens": int32 [b, L]}``, which :mod:`diffjax.data.pipeline` puts in every batch; the
tokens of the whole split are computed once, so reading them is a gather.

Precomputed embeddings (``text.encoder="embeddings"``, ``text.embeddings``) come as an .npz
(arrays "context" [N, L, D], "mask" [N, L], optional "prompts" [N]; read whole,
:func:`load_embeddings`, :class:`EmbeddingSource`) or as an ArrayRecord file for datasets
whose embeddings do not fit in memory (``*.array_record``: record i is example i's
``flax.serialization.msgpack_serialize({"context": [L, D] float, "mask": [L] bool})``, an
optional "prompt" string beside them; read per batch, :class:`RecordEmbeddings`,
:class:`RecordEmbeddingSource`). msgpack decoding never runs code from the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import serialization

from diffjax.data import captions as captions_lib
from diffjax.data import sources
from diffjax.data.errors import DataError
from diffjax.text import TextError


def _all_examples(source: sources.ImageSource) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S, C], labels [N]) of a whole split."""
    return source.read_batch(np.arange(len(source)))


class FashionMnistAttributes:
    """Captions of Fashion-MNIST from the label and measured attributes.

    train: the train split (its per-class medians are the attribute thresholds of every
    split); seed / keep_prob: which attribute words each example's caption keeps.
    """

    name = "fashion_mnist_attributes"

    def __init__(self, train: sources.ImageSource, seed: int = 0, keep_prob: float = 0.75):
        if train.num_classes != len(captions_lib.CLASS_WORDS) or train.image_shape[-1] != 1:
            raise DataError(
                f"text.captions='{self.name}' captions Fashion-MNIST (10 classes, 1 channel); "
                f"{train.name} has {train.num_classes} classes and {train.image_shape[-1]} "
                "channel(s): use data.source='fashion_mnist_idx' or another captioner")
        if not 0.0 <= keep_prob <= 1.0:
            raise DataError(f"text.caption_keep_prob={keep_prob} must be in [0, 1]")
        images, labels = _all_examples(train)
        self.thresholds = captions_lib.thresholds_from(images, labels, train.num_classes)
        self.seed, self.keep_prob = int(seed), float(keep_prob)

    def captions(self, source: sources.ImageSource) -> list[str]:
        """The caption of every example of ``source`` (a split of the same data), in order."""
        images, labels = _all_examples(source)
        return captions_lib.captions_for(images, labels, np.arange(len(source)),
                                         self.thresholds, seed=self.seed,
                                         keep_prob=self.keep_prob)

    def grid_prompts(self) -> tuple[str, ...]:
        """The default rows of a sample grid: one prompt per class, attributes alternating."""
        bright, size = ({a.name: (a.low, a.high) for a in captions_lib.ATTRIBUTES}[k]
                        for k in ("brightness", "size"))
        return tuple(f"a {bright[k % 2]} {size[(k // 2) % 2]} {word}"
                     for k, word in enumerate(captions_lib.CLASS_WORDS))

    def eval_prompts(self) -> tuple[str, ...]:
        """The prompts of ``--mode eval``: every class with every attribute combination."""
        return tuple(captions_lib.default_prompts())

    def targets(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """What each prompt asks for ({"label", "brightness", "size"}, None = not named);
        TextError for a prompt it cannot score (no class, an unknown or contradictory word)."""
        try:
            return [captions_lib.parse_prompt(p) for p in prompts]
        except ValueError as e:
            raise TextError(f"{e} (text.captions='{self.name}' scores prompts of its own "
                            "words)") from None

    def score(self, images: np.ndarray, prompts: Sequence[str],
              predicted_labels: np.ndarray | None) -> dict[str, float]:
        """How often samples [N, H, W, 1] in [-1, 1] drawn from ``prompts`` [N] have what
        their prompt names: {"class_accuracy" (from the feature classifier's
        ``predicted_labels``), "brightness_accuracy", "size_accuracy"} and their counts."""
        got = captions_lib.score(images, self.targets(prompts), predicted_labels,
                                 self.thresholds)
        return {k: v for k, v in got.items() if v is not None}


CAPTIONERS = {"fashion_mnist_attributes": FashionMnistAttributes}


class CaptionedSource:
    """``inner`` (an image source, or a latent cache of its examples in their order) plus each
    example's caption as tokens [L] (``read_columns``).

    tokens: [N, L] int32 of every example of ``inner`` in order (``Tokenizer.encode`` of the
    captioner's captions)."""

    def __init__(self, inner: sources.ImageSource, tokens: np.ndarray):
        if tokens.ndim != 2 or len(tokens) != len(inner):
            raise DataError(f"{inner.name}: {len(inner)} examples but tokens of shape "
                            f"{tokens.shape}")
        self.inner, self.tokens = inner, np.asarray(tokens, np.int32)
        self.name = f"{inner.name}+captions"

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def yields_arrays(self) -> bool:
        """Whether ``inner`` reads dicts of arrays (a latent cache's posteriors)."""
        return getattr(self.inner, "yields_arrays", False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.inner.image_shape

    @property
    def num_classes(self) -> int:
        return self.inner.num_classes

    def read_batch(self, indices: np.ndarray) -> Any:
        return self.inner.read_batch(indices)

    def read_columns(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[indices]}


def is_record_file(path: str) -> bool:
    """Whether ``path`` names an ArrayRecord file of embeddings (by its suffix)."""
    return path.endswith(".array_record")


def _check_fits(path: str, shape: tuple[int, int], width: int, context_length: int) -> None:
    """One-line DataError unless embeddings [L, D] fit the model: D == ``width``,
    L <= ``context_length``."""
    length, dim = shape
    if dim != width:
        raise DataError(f"{path}: embeddings of width {dim} but text.width={width}: set "
                        f"--config.text.width={dim} (the model's context width)")
    if length > context_length:
        raise DataError(f"{path}: {length} embeddings per example but text.context_length="
                        f"{context_length}: set --config.text.context_length={length}")


def load_embeddings(path: str, width: int, context_length: int, count: int | None = None,
                    rows: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(context [N, L, D] float32, mask [N, L] bool, prompts [N] str or None) of an .npz of
    precomputed embeddings: arrays "context" [N, L, D] (float), optionally "mask" [N, L]
    (bool or 0/1; default all valid) and "prompts" [N] (their texts, for grid labels); or of
    every record of an ArrayRecord file (see the module docstring); only the first ``rows``
    when given (an ArrayRecord file is read no further).
    One-line DataError if the file or its "context" column is missing, D != ``width``,
    L > ``context_length``, N != ``count`` (when given), or a row has no valid entry."""
    if not path:
        raise DataError("text.encoder='embeddings' needs the embeddings file: set "
                        "--config.text.embeddings=FILE.npz (arrays context [N, L, D], mask)")
    if is_record_file(path):
        records = RecordEmbeddings(path, width, context_length, count)
        n = len(records) if rows is None else min(rows, len(records))
        context, mask = records.read(np.arange(n))
        return context, mask, records.prompts(n)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"embeddings file {path} not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npz of embeddings ({e})") from None
    if "context" not in arrays:
        raise DataError(f"{path} has no 'context' column (it has {sorted(arrays)}); store "
                        "the embeddings as context [N, L, D] and their mask as mask [N, L]")
    context = arrays["context"]
    if context.ndim != 3 or not np.issubdtype(context.dtype, np.floating):
        raise DataError(f"{path}: context must be floats of shape [N, L, D], got "
                        f"{context.dtype} {context.shape}")
    n, length, _ = context.shape
    _check_fits(path, context.shape[1:], width, context_length)
    if count is not None and n != count:
        raise DataError(f"{path} holds {n} rows of embeddings but the data has {count} "
                        "examples: give one row per example, in the data's order")
    mask = arrays.get("mask")
    if mask is None:
        mask = np.ones((n, length), bool)
    elif mask.shape != (n, length):
        raise DataError(f"{path}: mask must have shape [N, L] = {(n, length)}, got "
                        f"{mask.shape}")
    mask = np.asarray(mask).astype(bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if len(empty):
        raise DataError(f"{path}: row {empty[0]} has no valid embedding (its mask is all "
                        "False, which is the null condition); give every row at least one")
    prompts = arrays.get("prompts")
    if prompts is not None and prompts.shape != (n,):
        raise DataError(f"{path}: prompts must have shape [N] = ({n},), got {prompts.shape}")
    prompts = None if prompts is None else prompts.astype(str)[:rows]
    return context.astype(np.float32)[:rows], mask[:rows], prompts


def pack(context: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, L, D] and [N, L] -> [N, L, D + 1] float32, the mask in the last channel (the
    condition of :class:`diffjax.models.text_encoder.EmbeddingConditioned`)."""
    return np.concatenate([context, mask.astype(np.float32)[..., None]], axis=-1)


class EmbeddingSource(CaptionedSource):
    """``inner`` plus each example's precomputed embeddings and mask, packed as the
    "context" column [b, L, D + 1] (:func:`pack`)."""

    def __init__(self, inner: sources.ImageSource, context: np.ndarray, mask: np.ndarray):
        if len(context) != len(inner):
            raise DataError(f"{inner.name}: {len(inner)} examples but {len(context)} rows of "
                            "embeddings")
        self.inner, self.packed = inner, pack(context, mask)
        self.name = f"{inner.name}+embeddings"

    def read_columns(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"context": self.packed[indices]}


class RecordEmbeddings:
    """Precomputed embeddings in an ArrayRecord file, one record per example (see the module
    docstring), read on demand. Opening checks the file, its record count against ``count``
    and the first record (columns, D == ``width``, L <= ``context_length``); every record
    read is checked to have the first one's L and at least one valid entry. Picklable (grain
    workers reopen the file)."""

    def __init__(self, path: str, width: int, context_length: int, count: int | None = None):
        from array_record.python import array_record_data_source  # only for these files

        if not os.path.isfile(path):
            raise DataError(f"embeddings file {path} not found")
        try:
            self._records = array_record_data_source.ArrayRecordDataSource([path])
            n = len(self._records)
        except (RuntimeError, ValueError, OSError) as e:
            raise DataError(f"{path} is not a readable ArrayRecord file of embeddings "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                            ) from None
        self.path, self.width = path, width
        if count is not None and n != count:
            raise DataError(f"{path} holds {n} records of embeddings but the data has {count} "
                            "examples: give one record per example, in the data's order")
        if n == 0:
            raise DataError(f"{path} holds no records of embeddings")
        self._n = n
        self.length = None
        context, _ = self._decode(0)
        _check_fits(path, context.shape, width, context_length)
        self.length = len(context)

    def __len__(self) -> int:
        return self._n

    def _record(self, i: int) -> dict[str, Any]:
        try:
            record = serialization.msgpack_restore(self._records[int(i)])
        except Exception as e:  # noqa: BLE001  msgpack's and array_record's errors vary
            raise DataError(f"{self.path}: record {i} is not a msgpack map of embeddings "
                            f"({type(e).__name__}); write each with "
                            "flax.serialization.msgpack_serialize({'context': ..., "
                            "'mask': ...})") from None
        if not isinstance(record, dict) or "context" not in record:
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{self.path}: record {i} has no 'context' column (it has {got}); "
                            "store each example's embeddings as context [L, D] and their "
                            "mask as mask [L]")
        return record

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        record = self._record(i)
        context = np.asarray(record["context"])
        if context.ndim != 2 or not np.issubdtype(context.dtype, np.floating):
            raise DataError(f"{self.path}: record {i}: context must be floats of shape [L, D], "
                            f"got {context.dtype} {context.shape}")
        want = (self.length, self.width) if self.length is not None else context.shape
        if context.shape != want:
            raise DataError(f"{self.path}: record {i}: context of shape {context.shape}, but "
                            f"record 0 has {want}: give every example the same [L, D]")
        mask = record.get("mask")
        mask = np.ones(len(context), bool) if mask is None else np.asarray(mask).astype(bool)
        if mask.shape != (len(context),):
            raise DataError(f"{self.path}: record {i}: mask must have shape [L] = "
                            f"({len(context)},), got {mask.shape}")
        if not mask.any():
            raise DataError(f"{self.path}: record {i} has no valid embedding (its mask is all "
                            "False, which is the null condition); give every row at least one")
        return context.astype(np.float32), mask

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(context [b, L, D] float32, mask [b, L] bool) of the records ``indices``."""
        context = np.empty((len(indices), self.length, self.width), np.float32)
        mask = np.empty((len(indices), self.length), bool)
        for k, i in enumerate(indices):
            context[k], mask[k] = self._decode(i)
        return context, mask

    def prompts(self, n: int) -> np.ndarray | None:
        """The "prompt" strings (grid labels) of the first ``n`` records, or None when record 0
        has none."""
        if "prompt" not in self._record(0):
            return None
        return np.array([str(self._record(i).get("prompt", f"#{i}")) for i in range(n)])


class RecordEmbeddingSource(CaptionedSource):
    """``inner`` plus each example's embeddings read from ``records`` (:class:`RecordEmbeddings`)
    per batch, packed as the "context" column [b, L, D + 1] (:func:`pack`)."""

    def __init__(self, inner: sources.ImageSource, records: RecordEmbeddings):
        if len(records) != len(inner):
            raise DataError(f"{inner.name}: {len(inner)} examples but {len(records)} records "
                            "of embeddings")
        self.inner, self.records = inner, records
        self.name = f"{inner.name}+embeddings"

    def read_columns(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"context": pack(*self.records.read(indices))}
