"""The data side of ``--mode eval``: eval-split batches, cached reference statistics, NLL.

Reference statistics (feature or Inception) of the data's ``eval.split`` are cached in
``WORKDIR/eval/`` next to the records, keyed by everything they depend on.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from diffjax import data, generate, parallel
from diffjax.evaluation import features as features_lib
from diffjax.evaluation import likelihood
from diffjax.evaluation import metrics as metrics_lib
from diffjax.evaluation.sample_metrics import inception_acts
from diffjax.specs import Experiment


def eval_batches(experiment: Experiment, mesh, batch_size: int):
    """(this process's batches of ``eval.split``, number of batches, global batch size)."""
    kwargs = experiment.data.source_kwargs(experiment.eval.split)
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


def _data_meta(experiment: Experiment) -> dict[str, Any]:
    d = experiment.data
    return {"source": d.source, "path": _abs(d.path), "split": experiment.eval.split,
            "image_size": d.image_size, "resize": d.resize}


def fd_reference(experiment: Experiment, mesh, net: features_lib.FeatureNet,
                 out: epath.Path) -> metrics_lib.GaussianStats:
    """Feature statistics of the data's eval split, cached per feature run and checkpoint."""
    e = experiment.eval
    meta = {**_data_meta(experiment), "features_workdir": _abs(e.features_workdir),
            "features_step": int(net.step)}

    def compute():
        it, total, _ = eval_batches(experiment, mesh, net.batch_size)
        stats = metrics_lib.GaussianStats.from_features(net.of_local_batches(it, total))
        return {"mu": stats.mu, "sigma": stats.sigma}

    z = _cached(out / f"reference_fd_{e.domain}_{e.split}.npz", meta, compute)
    return metrics_lib.GaussianStats(z["mu"], z["sigma"])


def inception_reference(experiment: Experiment, mesh, params,
                        out: epath.Path) -> dict[str, np.ndarray]:
    """{"mu", "sigma"[, "mu_s", "sigma_s"][, "pool"]}: eval.reference_stats's statistics (and
    its images' pool features when it holds images), or those of the data's eval split."""
    e = experiment.eval
    need_pool = any(m in ("precision_recall", "kid") for m in e.metrics)
    if e.reference_stats:
        stats, spatial = metrics_lib.load_reference_stats(e.reference_stats)
        ref = {"mu": stats.mu, "sigma": stats.sigma}
        if spatial is not None:
            ref.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
        if need_pool:
            images = metrics_lib.load_reference_images(e.reference_stats)
            local = np.array_split(images, jax.process_count())[jax.process_index()]
            ref["pool"] = inception_acts(params, local, mesh, e.batch_size,
                                         e.inception_size)["pool"]
        return ref
    meta = {**_data_meta(experiment), "inception_weights": _abs(e.inception_weights),
            "inception_size": e.inception_size}

    def compute():
        it, _, _ = eval_batches(experiment, mesh, e.batch_size)
        acts = inception_acts(params, (b["image"][b["mask"]] for b in it), mesh, e.batch_size,
                              e.inception_size)
        pool, spatial = (metrics_lib.GaussianStats.from_features(acts[k])
                         for k in ("pool", "spatial"))
        return {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu,
                "sigma_s": spatial.sigma, "pool": acts["pool"]}

    return _cached(out / f"reference_inception_{e.domain}_{e.split}.npz", meta, compute)


def nll(experiment: Experiment, mesh, params, key) -> likelihood.NLLResult:
    """bits/dim of the model on eval.split (see :mod:`diffjax.evaluation.likelihood`), with
    x0_hat clipped to [-1, 1] in the VLB terms iff ``eval.nll_clip_denoised``."""
    task, e = experiment.task, experiment.eval
    shard = experiment.train.shard_state

    def model_fn(p, x_in, c_noise, cond):
        return task.apply(parallel.gathered(p, mesh, shard), x_in, c_noise, cond, False)

    fn = likelihood.make_nll_fn(model_fn, task.schedule, mesh, prediction=task.loss.prediction,
                                variance_type=task.loss.variance_type,
                                conditional=task.class_cond,
                                clip_denoised=e.nll_clip_denoised,
                                param_sharding=generate.param_sharding(task, mesh, shard))
    cap = e.nll_num_examples
    batch = e.batch_size
    if cap > 0:  # at least ~10 batches, so the progress bar moves (T passes per batch)
        shards = parallel.num_data_shards(mesh)
        batch = min(batch, -(-math.ceil(cap / 10) // shards) * shards)
    it, total, gb = eval_batches(experiment, mesh, batch)
    if cap > 0:
        total = min(total, math.ceil(cap / gb))
    return likelihood.evaluate_nll(fn, params, it, key, mesh, max_examples=cap,
                                   total_batches=total)
