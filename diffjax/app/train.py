"""``--mode train``: data, the trainer's loop, and the EMA sample grids it draws."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffjax import data, generate, parallel
from diffjax.app import common, references
from diffjax.app import encode as encode_lib
from diffjax.app import text as text_app
from diffjax.app import sample as sample_lib
from diffjax.data import latent_cache
from diffjax.diffusion import superres as superres_lib
from diffjax.specs import DataSpec, Experiment
from diffjax.train import loop
from diffjax.train.state import TrainState


def train_iterator(d: DataSpec, seed: int, process_index: int, process_count: int):
    """This process's shard of the training data (grain iterator of local batches).

    ``d.path`` "" means the source's default location. Checks ``d.channels`` and
    ``d.num_classes`` against the data before any training starts.
    """
    common_kwargs = d.source_kwargs()
    _, shape, num_classes = data.dataset_info(**common_kwargs)
    if shape[-1] != d.channels:
        raise data.DataError(f"data.channels={d.channels} but {d.source} images have "
                             f"{shape[-1]} channel(s); set --config.data.channels={shape[-1]}")
    if d.num_classes > 0 and d.num_classes != num_classes:
        raise data.DataError(f"data.num_classes={d.num_classes} but {d.source} has {num_classes}"
                             f" classes; set --config.data.num_classes={num_classes} (0 = ignore"
                             " labels)")
    return data.make_train_iterator(
        **common_kwargs, global_batch_size=d.batch_size, seed=seed, random_flip=d.random_flip,
        process_index=process_index, process_count=process_count, num_workers=d.num_workers)


def _latent_source(experiment: Experiment, first_stage_params, ae_step: int):
    """The latent cache's source (checked against this autoencoder, data and latent shape),
    or None without a cache."""
    d, lat = experiment.data, experiment.latent
    if not lat.cache:
        return None
    identity = lat.identity(d, common.params_digest(first_stage_params), ae_step)
    source = latent_cache.LatentCacheSource(lat.cache, identity)
    if d.num_classes > 0 and source.num_classes != d.num_classes:
        raise data.DataError(f"latent cache {lat.cache} has {source.num_classes} classes, "
                             f"data.num_classes={d.num_classes}")
    return source


def latent_train_iterator(experiment: Experiment, mesh, first_stage_params, ae_step: int,
                          process_index: int, process_count: int, tokenizer=None):
    """A latent model's training batches ``{"mean", "std", "label"}`` (a text model's with
    its ``"tokens"`` / ``"context"`` column, ``tokenizer``: a jointly trained encoder's):
    from its latent cache (checked against this autoencoder, data and latent shape first),
    else the pixel batches encoded as they come."""
    d, seed = experiment.data, experiment.train.seed
    source = _latent_source(experiment, first_stage_params, ae_step)
    if experiment.text is not None:  # with the captions (or embeddings) of the same examples
        if tokenizer is not None:
            it = text_app.train_iterator(experiment, tokenizer, process_index, process_count,
                                         inner=source)
        else:
            it = text_app.embedding_train_iterator(experiment, process_index, process_count,
                                                   inner=source)
    elif source is not None:
        it = iter(data.build_dataset(
            source, global_batch_size=d.batch_size, seed=seed, shuffle=True,
            random_flip=d.random_flip, process_index=process_index,
            process_count=process_count, num_epochs=None, drop_remainder=True,
            num_workers=d.num_workers))
    else:
        it = train_iterator(d, seed, process_index, process_count)
    if source is None:  # pixel batches, encoded as they come
        return encode_lib.EncodedBatches(it, experiment, mesh, first_stage_params)
    return it


def first_eval_batch(experiment: Experiment, mesh, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` examples of the eval split (``image`` float32, ``label``), the same on
    every process (each reads its part of a batch; the parts are gathered)."""
    it, _, _ = references.eval_batches(experiment, mesh, max(n, 8))
    batch = {k: np.asarray(v) for k, v in next(iter(it)).items() if k in ("image", "label")}
    if jax.process_count() > 1:
        batch = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                 for k, v in batch.items()}
    return {"image": batch["image"].astype(np.float32)[:n], "label": batch["label"][:n]}


def reconstruction_drawer(experiment: Experiment, mesh):
    """``ema_params -> (input | reconstruction rows, 0)`` on the first
    ``train.num_sample_images`` images of the eval split (an autoencoder's grids)."""
    task, n = experiment.task, experiment.train.num_sample_images
    images = first_eval_batch(experiment, mesh, n)["image"]
    rep, shard = parallel.replicated(mesh), experiment.train.shard_state

    def reconstruct(p, x):
        p = parallel.gathered(p, mesh, shard)
        return jnp.clip(task.decode(p, task.encode(p, x)[0]), -1.0, 1.0)

    fn = jax.jit(reconstruct, in_shardings=(generate.param_sharding(task, mesh, shard), rep),
                 out_shardings=rep)

    def draw(ema_params):
        recon = np.asarray(jax.device_get(fn(ema_params, images)))
        rows = sample_lib.side_by_side(images, recon, ncol=8)
        return rows, len(rows) // 8  # that many rows of 8

    return draw


def superres_drawer(experiment: Experiment, generator: generate.Generator, mesh):
    """``ema_params -> (rows, their labels)``: for each 8 of the first
    ``train.num_sample_images`` images of the eval split, a row of their low-resolution
    versions (the training conditioning without augmentation, enlarged by pixel repetition),
    a row of the model's samples from them and a row of the originals."""
    task, t = experiment.task, experiment.train
    batch = first_eval_batch(experiment, mesh, t.num_sample_images)
    originals = batch["image"]
    low = np.asarray(superres_lib.downsample(originals, task.superres.low_res_size))
    labels = batch["label"].astype(np.int32) if task.class_cond else None
    size = f"{task.superres.low_res_size}x{task.superres.low_res_size}"

    def draw(ema_params):
        images, _ = generator(ema_params, len(low), jax.random.PRNGKey(t.seed + 1),
                              labels=labels, inputs=low)
        rows = sample_lib.side_by_side(low, images, originals, ncol=8)
        return rows, [f"{size} input", "sample", "original"] * (len(rows) // 24)

    return draw


def grid_drawer(experiment: Experiment, mesh, first_stage_params=None, tokenizer=None):
    """``ema_params -> (images, rows)`` of the training grids (rows: the number of classes,
    0 = unlabelled, or the label of each row: a text model's prompts, a super-resolution
    model's input | sample | original rows), or None for a task that draws no samples (a
    classifier); first_stage_params: a latent model's autoencoder (its samples are
    decoded); tokenizer: a text model's."""
    task, t = experiment.task, experiment.train
    if t.sample_every > 0 and task.reconstructs:
        return reconstruction_drawer(experiment, mesh)
    if not task.draws_samples or t.sample_every <= 0:
        return None
    generator = generate.Generator(task, experiment.sampling, mesh,
                                   common.classifier_params(experiment.sampling, mesh),
                                   batch_size=min(experiment.sampling.batch_size,
                                                  t.num_sample_images),
                                   first_stage_params=first_stage_params,
                                   shard_params=t.shard_state)
    if task.needs_inputs:  # a super-resolution model: from the eval split's images
        return superres_drawer(experiment, generator, mesh)
    per_row = task.num_classes if task.class_cond else 0
    tokens = None
    if experiment.text is not None:  # a text model: one row per prompt
        per_row, _, tokens, _ = text_app.conditions(experiment, tokenizer,
                                                    t.num_sample_images, "grid")

    def draw(ema_params):
        n = t.num_sample_images if tokens is None else len(tokens)
        images, _ = generator(ema_params, n, jax.random.PRNGKey(t.seed + 1), labels=tokens,
                              grouped=True)
        return images, per_row

    return draw


def run(experiment: Experiment, workdir: str, mesh, *, allow_config_change: bool = False,
        data_iterator=None, started: float | None = None) -> TrainState:
    """Trains to ``train.num_steps``, resuming from ``WORKDIR/checkpoints`` if it has any."""
    loop.check_workdir_config(workdir, experiment.resolved, allow_config_change)
    fs_params, ae_step = common.first_stage_params(experiment, mesh)
    tokenizer = None
    if experiment.text is not None and not experiment.text.precomputed:
        tokenizer = text_app.training_tokenizer(experiment, workdir)
    if data_iterator is not None:
        it = data_iterator
    elif experiment.latent is not None:
        it = latent_train_iterator(experiment, mesh, fs_params, ae_step, jax.process_index(),
                                   jax.process_count(), tokenizer)
    elif tokenizer is not None:
        it = text_app.train_iterator(experiment, tokenizer, jax.process_index(),
                                     jax.process_count())
    elif experiment.text is not None:
        it = text_app.embedding_train_iterator(experiment, jax.process_index(),
                                               jax.process_count())
    else:
        it = train_iterator(experiment.data, experiment.train.seed, jax.process_index(),
                            jax.process_count())
    return loop.train(experiment.task, experiment.optim, experiment.train, workdir, mesh, it,
                      resolved=experiment.resolved, global_batch=experiment.data.batch_size,
                      draw_grid=grid_drawer(experiment, mesh, fs_params, tokenizer),
                      started=started)
