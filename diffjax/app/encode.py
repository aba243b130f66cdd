"""Latent diffusion's data side: ``--mode encode`` (a latent cache) and encoding on the fly.

    python -m diffjax.main --config experiments/fashion_mnist_latent.py --mode encode

writes the posterior mean and std of every image of ``data.split`` under the autoencoder of
``data.latent.workdir`` into ``data.latent.cache`` (:mod:`diffjax.data.latent_cache`:
sharded, resumable after any kill, checked when read), with the labels alongside and the
latents' measured scale factor. Training then reads the cache; without one
(``data.latent.cache`` empty) each training batch is encoded as it arrives
(:class:`EncodedBatches`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffjax import data, parallel
from diffjax.app import common
from diffjax.data import latent_cache, pipeline
from diffjax.specs import Experiment


def posterior_fn(experiment: Experiment, mesh, out_sharding):
    """A jitted ``(first_stage_params, images [B, H, W, C]) -> (mean, std)`` of the latent
    task's autoencoder, unscaled, batch sharded over the mesh."""
    task = experiment.task
    rep, data_sh = parallel.replicated(mesh), parallel.data_sharding(mesh)

    def fn(params, x):
        post = task.posterior(params, x)
        return post["mean"], post["std"]

    return jax.jit(fn, in_shardings=(rep, data_sh), out_shardings=out_sharding)


def run(experiment: Experiment, workdir: str | None, mesh, *, checkpoint: str = "",
        step: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Encodes ``data.split`` into ``data.latent.cache`` (resuming a partial cache); returns
    the cache's metadata. ``workdir``, ``checkpoint``, ``step`` and ``seed`` are unused (the
    autoencoder is ``data.latent.workdir`` at ``data.latent.checkpoint_step``)."""
    del workdir, checkpoint, step, seed
    lat, d = experiment.latent, experiment.data
    source = data.make_source(**d.source_kwargs())
    _check_source(d, source)
    params, ae_step = common.first_stage_params(experiment, mesh)
    identity = lat.identity(d, common.params_digest(params), ae_step)
    shards = parallel.num_data_shards(mesh)
    gb = -(-d.batch_size // shards) * shards
    lb = gb // jax.process_count()
    fn = posterior_fn(experiment, mesh, parallel.replicated(mesh))
    data_sh = parallel.data_sharding(mesh)
    n = len(source)
    bar = tqdm.tqdm(total=n, desc="encode", unit="img", disable=jax.process_index() != 0)

    def encode_rows(start: int, stop: int):
        means, stds, labels = [], [], []
        for i in range(start, stop, gb):
            idx = np.arange(i, min(i + gb, stop))
            images, labs = source.read_batch(idx)
            x = np.zeros((gb, *images.shape[1:]), np.float32)
            x[:len(idx)] = pipeline.to_model_range(images)
            p = jax.process_index()
            arr = jax.make_array_from_process_local_data(data_sh, x[p * lb:(p + 1) * lb])
            mean, std = jax.device_get(fn(params, arr))
            means.append(np.asarray(mean)[:len(idx)])
            stds.append(np.asarray(std)[:len(idx)])
            labels.append(np.asarray(labs, np.int32))
            bar.update(len(idx))
        return np.concatenate(means), np.concatenate(stds), np.concatenate(labels)

    def progress(shard_numbers, total):
        for k in shard_numbers:
            before = bar.n
            yield k
            if bar.n == before:  # a shard done by an earlier run
                bar.update(min(lat.shard_size, n - k * lat.shard_size))

    start = time.perf_counter()
    meta = latent_cache.write(lat.cache, identity, n, lat.shard_size, encode_rows,
                              write_files=jax.process_index() == 0, progress=progress)
    bar.close()
    multihost_utils.sync_global_devices("diffjax encode done")
    if jax.process_index() == 0:
        common.say(
            f"encoded {n} {d.split} images to {tuple(lat.autoencoder.task.latent_shape)} "
            f"latents in {len(meta['shards'])} shards at {lat.cache} "
            f"({time.perf_counter() - start:.1f}s); latent std {meta['latent_std']:.4g}, "
            f"measured scale_factor {meta['measured_scale_factor']:.5g}")
    return meta


def _check_source(d, source) -> None:
    if source.image_shape[-1] != d.channels:
        raise data.DataError(f"data.channels={d.channels} but {d.source} images have "
                             f"{source.image_shape[-1]} channel(s); set "
                             f"--config.data.channels={source.image_shape[-1]}")


class EncodedBatches:
    """Pixel training batches -> ``{"mean", "std", "label"}`` of each image's posterior under
    the autoencoder (this process's rows), keeping the wrapped iterator's checkpoint state:
    encoding on the fly, when there is no latent cache."""

    def __init__(self, iterator, experiment: Experiment, mesh, first_stage_params):
        self._iterator, self._mesh, self._params = iterator, mesh, first_stage_params
        self._sharding = parallel.data_sharding(mesh)
        self._fn = posterior_fn(experiment, mesh, self._sharding)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        x = jax.make_array_from_process_local_data(self._sharding, batch["image"])
        mean, std = multihost_utils.global_array_to_host_local_array(
            self._fn(self._params, x), self._mesh, self._sharding.spec)
        rest = {k: v for k, v in batch.items() if k != "image"}
        return {**rest, "mean": np.asarray(mean), "std": np.asarray(std)}

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)
