"""A domain feature network: a classifier trained by diffjax on the dataset itself.

Where Inception is a poor fit (28x28 grayscale Fashion-MNIST) or no Inception weights are at
hand, a clean classifier (``experiments/fmnist_features.py``, an
:class:`diffjax.models.classifier.EncoderClassifier` trained with ``--mode train``) gives
- penultimate features: the input of the classifier's last projection (the attention-pooled
  mean token [B, C] for ``pool="attention"``, the spatial mean [B, C] for ``"adaptive"``),
  whose Frechet distance between samples and data is reported as ``fd_<domain>`` (never
  "FID": the numbers are only comparable between runs using the same feature run);
- predictions: argmax of its logits, whose agreement with the labels the samples were drawn
  for is the ``class_accuracy`` of class-conditional samples.

The features are read with :func:`flax.linen.intercept_methods` (the input of the last Dense),
so the classifier's code and parameter tree stay as trained. The time input is 0 (clean
images), as the feature classifier was trained with ``model.classifier_noised=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffjax import hugepages, parallel
from diffjax.evaluation.metrics import MetricError

# Scope paths of the last projection of EncoderClassifier, per pool.
HEAD_PATHS = (("out_pool", "c_proj"), ("out_proj",))


def penultimate_and_logits(model: nn.Module, params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, H, W, C] clean images in [-1, 1] -> (features [B, D] float32, logits [B, K])."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and isinstance(module, nn.Dense)
                and tuple(module.scope.path) in HEAD_PATHS):
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        logits = model.apply({"params": params}, x, jnp.zeros((x.shape[0],), jnp.float32),
                             train=False)
    if len(captured) != 1:
        raise ValueError(f"expected one classifier head among {HEAD_PATHS}, found "
                         f"{len(captured)}; is the model an EncoderClassifier?")
    feats = captured[0].astype(jnp.float32)
    return feats.reshape(feats.shape[0], -1), logits.astype(jnp.float32)


class FeatureNet:
    """The trained feature classifier, replicated on a mesh, applied in sharded batches.

    ``image_shape``: (H, W, C) of the images it was trained on; ``step``: its checkpoint.
    """

    def __init__(self, model: nn.Module, image_shape: tuple[int, int, int], params, mesh,
                 step: int, batch_size: int):
        self.model, self.image_shape, self.mesh, self.step = model, image_shape, mesh, step
        shards = parallel.num_data_shards(mesh)
        self.batch_size = -(-batch_size // shards) * shards
        self._params = jax.device_put(params, parallel.replicated(mesh))
        self._data = parallel.data_sharding(mesh)
        self._fn = jax.jit(lambda p, x: penultimate_and_logits(model, p, x),
                           in_shardings=(parallel.replicated(mesh), self._data),
                           out_shardings=parallel.replicated(mesh))

    def _check(self, images: np.ndarray) -> None:
        want = tuple(self.image_shape)
        if tuple(images.shape[1:]) != want:
            raise MetricError(
                f"the feature classifier was trained on images {want}, got {images.shape[1:]};"
                " set eval.features_config to a classifier of this data")

    def __call__(self, images: np.ndarray, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
        """images: [N, H, W, C] in [-1, 1], the same on every process -> (features [N, D],
        logits [N, K]) NumPy float32."""
        images = np.asarray(images, np.float32)
        self._check(images)
        n, b = len(images), self.batch_size
        batches = (_pad(images[i:i + b], b) for i in range(0, n, b))
        feats, logits = [], []
        for x, count in tqdm.tqdm(batches, total=math.ceil(n / b), desc="features", unit="batch",
                                  disable=not progress or jax.process_index() != 0):
            f, lg = self._fn(self._params, jax.device_put(x, self._data))
            feats.append(np.asarray(f)[:count])
            logits.append(np.asarray(lg)[:count])
            if len(feats) == 1:  # what compiling freed goes back to the system
                hugepages.release_freed_memory()
        return np.concatenate(feats), np.concatenate(logits)

    def of_local_batches(self, batches: Iterable[dict[str, np.ndarray]], total: int | None = None
                         ) -> np.ndarray:
        """Features [N, D] of an eval iterator's local batches ({"image", "mask"}; each
        process passes its own part); every process gets all processes' valid rows."""
        out = []
        for batch in tqdm.tqdm(batches, total=total, desc="reference features", unit="batch",
                               disable=jax.process_index() != 0):
            self._check(batch["image"])
            x = jax.make_array_from_process_local_data(self._data, batch["image"])
            f, _ = self._fn(self._params, x)
            out.append(np.asarray(f)[gather_mask(batch["mask"])])
            if len(out) == 1:  # what compiling freed goes back to the system
                hugepages.release_freed_memory()
        return np.concatenate(out)


def gather_mask(local_mask: np.ndarray) -> np.ndarray:
    """All processes' masks in the order of ``make_array_from_process_local_data``."""
    if jax.process_count() == 1:
        return np.asarray(local_mask, bool)
    return np.asarray(multihost_utils.process_allgather(local_mask, tiled=True), bool)


def _pad(x: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    count = len(x)
    if count < size:
        x = np.concatenate([x, np.zeros((size - count, *x.shape[1:]), x.dtype)])
    return x, count
