"""The metrics of a set of samples, given the networks and reference statistics they need.

Metric names (``eval.metrics``):
  fd_<domain>       Frechet distance in the penultimate features of a domain classifier
                    (:mod:`diffjax.evaluation.features`) to reference statistics.
  class_accuracy    fraction of class-conditional samples that classifier labels as the class
                    they were drawn for.
  nll               bits/dim on the data (:mod:`diffjax.evaluation.likelihood`; needs no
                    samples).
  brightness        mean intensity of the samples in [0, 1] (the attribute that
                    :mod:`diffjax.guides.fashion_mnist` steers by gradient guidance).
  attribute_accuracy  a text model's: how often samples have the attributes their prompts
                    name (-> <attribute>_accuracy; scored by its captioner in the app tier).
  fid, sfid, inception_score, precision_recall (-> precision, recall), kid (-> kid, kid_std)
                    on Inception features (:mod:`diffjax.evaluation.inception`).
Orchestration (which samples, which references, where results go) is the app tier's
(:mod:`diffjax.app.evaluate`).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

from diffjax import parallel
from diffjax.evaluation import features as features_lib
from diffjax.evaluation import inception
from diffjax.evaluation import metrics as metrics_lib
from diffjax.evaluation.metrics import MetricError
from diffjax.guides import fashion_mnist as fmnist_guides

INCEPTION_METRICS = ("fid", "sfid", "inception_score", "precision_recall", "kid")
OTHER_METRICS = ("class_accuracy", "nll", "brightness")
TEXT_METRICS = ("attribute_accuracy",)  # a text model's only (scored in the app tier)


def needs_features(names: Iterable[str]) -> bool:
    return any(m.startswith("fd_") or m == "class_accuracy" for m in names)


def needs_inception(names: Iterable[str]) -> bool:
    return any(m in INCEPTION_METRICS for m in names)


def inception_acts(params, images_iter, mesh, batch_size: int, size: int):
    """Inception activations ({"pool", "spatial", "logits_unbiased"}) of images [N, H, W, C]
    in [-1, 1] (an array or an iterable of arrays), sharded over the mesh's data axis."""
    return inception.compute_activations(params, images_iter, batch_size=batch_size,
                                         sharding=parallel.data_sharding(mesh), size=size)


def sample_metrics(names, images: np.ndarray, labels: np.ndarray, *, domain: str,
                   net: features_lib.FeatureNet | None, fd_ref, inception_params,
                   inception_ref, mesh, batch_size: int, inception_size: int = 299
                   ) -> dict[str, float]:
    """The sample-dependent metrics of ``names`` for images [N, H, W, C] and their labels."""
    out: dict[str, float] = {}
    if needs_features(names):
        feats, logits = net(images)
        if f"fd_{domain}" in names:
            out[f"fd_{domain}"] = metrics_lib.frechet_distance(
                metrics_lib.GaussianStats.from_features(feats), fd_ref)
        if "class_accuracy" in names:
            out["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
    if "brightness" in names:
        out["brightness"] = float(np.mean(fmnist_guides.brightness(np.asarray(images))))
    if needs_inception(names):
        local = np.array_split(images, jax.process_count())[jax.process_index()]
        acts = inception_acts(inception_params, local, mesh, batch_size, inception_size)
        out.update(inception_metrics(names, acts, inception_ref))
    return out


def inception_metrics(names, acts, ref) -> dict[str, float]:
    """The Inception metrics of ``names`` from sample activations and reference statistics
    ({"mu", "sigma"[, "mu_s", "sigma_s"][, "pool"]})."""
    stats = metrics_lib.GaussianStats
    out = {}
    if "fid" in names:
        out["fid"] = metrics_lib.frechet_distance(stats.from_features(acts["pool"]),
                                                  stats(ref["mu"], ref["sigma"]))
    if "sfid" in names:
        if "mu_s" not in ref:
            raise MetricError("sfid needs spatial reference statistics (mu_s, sigma_s) in "
                              "eval.reference_stats")
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
