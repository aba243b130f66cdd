"""``--mode eval``: samples at each sweep point, their metrics, one JSON and PNG per point.

For every point of the sweep (``eval.sweep_num_steps`` x ``eval.sweep_guidance_scales``; the
configured ``sampler.num_steps`` / ``guidance.scale`` when a list is empty) this draws
``eval.num_samples`` class-balanced samples with :class:`diffjax.generate.Generator` (sharded
over the mesh; the same seed at every point), computes ``eval.metrics`` and writes

    WORKDIR/eval/<name>.json   {"name", "metrics": {metric: float}, "sampler", "num_steps",
                                "nfe", "guidance": {"type", "scale"}, "checkpoint_step",
                                "wall_time_s"}  (the format ``launch.collect`` reads)
    WORKDIR/eval/<name>.png    a grid of the first samples (one column per class)

and, for a sweep of several points, ``WORKDIR/eval/<prefix>sweep_vs_<axis>.png`` with each
metric against the swept axis. ``<name>`` reads like ``ddim-50_cfg-3.0`` (``eval.name`` is
prefixed when set). ``wall_time_s`` is the point's sampling plus metric time (including
compilation); work shared by all points (reference statistics, NLL) is not in it.

Metrics (``eval.metrics``):
  fd_<data>         Frechet distance in the penultimate features of the domain classifier
                    (``eval.features_config`` / ``eval.features_workdir``) to the data's
                    ``eval.split``; its reference statistics are cached in WORKDIR/eval/.
  class_accuracy    fraction of class-conditional samples that classifier labels as the class
                    they were drawn for.
  nll               bits/dim on ``eval.split`` (first ``eval.nll_num_examples`` images, 0 =
                    all): reported as ``nll_bpd`` and ``nll_bpd_stderr``; independent of the
                    sampler, computed once and repeated in every point's JSON. When it is
                    the only metric no samples are drawn and one ``WORKDIR/eval/nll.json``
                    (``eval.name`` when set) holds it with the split and image count.
  fid, sfid, inception_score, precision_recall (-> precision, recall), kid (-> kid, kid_std)
                    on Inception features (``eval.inception_weights``, a converted weights
                    file); reference from ``eval.reference_stats`` (ADM .npz) or the data's
                    ``eval.split``, cached in WORKDIR/eval/.
A classifier run (``model.name="classifier"``) gets its top-1 accuracy on ``eval.split``
instead (:func:`evaluate_classifier`): WORKDIR/eval/accuracy.json.

Everything that can be wrong in the config is checked by :func:`check` before any sampling.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
import tqdm

from diffjax import configlib, parallel
from diffjax.evaluation import features as features_lib
from diffjax.evaluation import likelihood, metrics as metrics_lib

INCEPTION_METRICS = ("fid", "sfid", "inception_score", "precision_recall", "kid")
OTHER_METRICS = ("class_accuracy", "nll")


def valid_metrics(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    return (f"fd_{features_lib.domain_name(c)}", *OTHER_METRICS, *INCEPTION_METRICS)


def _needs_features(names) -> bool:
    return any(m.startswith("fd_") or m == "class_accuracy" for m in names)


def _needs_data(c: ml_collections.ConfigDict, names) -> bool:
    """Whether eval.split is read: fd_* / nll references, or Inception without a .npz."""
    inception_data = any(m in INCEPTION_METRICS for m in names) and not c.eval.reference_stats
    return any(m.startswith("fd_") or m == "nll" for m in names) or inception_data


def check(c: ml_collections.ConfigDict) -> None:
    """One-line ConfigError / CheckpointError for every problem found before sampling."""
    e = c.eval
    names, valid = tuple(e.metrics), valid_metrics(c)
    if c.model.name == "classifier":
        if e.batch_size < 1:
            raise configlib.ConfigError("eval.batch_size must be >= 1")
        from diffjax import data

        data.dataset_info(**_data_kwargs(c))  # DataError now if eval.split is missing
        return
    if c.condition.type == "superres":
        raise configlib.ConfigError(
            "--mode eval draws samples without inputs, and a superres model needs a "
            "low-resolution input per sample; upsample given inputs with --mode sample "
            "--config.condition.input=FILE instead")
    unknown = [m for m in names if m not in valid]
    if not names or unknown:
        raise configlib.ConfigError(
            f"eval.metrics has unknown metric(s) {unknown or '(none given)'}; valid: "
            f"{', '.join(valid)}")
    if e.num_samples < 2 or e.batch_size < 1:
        raise configlib.ConfigError("eval.num_samples must be >= 2 and eval.batch_size >= 1")
    if "class_accuracy" in names and not c.model.class_cond:
        raise configlib.ConfigError("class_accuracy needs a class-conditional model "
                                    "(model.class_cond=True); remove it from eval.metrics")
    if c.eval.sweep_guidance_scales and c.guidance.type == "none":
        raise configlib.ConfigError("eval.sweep_guidance_scales needs guidance.type "
                                    "'classifier_free' or 'classifier'")
    if any(int(n) < 1 for n in c.eval.sweep_num_steps):
        raise configlib.ConfigError(f"eval.sweep_num_steps={tuple(c.eval.sweep_num_steps)} must "
                                    "be step counts >= 1")
    if _needs_features(names):
        fc = features_lib.check_run(e.features_config, e.features_workdir)
        want = (c.data.image_size, c.data.channels)
        if (fc.data.image_size, fc.data.channels) != want:
            raise configlib.ConfigError(
                f"eval.features_config={e.features_config!r} classifies "
                f"{fc.data.image_size}px x{fc.data.channels} images but this model makes "
                f"{want[0]}px x{want[1]}; use a feature classifier of this data")
        if "class_accuracy" in names and fc.data.num_classes != c.data.num_classes:
            raise configlib.ConfigError(
                f"eval.features_config={e.features_config!r} has {fc.data.num_classes} classes,"
                f" this model {c.data.num_classes}; class_accuracy needs the same labels")
    if _needs_data(c, names):
        from diffjax import data

        data.dataset_info(**_data_kwargs(c))  # DataError now if eval.split is missing
    if any(m in INCEPTION_METRICS for m in names):
        if not e.inception_weights or not os.path.isfile(e.inception_weights):
            raise configlib.ConfigError(
                f"{[m for m in names if m in INCEPTION_METRICS]} need Inception weights: "
                f"eval.inception_weights={e.inception_weights!r} is not a file; convert them with"
                " `python -m diffjax.evaluation.convert_inception --torch PTH --out "
                "inception_fid.npz` and pass --config.eval.inception_weights=inception_fid.npz")
        if e.reference_stats and not os.path.isfile(e.reference_stats):
            raise configlib.ConfigError(f"eval.reference_stats={e.reference_stats!r} not found;"
                                        " give an ADM-style .npz or '' for the data's split")


def sweep_points(c: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One config per (num_steps, guidance scale) of the sweep, sampling in eval batches."""
    steps = tuple(c.eval.sweep_num_steps) or (c.sampler.num_steps,)
    scales = tuple(c.eval.sweep_guidance_scales) or (c.guidance.scale,)
    points = []
    for n in steps:
        for s in scales:
            p = copy.deepcopy(c)
            p.sampler.num_steps, p.guidance.scale = int(n), float(s)
            p.sampler.batch_size = c.eval.batch_size
            points.append(p)
    return points


def point_name(p: ml_collections.ConfigDict) -> str:
    """E.g. "ddim-50_cfg-3.0", "heun-18", "myrun_ddpm-250_cls-1.0" (with eval.name)."""
    name = f"{p.sampler.name}-{p.sampler.num_steps}"
    tag = {"classifier_free": "cfg", "classifier": "cls"}.get(p.guidance.type)
    if tag:
        scale = float(p.guidance.scale)
        name += f"_{tag}-{scale:.1f}" if scale == round(scale, 1) else f"_{tag}-{scale:g}"
    return f"{p.eval.name}_{name}" if p.eval.name else name


# ----------------------------------------------------------------------------- references


def _data_kwargs(c: ml_collections.ConfigDict) -> dict[str, Any]:
    d = c.data
    options = {"channels": d.channels} if d.source == "folder" else {}
    return dict(source=d.source, split=c.eval.split, image_size=d.image_size,
                data_dir=d.path or None, resize=d.resize, **options)


def eval_batches(c: ml_collections.ConfigDict, mesh, batch_size: int):
    """(this process's batches of ``eval.split``, number of batches, global batch size)."""
    from diffjax import data

    kwargs = _data_kwargs(c)
    n, _, _ = data.dataset_info(**kwargs)
    gb = -(-batch_size // parallel.num_data_shards(mesh)) * parallel.num_data_shards(mesh)
    it = data.make_eval_iterator(**kwargs, global_batch_size=gb,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    return it, math.ceil(n / gb), gb


def _cached(path: epath.Path, meta: dict, compute) -> dict[str, np.ndarray]:
    """Arrays from ``path`` if it was made with the same ``meta``, else computed and saved."""
    tag = json.dumps(meta, sort_keys=True)
    if path.exists():
        with path.open("rb") as f, np.load(f) as z:
            if "meta" in z.files and str(z["meta"]) == tag:
                return {k: z[k] for k in z.files if k != "meta"}
    arrays = compute()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, meta=np.asarray(tag), **arrays)
    return arrays


def _abs(path: str) -> str:
    return path if not path or "://" in path else os.path.abspath(path)


def _data_meta(c: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"source": c.data.source, "path": _abs(c.data.path), "split": c.eval.split,
            "image_size": c.data.image_size, "resize": c.data.resize}


def fd_reference(c, mesh, net: features_lib.FeatureNet, out: epath.Path
                 ) -> metrics_lib.GaussianStats:
    """Feature statistics of the data's eval split, cached per feature run and checkpoint."""
    meta = {**_data_meta(c), "features_workdir": _abs(c.eval.features_workdir),
            "features_step": int(net.step)}

    def compute():
        it, total, _ = eval_batches(c, mesh, net.batch_size)
        stats = metrics_lib.GaussianStats.from_features(net.of_local_batches(it, total))
        return {"mu": stats.mu, "sigma": stats.sigma}

    z = _cached(out / f"reference_fd_{features_lib.domain_name(c)}_{c.eval.split}.npz", meta,
                compute)
    return metrics_lib.GaussianStats(z["mu"], z["sigma"])


def _inception_acts(params, images_iter, mesh, batch_size: int, size: int):
    from diffjax.evaluation import inception

    return inception.compute_activations(params, images_iter, batch_size=batch_size,
                                         sharding=parallel.data_sharding(mesh), size=size)


def inception_reference(c, mesh, params, out: epath.Path) -> dict[str, np.ndarray]:
    """{"mu", "sigma"[, "mu_s", "sigma_s"][, "pool"]}: eval.reference_stats's statistics (and
    its images' pool features when it holds images), or those of the data's eval split."""
    e = c.eval
    need_pool = any(m in ("precision_recall", "kid") for m in e.metrics)
    if e.reference_stats:
        stats, spatial = metrics_lib.load_reference_stats(e.reference_stats)
        ref = {"mu": stats.mu, "sigma": stats.sigma}
        if spatial is not None:
            ref.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
        if need_pool:
            images = metrics_lib.load_reference_images(e.reference_stats)
            local = np.array_split(images, jax.process_count())[jax.process_index()]
            ref["pool"] = _inception_acts(params, local, mesh, e.batch_size,
                                          e.inception_size)["pool"]
        return ref
    meta = {**_data_meta(c), "inception_weights": _abs(e.inception_weights),
            "inception_size": e.inception_size}

    def compute():
        it, _, _ = eval_batches(c, mesh, e.batch_size)
        acts = _inception_acts(params, (b["image"][b["mask"]] for b in it), mesh, e.batch_size,
                               e.inception_size)
        pool, spatial = (metrics_lib.GaussianStats.from_features(acts[k])
                         for k in ("pool", "spatial"))
        return {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu,
                "sigma_s": spatial.sigma, "pool": acts["pool"]}

    return _cached(out / f"reference_inception_{features_lib.domain_name(c)}_{e.split}.npz",
                   meta, compute)


# ----------------------------------------------------------------------------- metrics


def nll(c: ml_collections.ConfigDict, mesh, model, params, key) -> likelihood.NLLResult:
    """bits/dim of the model on eval.split (see :mod:`diffjax.evaluation.likelihood`)."""
    conditional = c.model.class_cond

    def model_fn(p, x_in, c_noise, cond):
        return model.apply({"params": p}, x_in, c_noise, cond, train=False)

    fn = likelihood.make_nll_fn(model_fn, configlib.build_discrete_schedule(c), mesh,
                                prediction=c.diffusion.prediction,
                                variance_type=c.diffusion.variance_type,
                                conditional=conditional)
    cap = c.eval.nll_num_examples
    batch = c.eval.batch_size
    if cap > 0:  # at least ~10 batches, so the progress bar moves (T passes per batch)
        shards = parallel.num_data_shards(mesh)
        batch = min(batch, -(-math.ceil(cap / 10) // shards) * shards)
    it, total, gb = eval_batches(c, mesh, batch)
    if cap > 0:
        total = min(total, math.ceil(cap / gb))
    return likelihood.evaluate_nll(fn, params, it, key, mesh, max_examples=cap,
                                   total_batches=total)


def sample_metrics(names, images: np.ndarray, labels: np.ndarray, *, domain: str,
                   net: features_lib.FeatureNet | None, fd_ref, inception_params,
                   inception_ref, mesh, batch_size: int, inception_size: int = 299
                   ) -> dict[str, float]:
    """The sample-dependent metrics of ``names`` for images [N, H, W, C] and their labels."""
    out: dict[str, float] = {}
    if _needs_features(names):
        feats, logits = net(images)
        if f"fd_{domain}" in names:
            out[f"fd_{domain}"] = metrics_lib.frechet_distance(
                metrics_lib.GaussianStats.from_features(feats), fd_ref)
        if "class_accuracy" in names:
            out["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
    if any(m in INCEPTION_METRICS for m in names):
        local = np.array_split(images, jax.process_count())[jax.process_index()]
        acts = _inception_acts(inception_params, local, mesh, batch_size, inception_size)
        out.update(_inception_metrics(names, acts, inception_ref))
    return out


def _inception_metrics(names, acts, ref) -> dict[str, float]:
    stats = metrics_lib.GaussianStats
    out = {}
    if "fid" in names:
        out["fid"] = metrics_lib.frechet_distance(stats.from_features(acts["pool"]),
                                                  stats(ref["mu"], ref["sigma"]))
    if "sfid" in names:
        if "mu_s" not in ref:
            raise configlib.ConfigError("sfid needs spatial reference statistics (mu_s, "
                                        "sigma_s) in eval.reference_stats")
        out["sfid"] = metrics_lib.frechet_distance(stats.from_features(acts["spatial"]),
                                                   stats(ref["mu_s"], ref["sigma_s"]))
    if "inception_score" in names:
        out["inception_score"] = metrics_lib.inception_score(acts["logits_unbiased"])
    if "precision_recall" in names:
        out["precision"], out["recall"] = metrics_lib.precision_recall(ref["pool"],
                                                                        acts["pool"])
    if "kid" in names:
        out["kid"], out["kid_std"] = metrics_lib.kernel_inception_distance(ref["pool"],
                                                                           acts["pool"])
    return out


# ----------------------------------------------------------------------------- the mode


def evaluate(c: ml_collections.ConfigDict, workdir: str, mesh, model, params,
             checkpoint_step: int, seed: int) -> list[dict[str, Any]]:
    """Runs every sweep point; returns the records written to WORKDIR/eval/<name>.json."""
    from diffjax import generate

    check(c)
    names, domain = tuple(c.eval.metrics), features_lib.domain_name(c)
    out = epath.Path(workdir) / "eval"
    net = fd_ref = inc_params = inc_ref = None
    if _needs_features(names):
        net = features_lib.load(c.eval.features_config, c.eval.features_workdir, mesh,
                                c.eval.batch_size)
        if f"fd_{domain}" in names:
            fd_ref = fd_reference(c, mesh, net, out)
    if any(m in INCEPTION_METRICS for m in names):
        from diffjax.evaluation import convert_inception

        inc_params = convert_inception.load_inception_params(c.eval.inception_weights)
        inc_ref = inception_reference(c, mesh, inc_params, out)
    key = jax.random.PRNGKey(seed)
    shared: dict[str, float] = {}
    if "nll" in names:
        start = time.perf_counter()
        result = nll(c, mesh, model, params, jax.random.fold_in(key, 1))
        shared = {"nll_bpd": result.bpd, "nll_bpd_stderr": result.stderr}
        _say(f"nll: {result.bpd:.4f} +- {result.stderr:.4f} bits/dim over "
             f"{result.num_examples} {c.eval.split} images")
        if names == ("nll",):  # nothing depends on samples: draw none
            return [write_split_record(c, out, "nll", shared, result.num_examples,
                                       checkpoint_step, time.perf_counter() - start)]
    guide_fn = generate.load_classifier_log_prob(c, mesh)
    records = []
    for p in sweep_points(c):
        start = time.perf_counter()
        images, labels = generate.Generator(p, model, mesh, guide_fn)(
            params, c.eval.num_samples, key)
        values = sample_metrics(names, images, labels, domain=domain, net=net, fd_ref=fd_ref,
                                inception_params=inc_params, inception_ref=inc_ref, mesh=mesh,
                                batch_size=c.eval.batch_size,
                                inception_size=c.eval.inception_size)
        record = make_record(p, {**values, **shared}, checkpoint_step,
                             time.perf_counter() - start)
        write_point(out, record, images, c.data.num_classes if c.model.class_cond else 0)
        records.append(record)
    if len(records) > 1 and jax.process_index() == 0:
        for path in plot_sweep(records, out, c.eval.name):
            _say(f"wrote {path}")
    return records


CLASSIFIER_TIMESTEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def classifier_timesteps(c: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Timestep indices a classifier is evaluated at: 0 for a clean classifier; for a
    noise-aware one 0, T/4, T/2 and 3T/4 of its table (accuracy at t = T - 1 is chance)."""
    if not c.model.classifier_noised:
        return (0,)
    t_max = c.diffusion.num_timesteps - 1
    return tuple(sorted({int(round(f * t_max)) for f in CLASSIFIER_TIMESTEP_FRACTIONS}))


def evaluate_classifier(c: ml_collections.ConfigDict, workdir: str, mesh, model, params,
                        checkpoint_step: int, seed: int) -> list[dict[str, Any]]:
    """``--mode eval`` of a classifier run: top-1 accuracy on ``eval.split`` at each of
    :func:`classifier_timesteps` (a noise-aware classifier sees x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps, eps from ``seed``; a clean one the clean images), written to
    WORKDIR/eval/accuracy.json (``eval.name`` when set) as metrics ``accuracy_t<t>``;
    ``accuracy`` is their mean."""
    from diffjax.diffusion import process

    start = time.perf_counter()
    ts = classifier_timesteps(c)
    ds = configlib.build_discrete_schedule(c)
    data_sh, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def correct(p, x0, labels, key):
        def at(i):
            noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape, x0.dtype)
            t = jnp.full((x0.shape[0],), ts[i], jnp.int32)
            x = process.q_sample_discrete(ds, x0, noise, t) if c.model.classifier_noised else x0
            logits = model.apply({"params": p}, x, t.astype(jnp.float32), train=False)
            return jnp.argmax(logits, -1) == labels

        return jnp.stack([at(i) for i in range(len(ts))])  # [len(ts), B]

    fn = jax.jit(correct, in_shardings=(rep, data_sh, data_sh, rep), out_shardings=rep)
    it, total, _ = eval_batches(c, mesh, c.eval.batch_size)
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
        raise ValueError(f"the accuracy evaluation got no {c.eval.split} images")
    metrics = {f"accuracy_t{t}": float(h / count) for t, h in zip(ts, hits)}
    metrics["accuracy"] = float(np.mean(list(metrics.values())))
    shown = ", ".join(f"t={t} {metrics[f'accuracy_t{t}']:.4f}" for t in ts)
    _say(f"accuracy on {count} {c.eval.split} images: {shown}")
    return [write_split_record(c, epath.Path(workdir) / "eval", "accuracy", metrics, count,
                               checkpoint_step, time.perf_counter() - start)]


def write_split_record(c: ml_collections.ConfigDict, out: epath.Path, default_name: str,
                       metrics: dict[str, float], num_examples: int, checkpoint_step: int,
                       wall_time_s: float) -> dict[str, Any]:
    """The record of a sample-free evaluation on ``eval.split`` (nll alone, a classifier's
    accuracy), written to ``out/<eval.name or default_name>.json``."""
    record = {"name": c.eval.name or default_name, "metrics": metrics, "split": c.eval.split,
              "num_examples": int(num_examples), "checkpoint_step": int(checkpoint_step),
              "wall_time_s": float(wall_time_s)}
    _write_json(out, record)
    _say(f"wrote {out}/{record['name']}.json")
    return record


def _write_json(out: epath.Path, record: dict[str, Any]) -> None:
    """``out/<record name>.json`` (process 0 only)."""
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{record['name']}.json").write_text(json.dumps(record, indent=1) + "\n")


def make_record(p: ml_collections.ConfigDict, values: dict[str, float], checkpoint_step: int,
                wall_time_s: float) -> dict[str, Any]:
    """The JSON record of one point (the format ``launch.collect`` reads).

    ``nfe`` is :func:`diffjax.diffusion.samplers.num_evals`: denoiser calls, where the batched
    conditional + unconditional pair of classifier-free guidance counts as one call."""
    from diffjax.diffusion import samplers

    return {"name": point_name(p), "metrics": {k: float(v) for k, v in values.items()},
            "sampler": p.sampler.name, "num_steps": int(p.sampler.num_steps),
            "nfe": samplers.num_evals(p.sampler.name, p.sampler.num_steps),
            "guidance": {"type": p.guidance.type, "scale": float(p.guidance.scale)},
            "checkpoint_step": int(checkpoint_step), "wall_time_s": float(wall_time_s)}


def write_point(out: epath.Path, record: dict[str, Any], images: np.ndarray,
                num_classes: int) -> None:
    """WORKDIR/eval/<name>.json and a grid of the first samples, <name>.png (process 0)."""
    from diffjax.evaluation import grid

    if jax.process_index() != 0:
        return
    _write_json(out, record)
    ncol = num_classes or 8
    rows = max(1, min(8, len(images) // ncol))
    grid.save_grid(images[:rows * ncol], str(out / f"{record['name']}.png"), ncol=ncol,
                   scale=2)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
    _say(f"{record['name']}: {shown} (nfe {record['nfe']}, {record['wall_time_s']:.1f}s) -> "
         f"{out}/{record['name']}.json")


def plot_sweep(records: list[dict[str, Any]], out: epath.Path, prefix: str = "") -> list[str]:
    """``<prefix>_sweep_vs_<axis>.png``: each metric against each swept axis (guidance scale,
    steps), one line per value of the other axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = {"guidance_scale": lambda r: r["guidance"]["scale"], "num_steps":
            lambda r: r["num_steps"]}
    metric_names = [m for m in records[0]["metrics"] if not m.endswith("_stderr")]
    paths = []
    for axis, get in axes.items():
        if len({get(r) for r in records}) < 2:
            continue
        other = [a for a in axes if a != axis][0]
        fig, subplots = plt.subplots(1, len(metric_names), squeeze=False,
                                     figsize=(4 * len(metric_names), 3.2))
        for ax, metric in zip(subplots[0], metric_names):
            for value in sorted({axes[other](r) for r in records}):
                pts = sorted((get(r), r["metrics"][metric]) for r in records
                             if axes[other](r) == value)
                ax.plot(*zip(*pts), marker="o", label=f"{other}={value:g}")
            ax.set_xlabel(axis)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{prefix + '_' if prefix else ''}sweep_vs_{axis}.png"
        with path.open("wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
