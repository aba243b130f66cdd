"""Guidance and x0 thresholding as denoiser -> denoiser transforms (VE convention).

A denoiser is ``denoise(x, sigma, cond) -> x0_hat`` with x: [B, ...], sigma: scalar or [B].
Every transform returns a denoiser with the same signature, so it composes with every
sampler and with each other, e.g.
``dynamic_threshold(classifier_free(denoise, scale=3.0, null_cond=num_classes))``.
A denoiser may also return ``(x0_hat, frac)`` (learned variance, see ``samplers.ddpm``); the
transforms then act on x0_hat and pass frac through (the conditional frac for CFG, the main
model's for autoguidance).

In the VE convention eps_hat = (x - x0_hat) / sigma and the score (x0_hat - x) / sigma^2 are
affine in x0_hat with the same x and sigma, so mixing or shifting x0_hat is exactly mixing
or shifting eps or the score: the formulas below are the papers' eps-space formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Denoiser = Callable[[Array, Array, Any], Any]


def _per_example(v: Array, x: Array) -> Array:
    """Broadcast a scalar or [B] value to [B, 1, ..., 1] matching x: [B, ...]."""
    v = jnp.broadcast_to(jnp.asarray(v, x.dtype), (x.shape[0],))
    return v.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _map_x0(out: Any, fn: Callable[[Array], Array]) -> Any:
    """Apply fn to x0_hat of a denoiser output x0_hat or (x0_hat, frac)."""
    return (fn(out[0]), out[1]) if isinstance(out, tuple) else fn(out)


def no_guidance(denoise: Denoiser) -> Denoiser:
    """The identity transform (guidance.type = "none")."""
    return denoise


def ho_scale_from_glide(glide_scale: float) -> float:
    """GLIDE / diffusers / "1 + w" convention s (eps_u + s (eps_c - eps_u)) -> Ho's w = s - 1."""
    return glide_scale - 1.0


def classifier_free(denoise: Denoiser, scale: float, null_cond: Any, *,
                    interval: tuple[float, float] | None = None,
                    rescale: float = 0.0, channels: int = 0) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022), one batched call for both passes.

    D = (1 + w) D(x, sigma, c) - w D(x, sigma, null): ``scale`` is Ho & Salimans' w, so w = 0
    is plain conditional sampling and w = -1 unconditional. GLIDE, Imagen and diffusers'
    ``guidance_scale`` s = 1 + w (use ``ho_scale_from_glide``).
    null_cond: the null condition, broadcast to cond's structure/shape (e.g. the null label
      ``num_classes`` for labels cond: [B] int32).
    interval: (sigma_lo, sigma_hi): guide only where sigma_lo < sigma <= sigma_hi
      (Kynkaanniemi et al. 2024); elsewhere the conditional denoiser alone.
    rescale: phi of Lin et al. (2024) Alg. 2 applied to x0_hat: the guided x0_hat is scaled
      by phi * std(D_c) / std(D) + (1 - phi), std over each example's non-batch dims.
    channels: guide only the first ``channels`` channels (last axis), the others are the
      conditional D_c (0 = all). The released DiT guides 3 of its 4 latent channels this way.
    The conditional and unconditional passes run as one call on a batch of 2B (always both:
    the interval only changes the mix). ``scale``, the interval's bounds and ``rescale`` may
    be traced (e.g. swept under one jit); a Python 0 for ``rescale`` skips its statistics.
    """

    def guided(x: Array, sigma: Array, cond: Any) -> Any:
        if cond is None:
            raise ValueError("classifier_free guidance needs cond (e.g. labels [B]); got None.")
        batch = x.shape[0]
        sigma_b = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (batch,))
        both = jax.tree.map(
            lambda c, n: jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)]),
            cond, null_cond)
        out = denoise(jnp.concatenate([x, x]), jnp.concatenate([sigma_b, sigma_b]), both)
        x0_both, frac = (out[0], out[1][:batch]) if isinstance(out, tuple) else (out, None)
        d_c, d_u = x0_both[:batch], x0_both[batch:]
        w = jnp.asarray(scale, x.dtype)
        if interval is not None:
            lo, hi = interval
            w = jnp.where((sigma_b > lo) & (sigma_b <= hi), w, 0.0)
        w = _per_example(w, x)
        d = d_c + w * (d_c - d_u)
        if channels:
            d = jnp.concatenate([d[..., :channels], d_c[..., channels:]], axis=-1)
        if not (isinstance(rescale, (int, float)) and rescale == 0):
            axes = tuple(range(1, x.ndim))
            ratio = jnp.std(d_c, axis=axes, keepdims=True) / jnp.std(d, axis=axes, keepdims=True)
            # where, not a product with rescale = 0: ratio is NaN for a constant example.
            d = jnp.where(rescale != 0, d * (rescale * ratio + (1.0 - rescale)), d)
        return d if frac is None else (d, frac)

    return guided


def autoguidance(denoise: Denoiser, guide: Denoiser, scale: float, *,
                 interval: tuple[float, float] | None = None) -> Denoiser:
    """Autoguidance (Karras et al. 2024): guide the model by a bad version of itself.

    D = D(x, sigma, c) + w (D(x, sigma, c) - D_guide(x, sigma, c)), with ``guide`` a smaller
    and/or less-trained denoiser of the same task and conditioning (same signature, VE x0).
    ``scale`` is w in the convention of :func:`classifier_free` (Ho & Salimans), so w = 0 is
    the main model alone; the paper's weight (its Eq. 1, D_w = D_0 + w (D_1 - D_0), D_1 the
    main model and D_0 the guide, w = 1 unguided, e.g. its w = 2.25) is 1 + ``scale``.
    interval: (sigma_lo, sigma_hi): guide only where sigma_lo < sigma <= sigma_hi, elsewhere
      the main denoiser alone (as for CFG).
    Only x0_hat is mixed: a main denoiser returning ``(x0_hat, frac)`` (learned variance,
    ``samplers.ddpm``) keeps its own frac, and ``guide`` must return x0_hat alone. The guide
    is evaluated at every step (the interval only changes the mix); ``scale`` and the
    interval's bounds may be traced.
    """

    def guided(x: Array, sigma: Array, cond: Any) -> Any:
        out = denoise(x, sigma, cond)
        d_m, frac = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        d_g = guide(x, sigma, cond)
        sigma_b = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        w = jnp.broadcast_to(jnp.asarray(scale, x.dtype), sigma_b.shape)
        if interval is not None:
            lo, hi = interval
            w = jnp.where((sigma_b > lo) & (sigma_b <= hi), w, 0.0)
        d = d_m + _per_example(w, x) * (d_m - d_g)
        return d if frac is None else (d, frac)

    return guided


def classifier_guidance(denoise: Denoiser, log_prob_fn: Callable[[Array, Array, Any], Array],
                        scale: float) -> Denoiser:
    """Classifier guidance (Dhariwal & Nichol 2021) in the VE convention.

    D'(x, sigma, y) = D(x, sigma, y) + sigma^2 * scale * grad_x log p(y | x, sigma), i.e. the
    score gains scale * grad_x log p(y | x); for a VP model this is exactly their Alg. 2
    eps' = eps - sqrt(1 - abar) s grad_{x_t} log p. log_prob_fn(x_ve, sigma [B], y) -> [B]
    must treat examples independently (its batch sum is differentiated). A classifier trained
    on VP inputs is wrapped by the caller: x_vp = x_ve / sqrt(1 + sigma^2) and its own time.
    ``cond`` is passed both to the denoiser and, as y, to the classifier.
    """

    def guided(x: Array, sigma: Array, cond: Any) -> Any:
        sigma_b = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        grad = _log_prob_grad(log_prob_fn, x, sigma_b, cond)
        shift = _per_example(sigma_b**2 * scale, x) * grad
        return _map_x0(denoise(x, sigma, cond), lambda x0: x0 + shift)

    return guided


def _log_prob_grad(log_prob_fn: Callable[[Array, Array, Any], Array], x: Array,
                   sigma_b: Array, cond: Any) -> Array:
    """grad_x log p(y | x, sigma) [B, ...] (VE x; the batch sum differentiated)."""
    return jax.grad(lambda z: jnp.sum(log_prob_fn(z, sigma_b, cond)))(x)


def classifier_mean_shift(log_prob_fn: Callable[[Array, Array, Any], Array],
                          scale: float) -> Callable[[Array, Array, Any], Array]:
    """The gradient term of ADM's mean shift (Dhariwal & Nichol 2021 Alg. 1) for
    ``samplers.ddpm(..., mean_shift=...)``: ``fn(x, sigma [B], y) -> scale * grad_x log p(y |
    x, sigma)`` [B, ...] in VE coordinates (the sampler turns it into mean + Sigma s grad in
    ADM's VP frame). ``classifier_mode = "mean"`` uses this in place of
    :func:`classifier_guidance` (Alg. 2, the score shift); per step they differ by a factor
    beta_t / (sqrt(alpha_t) Sigma_t). ``scale`` may be traced.
    """

    def shift(x: Array, sigma: Array, cond: Any) -> Array:
        sigma_b = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        return _per_example(scale, x) * _log_prob_grad(log_prob_fn, x, sigma_b, cond)

    return shift


CLASSIFIER_MODES = ("auto", "mean", "score")


LOG_DENSITY_INPUTS = ("x0", "xt")


def gradient_guidance(denoise: Denoiser, log_density: Callable[[Array, Array, Any], Array],
                      scale: float, *, on: str = "x0",
                      interval: tuple[float, float] | None = None) -> Denoiser:
    """Guidance by the gradient of any log density (SDG, universal guidance) in the VE
    convention: D'(x, sigma, c) = D(x, sigma, c) + scale * sigma^2 * g, the score shift of
    :func:`classifier_guidance` with g the gradient w.r.t. x = x_t of

      on = "x0": log_density(D(x, sigma, c), sigma, c), differentiated through the denoiser
        (universal guidance's forward guidance, Bansal et al. 2023; DPS-style): the function
        reads clean images and needs no noise-aware training, at the cost of a backward pass
        through the network at every step;
      on = "xt": log_density(x, sigma, c) on the noisy input itself (Semantic Diffusion
        Guidance, Liu et al. 2023, with a noise-aware CLIP; ADM's classifier guidance): the
        function must know that x is noisy at level sigma.

    log_density(x [B, ...], sigma [B], cond) -> [B] must treat examples independently (its
    batch sum is differentiated); cond is the denoiser's (labels [B] or None). With on = "xt"
    and the exact log p(a | x_t, sigma) at every sigma, scale = 1 is the score of p(x_t | a),
    i.e. sampling p(x_0 | a) (larger values sharpen it); on = "x0" approximates log p(a | x_t)
    by log p(a | x0_hat) (as DPS does). interval: (sigma_lo, sigma_hi): guide only
    where sigma_lo < sigma <= sigma_hi, elsewhere the denoiser alone (the gradient is still
    computed). A denoiser returning ``(x0_hat, frac)`` keeps its frac. ``scale`` and the
    interval's bounds may be traced. Composes with the other transforms: guiding a
    classifier-free-guided denoiser is ``gradient_guidance(classifier_free(denoise, w, null),
    log_density, scale)``.
    """
    if on not in LOG_DENSITY_INPUTS:
        raise ValueError(f"on={on!r}: the log density reads 'x0' (the denoiser's x0_hat) or "
                         "'xt' (the noisy x)")

    def guided(x: Array, sigma: Array, cond: Any) -> Any:
        sigma_b = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        if on == "x0":
            def total(z: Array) -> tuple[Array, Any]:
                out = denoise(z, sigma, cond)
                x0 = out[0] if isinstance(out, tuple) else out
                return jnp.sum(log_density(x0, sigma_b, cond)), out

            grad, out = jax.grad(total, has_aux=True)(x)
        else:
            out = denoise(x, sigma, cond)
            grad = _log_prob_grad(log_density, x, sigma_b, cond)
        w = jnp.broadcast_to(jnp.asarray(scale, x.dtype), sigma_b.shape)
        active = jnp.ones_like(sigma_b, bool)
        if interval is not None:
            lo, hi = interval
            active = (sigma_b > lo) & (sigma_b <= hi)
        # where, not a product with 0: outside the interval a gradient may be inf or NaN.
        shift = jnp.where(_per_example(active, x) > 0, _per_example(w * sigma_b**2, x) * grad,
                          0.0)
        return _map_x0(out, lambda x0: x0 + shift)

    return guided


def static_threshold(denoise: Denoiser, limit: float = 1.0) -> Denoiser:
    """Clip x0_hat to [-limit, limit] (DDPM's clip_denoised; data space, VE x0_hat)."""

    def clipped(x: Array, sigma: Array, cond: Any) -> Any:
        return _map_x0(denoise(x, sigma, cond), lambda x0: jnp.clip(x0, -limit, limit))

    return clipped


def dynamic_threshold(denoise: Denoiser, percentile: float = 0.995,
                      limit: float = 1.0) -> Denoiser:
    """Imagen's dynamic thresholding (Saharia et al. 2022) of x0_hat.

    Per example s = max(quantile(|x0_hat|, percentile), limit); x0_hat <- clip(x0_hat, -s, s)
    * limit / s. With limit = 1 this is Imagen's rule; the result lies in [-limit, limit] and
    examples already within [-limit, limit] are unchanged. ``percentile`` may be traced.
    """
    if isinstance(percentile, (int, float)) and not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}.")

    def thresholded_x0(x0: Array) -> Array:
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), limit)
        s = _per_example(s, x0)
        return jnp.clip(x0, -s, s) * (limit / s)

    def thresholded(x: Array, sigma: Array, cond: Any) -> Any:
        return _map_x0(denoise(x, sigma, cond), thresholded_x0)

    return thresholded


GUIDANCE: dict[str, Callable[..., Denoiser]] = {
    "none": no_guidance,
    "classifier_free": classifier_free,
    "classifier": classifier_guidance,
    "autoguidance": autoguidance,
    "gradient": gradient_guidance,
}

THRESHOLDING: dict[str, Callable[..., Denoiser]] = {
    "none": no_guidance,
    "static": static_threshold,
    "dynamic": dynamic_threshold,
}
