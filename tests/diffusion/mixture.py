"""A class-conditional Gaussian mixture whose exact VE denoiser is known in closed form.

Components k = 1..K in D dimensions, isotropic: x0 ~ N(mu_k, s_k^2 I) with weight w_k and
class label c_k. Under x = x0 + sigma n the noisy marginal of component k is
N(mu_k, (s_k^2 + sigma^2) I), so with responsibilities r_k(x, sigma) (restricted to the
components of class y when conditioning) the exact denoiser is

    E[x0 | x, sigma, y] = sum_k r_k (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),

and the exact noise-aware class posterior is log p(y | x, sigma) = logsumexp over class-y
components minus logsumexp over all components. The same formulas run in JAX (float32, for
samplers) and in NumPy float64 (for reference implementations). Label ``num_classes`` is the
null label (unconditional), as in the project's classifier-free guidance convention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


def _logsumexp(a, axis, xp):
    m = xp.max(a, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return xp.squeeze(m, axis) + xp.log(xp.sum(xp.exp(a - m), axis=axis))


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """means: [K, D]; stds: [K]; weights: [K] (sum 1); labels: [K] int class of each component."""

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray
    labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _log_joint(self, x, sigma, xp):
        """log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I): [B, K]; also returns var [B, K]."""
        sigma = xp.broadcast_to(xp.asarray(sigma, x.dtype), (x.shape[0],))
        var = xp.asarray(self.stds, x.dtype)[None, :] ** 2 + sigma[:, None] ** 2
        sq = xp.sum((x[:, None, :] - xp.asarray(self.means, x.dtype)[None]) ** 2, axis=-1)
        log_n = -0.5 * sq / var - 0.5 * self.dim * xp.log(2 * np.pi * var)
        return xp.log(xp.asarray(self.weights, x.dtype))[None] + log_n, var

    def _class_mask(self, cond, batch, xp):
        """[B, K] bool: components allowed by the label (all for None or the null label)."""
        if cond is None:
            return xp.ones((batch, len(self.weights)), bool)
        cond = xp.asarray(cond)[:, None]
        return (xp.asarray(self.labels)[None] == cond) | (cond == self.num_classes)

    def _denoise(self, x, sigma, cond, xp):
        log_j, var = self._log_joint(x, sigma, xp)
        log_j = xp.where(self._class_mask(cond, x.shape[0], xp), log_j, -np.inf)
        resp = xp.exp(log_j - _logsumexp(log_j, 1, xp)[:, None])
        mu = xp.asarray(self.means, x.dtype)[None]
        shrink = (xp.asarray(self.stds, x.dtype)[None] ** 2 / var)[..., None]
        comp_mean = mu + shrink * (x[:, None, :] - mu)
        return xp.sum(resp[..., None] * comp_mean, axis=1)

    def denoise(self, x, sigma, cond=None):
        """JAX: x [B, D], sigma scalar or [B], cond [B] int or None -> E[x0 | x, sigma, cond]."""
        return self._denoise(x, sigma, cond, jnp)

    def denoise_np(self, x, sigma, cond=None):
        """NumPy float64 version of ``denoise``."""
        return self._denoise(np.asarray(x, np.float64), sigma, cond, np)

    def class_log_prob(self, x, sigma, y):
        """JAX: exact log p(y | x, sigma): [B]."""
        log_j, _ = self._log_joint(x, sigma, jnp)
        in_class = self._class_mask(y, x.shape[0], jnp)
        return _logsumexp(jnp.where(in_class, log_j, -jnp.inf), 1, jnp) - _logsumexp(log_j, 1, jnp)

    def classify(self, x):
        """NumPy: most probable class of clean points x [B, D] (sigma = 0): [B] int."""
        log_j, _ = self._log_joint(np.asarray(x, np.float64), 0.0, np)
        per_class = [_logsumexp(np.where(self.labels[None] == c, log_j, -np.inf), 1, np)
                     for c in range(self.num_classes)]
        return np.argmax(np.stack(per_class, 1), axis=1)

    def sample(self, rng: np.random.Generator, n: int, y: Any = None) -> np.ndarray:
        """n float64 samples [n, D] of the data (of class y if given)."""
        w = np.where(self.labels == y, self.weights, 0.0) if y is not None else self.weights
        comp = rng.choice(len(w), size=n, p=w / w.sum())
        return self.means[comp] + self.stds[comp, None] * rng.standard_normal((n, self.dim))


def default_mixture() -> GaussianMixture:
    """Four 2-D components in two classes (0: components 0, 1; 1: components 2, 3)."""
    return GaussianMixture(
        means=np.array([[-0.6, -0.5], [0.7, -0.4], [0.0, 0.7], [-0.7, 0.5]]),
        stds=np.array([0.15, 0.2, 0.1, 0.25]),
        weights=np.array([0.3, 0.2, 0.35, 0.15]),
        labels=np.array([0, 0, 1, 1]),
    )


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 64,
                       seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between equal-size point sets a, b: [N, D].

    Mean over fixed random unit directions of the 1-D W1 between sorted projections.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((num_projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.mean(np.abs(pa - pb)))
