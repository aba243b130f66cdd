"""Samples from trained parameters: denoiser, guidance, sigmas and sampler, from the config.

This is where a trained network meets the pure sampling math: the model's ``apply`` becomes
``denoise(x, sigma, cond) -> x0_hat`` (:func:`diffjax.diffusion.process.make_denoiser`),
guidance and thresholding transform that denoiser, and the configured sampler runs the whole
chain as one compiled program per batch, with the batch split over the mesh's ``data`` axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import configlib, parallel
from diffjax.diffusion import guidance, process, samplers, sigmas as sigma_lib


def sigma_sequence(c: ml_collections.ConfigDict, ds) -> np.ndarray:
    """The decreasing sigma sequence (ending at 0) of ``c.sampler`` for the model's table."""
    s = c.sampler
    if s.sigma_spacing == "model":
        spacing = s.timestep_spacing or "uniform"
        return sigma_lib.discrete_sigmas(ds.sigmas, s.num_steps, spacing)
    lo, hi = float(ds.sigmas[0]), float(ds.sigmas[-1])
    if s.sigma_spacing == "karras":
        return sigma_lib.karras_sigmas(s.num_steps, lo, hi, s.rho)
    return sigma_lib.loglinear_sigmas(s.num_steps, lo, hi)


def model_denoiser(c: ml_collections.ConfigDict, model, ds) -> Callable[..., Any]:
    """``(params) -> denoise`` for the configured prediction and variance.

    The ``ddpm`` sampler of a learned-variance model gets ``denoise_with_variance`` (x0_hat and
    the iDDPM interpolation fraction); every other sampler uses the mean prediction only.
    """
    learned = configlib.learns_variance(c)
    conditional = c.model.class_cond
    with_variance = learned and c.sampler.name == "ddpm"

    def for_params(params):
        def model_fn(x_in, c_noise, cond):
            return model.apply({"params": params}, x_in, c_noise, cond if conditional else None,
                               train=False)

        if with_variance:
            return process.make_denoiser_with_variance(model_fn, ds,
                                                       prediction=c.diffusion.prediction)
        return process.make_denoiser(model_fn, ds, prediction=c.diffusion.prediction,
                                     learned_variance=learned)

    return for_params


def guide(c: ml_collections.ConfigDict, denoise, classifier_log_prob=None):
    """Applies ``c.guidance`` and ``c.sampler.thresholding`` to a denoiser."""
    g = c.guidance
    if g.type == "classifier_free":
        interval = None
        if g.interval_sigma_min > 0 or math.isfinite(g.interval_sigma_max):
            interval = (g.interval_sigma_min, g.interval_sigma_max)
        denoise = guidance.classifier_free(denoise, g.scale, c.data.num_classes,
                                           interval=interval, rescale=g.rescale)
    elif g.type == "classifier":
        denoise = guidance.classifier_guidance(denoise, classifier_log_prob, g.scale)
    if c.sampler.thresholding == "static":
        denoise = guidance.static_threshold(denoise)
    elif c.sampler.thresholding == "dynamic":
        denoise = guidance.dynamic_threshold(denoise, c.sampler.dynamic_percentile)
    return denoise


def load_classifier_log_prob(c: ml_collections.ConfigDict, mesh) -> Callable[..., Any] | None:
    """``log_prob_fn(x_ve, sigma, y) -> [B]`` of the noise-aware classifier named by
    ``guidance.classifier_config`` / ``guidance.classifier_workdir`` (None without guidance).

    The classifier was trained on VP inputs x_t at timestep t of its own schedule table, so
    x_vp = x_ve / sqrt(1 + sigma^2) and its time input is the (fractional) timestep of sigma.
    """
    if c.guidance.type != "classifier":
        return None
    from diffjax.train.loop import restore_ema_params

    g = c.guidance
    if not g.classifier_config or not g.classifier_workdir:
        raise configlib.ConfigError(
            "guidance.type='classifier' needs --config.guidance.classifier_config=experiments/"
            "classifier_*.py and --config.guidance.classifier_workdir=DIR of its trained run")
    cc = configlib.load_config_file(g.classifier_config)
    model, params, _ = restore_ema_params(cc, mesh, g.classifier_workdir)
    ds = configlib.build_discrete_schedule(cc)

    def log_prob(x, sigma, y):
        sigma = jnp.broadcast_to(sigma, (x.shape[0],))
        x_vp = x * jax.lax.rsqrt(1.0 + sigma**2)[:, None, None, None]
        t = ds.c_noise(ds.t_from_logsnr(-2.0 * jnp.log(sigma)))
        logits = model.apply({"params": params}, x_vp, t, train=False)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]

    return log_prob


def make_sample_fn(c: ml_collections.ConfigDict, model, mesh, batch: int,
                   classifier_log_prob=None):
    """A jitted ``(params, key, labels [batch]) -> images [batch, H, W, C]`` in [-1, 1]."""
    ds = configlib.build_discrete_schedule(c)
    spec = configlib.build_sampler(c)
    sig = jnp.asarray(sigma_sequence(c, ds), jnp.float32)
    make = model_denoiser(c, model, ds)
    shape = (batch, c.data.image_size, c.data.image_size, c.data.channels)
    data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def run(params, key, labels):
        k_init, k_sample = jax.random.split(key)
        x = jax.random.normal(k_init, shape, jnp.float32) * sig[0]
        x = jax.lax.with_sharding_constraint(x, data)
        denoise = guide(c, make(params), classifier_log_prob)
        cond = labels if c.model.class_cond else None
        out = spec.fn(denoise, x, sig, k_sample, cond=cond, **spec.options)
        return jnp.clip(out, -1.0, 1.0)

    return jax.jit(run, in_shardings=(rep, rep, data), out_shardings=data)


def balanced_labels(n: int, num_classes: int, grouped: bool = False) -> np.ndarray:
    """Labels 0..K-1 cycling (``grouped``: each class repeated n/K times in a row)."""
    if grouped:
        return np.repeat(np.arange(num_classes), math.ceil(n / num_classes))[:n].astype(np.int32)
    return (np.arange(n) % max(num_classes, 1)).astype(np.int32)


class Generator:
    """Draws samples from parameters in batches of ``sampler.batch_size`` sharded over the mesh.

    Built once per (config, model, mesh); the sampling program compiles on the first call and
    is reused. Batch i uses ``fold_in(key, i)``, so a seed gives the same images however many
    devices there are.
    """

    def __init__(self, c: ml_collections.ConfigDict, model, mesh, classifier_log_prob=None,
                 max_batch: int | None = None):
        n = parallel.num_data_shards(mesh)
        self.batch = _round_up(min(c.sampler.batch_size, max_batch or c.sampler.batch_size), n)
        self.num_classes = c.data.num_classes
        if classifier_log_prob is None:
            classifier_log_prob = load_classifier_log_prob(c, mesh)
        self._fn = make_sample_fn(c, model, mesh, self.batch, classifier_log_prob)

    def __call__(self, params, num_samples: int, key, labels: np.ndarray | None = None,
                 grouped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``num_samples`` images [N, H, W, C] in [-1, 1] (NumPy) and their labels [N]."""
        if labels is None:
            labels = balanced_labels(num_samples, self.num_classes, grouped)
        images = []
        for i in range(math.ceil(num_samples / self.batch)):
            chunk = labels[i * self.batch:(i + 1) * self.batch]
            padded = np.pad(chunk, (0, self.batch - len(chunk)))
            out = self._fn(params, jax.random.fold_in(key, i), padded)
            images.append(np.asarray(jax.device_get(out))[:len(chunk)])
        return np.concatenate(images), np.asarray(labels)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
