"""``--mode eval``: samples at each sweep point, their metrics, one JSON and PNG per point.

For every point of the sweep (``eval.sweep_num_steps`` x ``eval.sweep_guidance_scales``; the
configured ``sampler.num_steps`` / ``guidance.scale`` when a list is empty) this draws
``eval.num_samples`` class-balanced samples (sharded over the mesh; the same seed at every
point), computes ``eval.metrics`` (:mod:`diffjax.evaluation.sample_metrics`) and writes the
records of :mod:`diffjax.app.records`; for a sweep of several points also
``WORKDIR/eval/<prefix>sweep_vs_<axis>.png`` with each metric against the swept axis.
``wall_time_s`` is the point's sampling plus metric time (including compilation); work shared
by all points (reference statistics, NLL) is not in it. The sampling program is compiled once
per step count: the guidance scale is one of its traced arguments.

A text model's samples come from ``sampler.prompts`` (default: its captioner's evaluation
prompts, every class with every attribute combination), ``eval.num_samples / len(prompts)``
each; ``class_accuracy`` is against the class each prompt names and ``attribute_accuracy``
reports ``<attribute>_accuracy``: the fraction of samples whose measured attribute is the
prompted one, over the prompts naming it (:mod:`diffjax.data.captions`).

``nll`` alone draws no samples: one ``WORKDIR/eval/nll.json`` (``eval.name`` when set) holds
it with the split and image count. Records with ``nll`` state
``settings.nll_clip_denoised`` (``eval.nll_clip_denoised``, default True as ADM's
``image_nll.py``). A classifier run gets its top-1 accuracy on ``eval.split`` instead (:func:`evaluate_accuracy`): ``WORKDIR/eval/accuracy.json``.

Everything that can be wrong is checked before the checkpoint is read: the config by
:func:`diffjax.experiment.build` (mode ``eval``), the files by :func:`check_files`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from diffjax import checkpoint, data, generate, parallel, tasks
from diffjax.app import common, records, references
from diffjax.app import sample as sample_lib
from diffjax.app import text as text_app
from diffjax.diffusion import process
from diffjax.errors import ConfigError
from diffjax.evaluation import convert_inception
from diffjax.evaluation import features as features_lib
from diffjax.evaluation import grid
from diffjax.evaluation import metrics as metrics_lib
from diffjax.evaluation import sample_metrics
from diffjax.specs import Experiment


def _needs_data(experiment: Experiment) -> bool:
    """Whether eval.split is read: fd_* / nll references, or Inception without a .npz."""
    e = experiment.eval
    names = e.metrics
    inception_data = sample_metrics.needs_inception(names) and not e.reference_stats
    return any(m.startswith("fd_") or m == "nll" for m in names) or inception_data


def missing_run_message(config_path: str, workdir: str) -> str:
    return (f"no trained feature classifier at {workdir!r} (eval.features_workdir); train it with"
            f" `python -m diffjax.main --config {config_path} --workdir {workdir}` or set "
            "eval.features_workdir")


def check_split(experiment: Experiment) -> None:
    """DataError now if the data's ``eval.split`` is missing."""
    data.dataset_info(**experiment.data.source_kwargs(experiment.eval.split))


def check_files(experiment: Experiment) -> None:
    """One-line errors for every file sample metrics will need, before any work."""
    e = experiment.eval
    if e.features is not None:
        ckpt = epath.Path(checkpoint.checkpoint_dir(e.features_workdir))
        if not ckpt.exists() or not any(p.name.isdigit() for p in ckpt.iterdir()):
            raise checkpoint.CheckpointError(missing_run_message(e.features_config,
                                                                 e.features_workdir))
    if _needs_data(experiment):
        check_split(experiment)
    if sample_metrics.needs_inception(e.metrics):
        if not e.inception_weights or not os.path.isfile(e.inception_weights):
            raise ConfigError(
                f"{[m for m in e.metrics if m in sample_metrics.INCEPTION_METRICS]} need "
                f"Inception weights: eval.inception_weights={e.inception_weights!r} is not a "
                "file; convert them with `python -m diffjax.evaluation.convert_inception "
                "--torch PTH --out inception_fid.npz` and pass "
                "--config.eval.inception_weights=inception_fid.npz")
        if e.reference_stats and not os.path.isfile(e.reference_stats):
            raise ConfigError(f"eval.reference_stats={e.reference_stats!r} not found; give an "
                              "ADM-style .npz or '' for the data's split")


def check_reconstruction(experiment: Experiment) -> None:
    """An autoencoder's :func:`check_files` (the feature run of ``fd_<domain>``) and its
    ``eval.split``, which is always read."""
    check_files(experiment)
    if not _needs_data(experiment):
        check_split(experiment)


def load_features(experiment: Experiment, mesh) -> features_lib.FeatureNet:
    """The feature classifier of ``eval.features_config`` with its run's latest EMA params."""
    e = experiment.eval
    fc = e.features
    params, step = common.restore_params(fc.task, mesh, e.features_workdir)
    return features_lib.FeatureNet(fc.task.model, fc.task.image_shape, params, mesh, step,
                                   e.batch_size)


def run(experiment: Experiment, workdir: str, mesh, *, checkpoint: str = "",
        step: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
    """Samples and metrics of ``eval`` into ``WORKDIR/eval/``; returns the records written."""
    evaluate, check = _for_task(experiment.task)
    check(experiment)
    extra = {}
    if experiment.text is not None:  # its prompts, checked before the checkpoint is read
        tokenizer = text_app.load_tokenizer(experiment, checkpoint or workdir)
        prompts = text_app.prompts_for(experiment, "eval")
        extra["prompted"] = text_app.prompt_samples(tokenizer, prompts,
                                                    experiment.eval.num_samples)
        text_app.captioner(experiment).targets(prompts)  # each names what it is scored on
    params, got = common.model_params(experiment, mesh, checkpoint or workdir, step)
    if experiment.ema_sigma_rel and not experiment.eval.name:  # records named per profile
        experiment = dataclasses.replace(experiment, eval=dataclasses.replace(
            experiment.eval, name=f"ema-{experiment.ema_sigma_rel:g}"))
    return evaluate(experiment, workdir, mesh, params, got,
                    experiment.eval.seed if seed is None else seed, **extra)


def evaluate_samples(experiment: Experiment, workdir: str, mesh, params, checkpoint_step: int,
                     seed: int, prompted=None) -> list[dict[str, Any]]:
    """Runs every sweep point; returns the records written to WORKDIR/eval/<name>.json.

    prompted: a text model's (prompt of each sample, their tokens [N, L], samples per
    prompt) (:func:`diffjax.app.text.prompt_samples`): its samples are drawn from them,
    ``class_accuracy`` is against each prompt's class and ``attribute_accuracy`` gives
    ``<attribute>_accuracy`` per attribute the prompts name (``text.captions``' scoring)."""
    e, task, sampling = experiment.eval, experiment.task, experiment.sampling
    names = e.metrics
    labels = num = None
    if prompted is not None:
        per_sample, labels, per = prompted
        cap = text_app.captioner(experiment)
        targets = [t["label"] for t in cap.targets(per_sample)]
        class_labels = np.asarray([-1 if t is None else t for t in targets], np.int32)
        num = len(labels)
    out = epath.Path(workdir) / "eval"
    net = fd_ref = inc_params = inc_ref = None
    if sample_metrics.needs_features(names):
        net = load_features(experiment, mesh)
        if f"fd_{e.domain}" in names:
            fd_ref = references.fd_reference(experiment, mesh, net, out)
    if sample_metrics.needs_inception(names):
        inc_params = convert_inception.load_inception_params(e.inception_weights)
        inc_ref = references.inception_reference(experiment, mesh, inc_params, out)
    key = jax.random.PRNGKey(seed)
    shared: dict[str, float] = {}
    settings = {"nll_clip_denoised": e.nll_clip_denoised} if "nll" in names else {}
    if experiment.ema_sigma_rel:
        settings["ema_sigma_rel"] = experiment.ema_sigma_rel
    if "nll" in names:
        start = time.perf_counter()
        result = references.nll(experiment, mesh, params, jax.random.fold_in(key, 1))
        shared = {"nll_bpd": result.bpd, "nll_bpd_stderr": result.stderr}
        common.say(f"nll: {result.bpd:.4f} +- {result.stderr:.4f} bits/dim over "
                   f"{result.num_examples} {e.split} images")
        if names == ("nll",):  # nothing depends on samples: draw none
            return [records.write_split_record(
                out, e.name or "nll", shared, e.split, result.num_examples, checkpoint_step,
                time.perf_counter() - start, settings)]
    cls_params = common.classifier_params(sampling, mesh)
    fs_params, _ = common.first_stage_params(experiment, mesh)
    scales = e.sweep_guidance_scales or (sampling.guidance.scale,)
    per_row = task.num_classes if task.class_cond else 0
    if prompted is not None:
        per_row = per
    written = []
    for sampler in e.samplers:
        generator = generate.Generator(task, sampling.with_steps(sampler), mesh, cls_params,
                                       batch_size=e.batch_size, first_stage_params=fs_params,
                                       shard_params=experiment.train.shard_state)
        for scale in scales:
            start = time.perf_counter()
            images, got_labels = generator(params, num or e.num_samples, key, labels=labels,
                                           knobs={"guidance_scale": scale})
            values = sample_metrics.sample_metrics(
                names, images, got_labels if prompted is None else class_labels,
                domain=e.domain, net=net, fd_ref=fd_ref,
                inception_params=inc_params, inception_ref=inc_ref, mesh=mesh,
                batch_size=e.batch_size, inception_size=e.inception_size)
            if prompted is not None and "attribute_accuracy" in names:
                scores = cap.score(images, per_sample, None)
                values.update({k: v for k, v in scores.items()
                               if k.endswith("_accuracy") and k != "class_accuracy"})
            record = records.make_record(sampler.name, sampler.num_steps, sampling.guidance.name,
                                         scale, e.name, {**values, **shared}, checkpoint_step,
                                         time.perf_counter() - start, settings)
            records.write_point(out, record, images, per_row)
            written.append(record)
    if len(written) > 1 and jax.process_index() == 0:
        for path in records.plot_sweep(written, out, e.name):
            common.say(f"wrote {path}")
    return written


CLASSIFIER_TIMESTEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def classifier_timesteps(task: tasks.ClassifierTask) -> tuple[int, ...]:
    """Timestep indices a classifier is evaluated at: 0 for a clean classifier; for a
    noise-aware one 0, T/4, T/2 and 3T/4 of its table (accuracy at t = T - 1 is chance)."""
    if not task.noised:
        return (0,)
    t_max = task.schedule.num_timesteps - 1
    return tuple(sorted({int(round(f * t_max)) for f in CLASSIFIER_TIMESTEP_FRACTIONS}))


def evaluate_accuracy(experiment: Experiment, workdir: str, mesh, params, checkpoint_step: int,
                      seed: int) -> list[dict[str, Any]]:
    """``--mode eval`` of a classifier run: top-1 accuracy on ``eval.split`` at each of
    :func:`classifier_timesteps` (a noise-aware classifier sees x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps, eps from ``seed``; a clean one the clean images), written to
    WORKDIR/eval/accuracy.json (``eval.name`` when set) as metrics ``accuracy_t<t>``;
    ``accuracy`` is their mean."""
    start = time.perf_counter()
    task, e = experiment.task, experiment.eval
    ts = classifier_timesteps(task)
    ds = task.schedule
    data_sh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def correct(p, x0, labels, key):
        p = parallel.gathered(p, mesh, experiment.train.shard_state)

        def at(i):
            noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, x0.dtype)
            t = jnp.full((x0.shape[0],), ts[i], jnp.int32)
            x = process.q_sample_discrete(ds, x0, noise, t) if task.noised else x0
            logits = task.apply(p, x, t.astype(jnp.float32), None, False)
            return jnp.argmax(logits, -1) == labels

        return jnp.stack([at(i) for i in range(len(ts))])  # [len(ts), B]

    params_sh = generate.param_sharding(task, mesh, experiment.train.shard_state)
    fn = jax.jit(correct, in_shardings=(params_sh, data_sh, data_sh, rep), out_shardings=rep)
    it, total, _ = references.eval_batches(experiment, mesh, e.batch_size)
    key = jax.random.PRNGKey(seed)
    hits, count = np.zeros(len(ts)), 0
    for i, batch in enumerate(tqdm.tqdm(it, total=total, desc="accuracy", unit="batch",
                                        disable=jax.process_index() != 0)):
        x = jax.make_array_from_process_local_data(data_sh, np.asarray(batch["image"],
                                                                       np.float32))
        y = jax.make_array_from_process_local_data(data_sh, np.asarray(batch["label"], np.int32))
        mask = features_lib.gather_mask(batch["mask"])
        hits += np.asarray(fn(params, x, y, jax.random.fold_in(key, i)))[:, mask].sum(-1)
        count += int(mask.sum())
    if not count:
        raise ValueError(f"the accuracy evaluation got no {e.split} images")
    metrics = {f"accuracy_t{t}": float(h / count) for t, h in zip(ts, hits)}
    metrics["accuracy"] = float(np.mean(list(metrics.values())))
    shown = ", ".join(f"t={t} {metrics[f'accuracy_t{t}']:.4f}" for t in ts)
    common.say(f"accuracy on {count} {e.split} images: {shown}")
    return [records.write_split_record(epath.Path(workdir) / "eval", e.name or "accuracy",
                                       metrics, e.split, count, checkpoint_step,
                                       time.perf_counter() - start)]


def evaluate_reconstruction(experiment: Experiment, workdir: str, mesh, params,
                            checkpoint_step: int, seed: int) -> list[dict[str, Any]]:
    """``--mode eval`` of an autoencoder: metrics of the reconstructions decode(mean of
    q(z | x)) of ``eval.split`` to WORKDIR/eval/reconstruction.json (``eval.name`` when set),
    and a grid of the first 32 (input | reconstruction rows), reconstruction.png.

    ``eval.metrics``: ``psnr`` (dB, range [-1, 1], averaged over images, with
    ``psnr_stderr``) and/or ``fd_<domain>``: the rFID recipe (the reconstructions of the
    split against the split itself) in the penultimate features of the domain classifier
    ``eval.features_config`` (:mod:`diffjax.evaluation.features`), not Inception's, against
    the split's cached reference statistics (:func:`references.fd_reference`). The numbers
    are comparable only between runs using the same feature run. ``wall_time_s`` excludes
    loading the feature classifier and the reference statistics.
    """
    del seed  # deterministic: the posterior mean
    task, e = experiment.task, experiment.eval
    out = epath.Path(workdir) / "eval"
    fd_name = f"fd_{e.domain}"
    net = fd_ref = None
    if fd_name in e.metrics:
        net = load_features(experiment, mesh)
        fd_ref = references.fd_reference(experiment, mesh, net, out)
    start = time.perf_counter()
    data_sh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def reconstruct(p, x):
        p = parallel.gathered(p, mesh, experiment.train.shard_state)
        mean, _ = task.encode(p, x)
        return jnp.clip(task.decode(p, mean), -1.0, 1.0)

    params_sh = generate.param_sharding(task, mesh, experiment.train.shard_state)
    fn = jax.jit(reconstruct, in_shardings=(params_sh, data_sh), out_shardings=rep)
    it, total, _ = references.eval_batches(experiment, mesh, e.batch_size)
    scores, feats, shown = [], [], None
    for batch in tqdm.tqdm(it, total=total, desc="reconstruction", unit="batch",
                           disable=jax.process_index() != 0):
        x_local = np.asarray(batch["image"], np.float32)
        x = jax.make_array_from_process_local_data(data_sh, x_local)
        mask = np.asarray(features_lib.gather_mask(batch["mask"]))
        recon = np.asarray(jax.device_get(fn(params, x)))
        images = np.asarray(multihost_utils.process_allgather(x_local, tiled=True))
        scores.append(sample_lib.psnr(images, recon)[mask])
        if net is not None:
            feats.append(net(recon[mask])[0])
        if shown is None:
            shown = (images[mask][:32], recon[mask][:32])
    psnr = np.concatenate(scores)
    name = e.name or "reconstruction"
    if jax.process_index() == 0 and shown is not None:
        out.mkdir(parents=True, exist_ok=True)
        grid.save_grid(sample_lib.side_by_side(*shown), str(out / f"{name}.png"), ncol=8,
                       scale=2)
    metrics, said = {}, []
    if "psnr" in e.metrics:
        metrics["psnr"] = float(psnr.mean())
        metrics["psnr_stderr"] = (float(psnr.std(ddof=1) / np.sqrt(len(psnr))) if len(psnr) > 1
                                  else 0.0)
        said.append(f"PSNR {metrics['psnr']:.2f} +- {metrics['psnr_stderr']:.2f} dB")
    if net is not None:
        stats = metrics_lib.GaussianStats.from_features(np.concatenate(feats))
        metrics[fd_name] = metrics_lib.frechet_distance(stats, fd_ref)
        said.append(f"{fd_name} {metrics[fd_name]:.4f}")
    common.say(f"reconstruction {', '.join(said)} over {len(psnr)} {e.split} images")
    return [records.write_split_record(out, name, metrics, e.split, len(psnr),
                                       checkpoint_step, time.perf_counter() - start)]


# What --mode eval means for each task: (evaluate, check before the checkpoint is read).
EVALUATORS: dict[type, tuple[Any, Any]] = {
    tasks.DiffusionTask: (evaluate_samples, check_files),
    tasks.ClassifierTask: (evaluate_accuracy, check_split),
    tasks.AutoencoderTask: (evaluate_reconstruction, check_reconstruction),
}


def _for_task(task: tasks.Task):
    for kind in type(task).__mro__:
        if kind in EVALUATORS:
            return EVALUATORS[kind]
    raise ConfigError(f"--mode eval has no evaluation for {type(task).__name__}")
