"""Steer Fashion-MNIST samples by their brightness (mean intensity), a measured attribute.

Brightness b(x) is the mean pixel intensity in [0, 1] of an image x in [-1, 1]; over the
test split it is 0.287 +- 0.126 (5th/95th percentiles 0.10 / 0.50; sandals 0.14, coats
0.39). :func:`brighter` and :func:`darker` are the log densities of a soft constraint
b(x_0) ~ N(target, TOLERANCE^2), read on x = x_0 + sigma n: b(x) = b(x_0) + sigma/2 mean(n)
has variance sigma^2 / (4 D) more (D pixels), so

    log p(target | x, sigma) = -(b(x) - target)^2 / (2 (TOLERANCE^2 + sigma^2 / (4 D)))

is exact on the noisy x_t (``guidance.log_density_input = "xt"``: scale 1 samples
p(x_0 | b ~ target) under the Gaussian-noise model of b) and a tempered version on the
denoiser's x0_hat (``"x0"``). E.g.::

    python -m diffjax.main --config experiments/fashion_mnist.py --workdir runs/fmnist \\
      --mode eval --config.guidance.type=gradient \\
      --config.guidance.log_density=diffjax.guides.fashion_mnist:brighter \\
      --config.guidance.scale=1 --config.eval.metrics='("fd_fashion_mnist", "brightness")'

The ``brightness`` metric of ``--mode eval`` (:func:`brightness`, averaged over the samples)
measures the effect.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

BRIGHT = 0.45  # the target of `brighter` (about the 85th percentile of the test split)
DARK = 0.15  # the target of `darker` (about the 15th percentile)
TOLERANCE = 0.02  # the constraint's std in brightness units


def brightness(x: Array) -> Array:
    """Mean intensity in [0, 1] of images x: [B, ...] in [-1, 1] -> [B]."""
    return jnp.mean((x.reshape(x.shape[0], -1) + 1.0) / 2.0, axis=1)


def brightness_log_density(x: Array, sigma: Array, target: float,
                           tolerance: float = TOLERANCE) -> Array:
    """log N(target; b(x), tolerance^2 + sigma^2 / (4 D)) up to a constant: [B] for x [B, ...]
    in [-1, 1] at noise level sigma (scalar or [B]; 0 for clean images)."""
    d = x[0].size
    var = tolerance**2 + jnp.asarray(sigma, x.dtype) ** 2 / (4.0 * d)
    return -0.5 * (brightness(x) - target) ** 2 / var


def brighter(x: Array, sigma: Array, cond: object) -> Array:
    """Toward brightness :data:`BRIGHT` (``cond`` unused): [B]."""
    del cond
    return brightness_log_density(x, sigma, BRIGHT)


def darker(x: Array, sigma: Array, cond: object) -> Array:
    """Toward brightness :data:`DARK` (``cond`` unused): [B]."""
    del cond
    return brightness_log_density(x, sigma, DARK)
