"""The forward process, its posterior, parameterisation conversions and the denoiser wrapper.

Shapes: `x*` are [*batch, *event] (e.g. [B, H, W, C]); per-example coefficients
(`alpha`, `sigma`, `t`) have shape [*batch] (or are scalars) and broadcast over the trailing
event dims. Everything is pure and works under jit and vmap.

Precision follows the inputs: coefficients are computed in x's float dtype (float32 for
float32, bfloat16 or integer inputs), and with `jax_enable_x64` on, float64 inputs get
float64 math throughout, the float64 tables of a DiscreteSchedule taken as they are.

Frames. Data is x_t = alpha x0 + sigma eps. VP schedules have alpha^2 + sigma^2 = 1; the
Karras schedule is VE (alpha = 1). Predictions are always defined in the *VP-equivalent*
frame a = alpha / r, s = sigma / r, x_vp = x_t / r with r = sqrt(alpha^2 + sigma^2), so a
VP model and the same model driven through the VE view agree:

* "eps": the network predicts eps; x0 = (x_vp - s eps) / a.
* "x0":  the network predicts x0.
* "v":   the network predicts v = a eps - s x0 (Salimans & Ho); x0 = a x_vp - s v.
* "edm": Karras et al. preconditioning; the network F sees c_in x and c_noise = ln(sigma)/4
  with sigma = s / a the VE noise level, and D = c_skip x_ve + c_out F with
  c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), sd = sigma_data (0.5 by default).

The network's input is `model_input(...)`: x_vp itself for eps/x0/v (so a VP model sees
exactly x_t) and c_in x_ve for "edm"; its time input c_noise is `schedule.c_noise(t)`
(1000 t for continuous VP schedules, the fractional timestep index for a DiscreteSchedule,
ln(sigma)/4 for KarrasSchedule) except for "edm", which always uses ln(sigma)/4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion.schedules import DiscreteSchedule

Array = jax.Array

PREDICTIONS = ("eps", "x0", "v", "edm")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
LEARNED_VARIANCE_TYPES = ("learned_range", "learned")


def check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    """One-line ValueError naming the valid choices."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}.")


def bcast(coef: Array, x: Array) -> Array:
    """Reshape per-example `coef` [*batch] to broadcast against x [*batch, *event]."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def float_dtype(x: Array) -> Any:
    """float32, or x's dtype if it is a wider float (float64 under jax_enable_x64)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.result_type(x.dtype, jnp.float32)
    return jnp.float32


def coef_dtype(*coefs: Any) -> Any:
    """float32, or the widest float dtype of `coefs` if wider (Python scalars count as weak:
    float32). The math of a function follows its inputs: float64 under x64, else float32."""
    dtype = jnp.result_type(*coefs, jnp.float32)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def extract(table, t: Array, x: Array) -> Array:
    """table[t] (float64 NumPy table [T], integer t [*batch]) broadcast against x."""
    return bcast(jnp.asarray(table, float_dtype(x))[t], x)


# ---- forward process and posterior ----


def q_sample(x0: Array, noise: Array, alpha: Array, sigma: Array) -> Array:
    """x_t = alpha x0 + sigma noise; alpha, sigma: [*batch] or scalars."""
    return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise


def q_sample_discrete(ds: DiscreteSchedule, x0: Array, noise: Array, t: Array) -> Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t: int [*batch]."""
    return extract(ds.sqrt_alphas_cumprod, t, x0) * x0 + extract(
        ds.sqrt_one_minus_alphas_cumprod, t, x0
    ) * noise


def q_posterior(ds: DiscreteSchedule, x0: Array, x_t: Array, t: Array):
    """q(x_{t-1} | x_t, x0) -> (mean, variance, clipped log-variance), each x_t's shape."""
    mean = extract(ds.posterior_mean_coef1, t, x_t) * x0 + extract(
        ds.posterior_mean_coef2, t, x_t
    ) * x_t
    shape = jnp.broadcast_shapes(mean.shape, x_t.shape)
    var = jnp.broadcast_to(extract(ds.posterior_variance, t, x_t), shape)
    log_var = jnp.broadcast_to(extract(ds.posterior_log_variance_clipped, t, x_t), shape)
    return mean, var, log_var


# ---- conversions (VP: alpha^2 + sigma^2 = 1) ----


def eps_to_x0(x_t: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """x0 = (x_t - sigma eps) / alpha."""
    return (x_t - bcast(sigma, x_t) * eps) / bcast(alpha, x_t)


def x0_to_eps(x_t: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
    """eps = (x_t - alpha x0) / sigma."""
    return (x_t - bcast(alpha, x_t) * x0) / bcast(sigma, x_t)


def x0_eps_to_v(x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """v = alpha eps - sigma x0."""
    return bcast(alpha, x0) * eps - bcast(sigma, x0) * x0


def v_to_x0(x_t: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """x0 = alpha x_t - sigma v (VP)."""
    return bcast(alpha, x_t) * x_t - bcast(sigma, x_t) * v


def v_to_eps(x_t: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """eps = sigma x_t + alpha v (VP)."""
    return bcast(sigma, x_t) * x_t + bcast(alpha, x_t) * v


def eps_to_score(eps: Array, sigma: Array) -> Array:
    """grad_x log p_t(x_t) = -eps / sigma (VP frame)."""
    return -eps / bcast(sigma, eps)


def score_to_eps(score: Array, sigma: Array) -> Array:
    """eps = -sigma score (VP frame)."""
    return -bcast(sigma, score) * score


def denoised_to_score(x: Array, denoised: Array, sigma: Array) -> Array:
    """VE frame (x = x0 + sigma n): grad_x log p(x; sigma) = (D(x) - x) / sigma^2."""
    return (denoised - x) / bcast(sigma, x) ** 2


def denoised_to_eps(x: Array, denoised: Array, sigma: Array) -> Array:
    """VE frame: the noise estimate n = (x - D(x)) / sigma."""
    return (x - denoised) / bcast(sigma, x)


# ---- predictions in the VP-equivalent frame (see module docstring) ----


def _vp_frame(alpha: Array, sigma: Array, dtype=None):
    """(a, s, 1 / r) of the VP-equivalent frame, in `dtype` (default: alpha's and sigma's)."""
    dtype = coef_dtype(alpha, sigma) if dtype is None else dtype
    alpha = jnp.asarray(alpha, dtype)
    sigma = jnp.asarray(sigma, dtype)
    inv_r = jax.lax.rsqrt(alpha * alpha + sigma * sigma)
    return alpha * inv_r, sigma * inv_r, inv_r


def _edm_vp(a: Array, s: Array, sigma_data: float):
    """EDM's c_skip (applied to x_vp), c_out and c_in (applied to x_vp) in the VP frame."""
    d2 = s * s + sigma_data**2 * a * a
    return sigma_data**2 * a / d2, s * sigma_data * jax.lax.rsqrt(d2), jax.lax.rsqrt(d2)


def edm_coefficients(sigma: Array, sigma_data: float = 0.5):
    """EDM preconditioning in the VE frame -> (c_skip, c_out, c_in, c_noise), sigma's shape."""
    sigma = jnp.asarray(sigma, coef_dtype(sigma))
    total = sigma * sigma + sigma_data**2
    return (
        sigma_data**2 / total,
        sigma * sigma_data * jax.lax.rsqrt(total),
        jax.lax.rsqrt(total),
        0.25 * jnp.log(sigma),
    )


def prediction_to_x0(output: Array, x_t: Array, alpha: Array, sigma: Array, prediction: str,
                     sigma_data: float = 0.5) -> Array:
    """The x0 estimate from a network output; x_t = alpha x0 + sigma eps (VP or VE)."""
    check_choice("prediction", prediction, PREDICTIONS)
    a, s, inv_r = _vp_frame(alpha, sigma, float_dtype(x_t))
    x_vp = x_t * bcast(inv_r, x_t)
    if prediction == "eps":
        return (x_vp - bcast(s, x_t) * output) / bcast(a, x_t)
    if prediction == "x0":
        return output
    if prediction == "v":
        return bcast(a, x_t) * x_vp - bcast(s, x_t) * output
    c_skip, c_out, _ = _edm_vp(a, s, sigma_data)
    return bcast(c_skip, x_t) * x_vp + bcast(c_out, x_t) * output


def prediction_target(prediction: str, x0: Array, noise: Array, alpha: Array, sigma: Array,
                      sigma_data: float = 0.5) -> Array:
    """What the network should output for x_t = alpha x0 + sigma noise (any frame)."""
    check_choice("prediction", prediction, PREDICTIONS)
    a, s, _ = _vp_frame(alpha, sigma, float_dtype(x0))
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return bcast(a, x0) * noise - bcast(s, x0) * x0
    # F = (x0 - c_skip x_vp) / c_out simplifies to (s x0 - sd^2 a n) / (sd sqrt(D)).
    d2 = s * s + sigma_data**2 * a * a
    scale = jax.lax.rsqrt(d2) / sigma_data
    return bcast(s * scale, x0) * x0 - bcast(sigma_data**2 * a * scale, x0) * noise


def input_scale(alpha: Array, sigma: Array, prediction: str, sigma_data: float = 0.5) -> Array:
    """Factor c with network input c x_t: 1 / sqrt(alpha^2 + sigma^2), or EDM's c_in."""
    a, s, inv_r = _vp_frame(alpha, sigma)
    if prediction == "edm":
        return inv_r * _edm_vp(a, s, sigma_data)[2]
    return inv_r


def model_input(schedule: Any, x_t: Array, t: Array, *, prediction: str,
                sigma_data: float = 0.5) -> tuple[Array, Array]:
    """(x_in, c_noise) for a network at continuous t [*batch], x_t from `q_sample` with
    schedule.alpha(t), schedule.sigma(t). Matches what `make_denoiser` feeds the network."""
    check_choice("prediction", prediction, PREDICTIONS)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x_in = x_t * bcast(input_scale(alpha, sigma, prediction, sigma_data), x_t)
    if prediction == "edm":
        return x_in, -schedule.logsnr(t) / 8.0  # ln(sigma_ve) / 4
    return x_in, schedule.c_noise(t)


def discrete_model_input(ds: DiscreteSchedule, x_t: Array, t: Array, *, prediction: str,
                         sigma_data: float = 0.5,
                         timestep_map: np.ndarray | None = None) -> tuple[Array, Array]:
    """(x_in, c_noise) at integer timesteps t [*batch]: (x_t, float(t)) for eps/x0/v, EDM's
    (c_in x_ve, ln(sigma_t) / 4) for "edm". Matches `make_denoiser(model_fn, ds, ...)`.
    For a respaced `ds`, pass its `timestep_map` so the network gets the original index."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction != "edm":
        index = t if timestep_map is None else jnp.asarray(timestep_map)[t]
        return x_t, jnp.asarray(index, float_dtype(x_t))
    dtype = float_dtype(x_t)
    alpha = jnp.asarray(ds.sqrt_alphas_cumprod, dtype)[t]
    sigma = jnp.asarray(ds.sqrt_one_minus_alphas_cumprod, dtype)[t]
    x_in = x_t * bcast(input_scale(alpha, sigma, "edm", sigma_data), x_t)
    return x_in, 0.25 * jnp.log(jnp.asarray(ds.sigmas, dtype)[t])


# ---- reverse process p(x_{t-1} | x_t) ----


def split_output(model_output: Array, x_t: Array, variance_type: str) -> tuple[Array, Array]:
    """(mean part, variance part or None): learned types carry 2C channels on the last axis."""
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    channels = x_t.shape[-1]
    want = 2 * channels if variance_type in LEARNED_VARIANCE_TYPES else channels
    if model_output.shape[-1] != want:
        raise ValueError(
            f"variance_type {variance_type!r} needs a model output with {want} channels on "
            f"the last axis, got shape {model_output.shape}; check learn_sigma/variance_type."
        )
    if variance_type in LEARNED_VARIANCE_TYPES:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def model_log_variance(ds: DiscreteSchedule, var_output: Array | None, x_t: Array, t: Array,
                       variance_type: str) -> Array:
    """log-variance of p(x_{t-1} | x_t), x_t's shape.

    fixed_small: the clipped posterior log-variance; fixed_large: log beta_t (with
    posterior_variance[1] at t = 0, as iDDPM); learned: the output is the log-variance;
    learned_range: frac = (output + 1) / 2 interpolates between the two (iDDPM eq. 15).
    """
    min_log = extract(ds.posterior_log_variance_clipped, t, x_t)
    if variance_type == "fixed_small":
        log_var = min_log
    elif variance_type == "fixed_large":
        large = np.append(ds.posterior_variance[1], ds.betas[1:])  # float64, cast once
        log_var = bcast(jnp.log(jnp.asarray(large, float_dtype(x_t)))[t], x_t)
    elif variance_type == "learned":
        return var_output
    else:
        frac = (var_output + 1.0) / 2.0
        log_var = frac * extract(np.log(ds.betas), t, x_t) + (1.0 - frac) * min_log
    return jnp.broadcast_to(log_var, x_t.shape)


def p_mean_variance(ds: DiscreteSchedule, model_output: Array, x_t: Array, t: Array, *,
                    prediction: str, variance_type: str, clip_denoised: bool = False,
                    sigma_data: float = 0.5) -> dict[str, Array]:
    """p(x_{t-1} | x_t) from a network output evaluated at (x_t, t).

    Returns {"mean", "variance", "log_variance", "pred_x0"}, each x_t's shape. The mean is
    the posterior mean q(x_{t-1} | x_t, x0 = pred_x0) (pred_x0 clipped to [-1, 1] first if
    `clip_denoised`).
    """
    mean_out, var_out = split_output(model_output, x_t, variance_type)
    alpha = jnp.asarray(ds.sqrt_alphas_cumprod, float_dtype(x_t))[t]
    sigma = jnp.asarray(ds.sqrt_one_minus_alphas_cumprod, float_dtype(x_t))[t]
    pred_x0 = prediction_to_x0(mean_out, x_t, alpha, sigma, prediction, sigma_data)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior(ds, pred_x0, x_t, t)
    log_var = model_log_variance(ds, var_out, x_t, t, variance_type)
    return {"mean": mean, "variance": jnp.exp(log_var), "log_variance": log_var,
            "pred_x0": pred_x0}


def p_sample(ds: DiscreteSchedule, model_output: Array, x_t: Array, t: Array, noise: Array, *,
             prediction: str, variance_type: str, clip_denoised: bool = False,
             sigma_data: float = 0.5) -> Array:
    """One ancestral step x_{t-1} = mean + exp(log_var / 2) noise (no noise at t = 0)."""
    out = p_mean_variance(ds, model_output, x_t, t, prediction=prediction,
                          variance_type=variance_type, clip_denoised=clip_denoised,
                          sigma_data=sigma_data)
    nonzero = bcast(jnp.asarray(t) != 0, x_t)
    return out["mean"] + jnp.where(nonzero, jnp.exp(0.5 * out["log_variance"]), 0.0) * noise


# ---- the denoiser: every model as D(x, sigma, cond) in the VE frame ----


def ve_model_input(schedule: Any, x: Array, sigma: Array, *, prediction: str,
                   sigma_data: float = 0.5) -> tuple[Array, Array]:
    """(x_in, c_noise) for a network at the VE state x = x0 + sigma n, sigma: [B].

    x_in = c_in x (EDM) or x / sqrt(1 + sigma^2) (the VP state); c_noise = ln(sigma) / 4
    for "edm" (any sigma: no table), else schedule.c_noise at the time of that sigma."""
    ones = jnp.ones_like(sigma)
    x_in = x * bcast(input_scale(ones, sigma, prediction, sigma_data), x)
    if prediction == "edm":
        return x_in, 0.25 * jnp.log(sigma)
    return x_in, schedule.c_noise(schedule.t_from_logsnr(-2.0 * jnp.log(sigma)))


def _ve_call(model_fn: Callable, schedule: Any, x: Array, sigma: Array, cond: Any,
             prediction: str, sigma_data: float):
    sigma = jnp.asarray(sigma, float_dtype(x))
    if sigma.ndim == 0:
        sigma = jnp.full(x.shape[:1], sigma)
    x_in, c_noise = ve_model_input(schedule, x, sigma, prediction=prediction,
                                   sigma_data=sigma_data)
    return model_fn(x_in, c_noise, cond), jnp.ones_like(sigma), sigma


def make_denoiser(model_fn: Callable, schedule: Any, *, prediction: str,
                  learned_variance: bool = False, sigma_data: float = 0.5) -> Callable:
    """Wrap a network into `denoise(x, sigma, cond=None) -> x0_hat` (VE: x = x0 + sigma n).

    model_fn(x_in, c_noise, cond) -> [B, ..., C] (or [B, ..., 2C] if `learned_variance`;
    the variance half is ignored here). x: [B, ..., C]; sigma: scalar or [B], the VE noise
    level. For eps/x0/v the network sees x_in = x / sqrt(1 + sigma^2) (the VP state) and
    c_noise = schedule.c_noise(schedule.t_from_logsnr(-2 ln sigma)): the fractional timestep
    index interpolated over log-sigma for a DiscreteSchedule (clamped to [0, T - 1]),
    1000 t for continuous VP schedules, ln(sigma)/4 for KarrasSchedule. For "edm" it sees
    c_in x and c_noise = ln(sigma) / 4 whatever the schedule (see module docstring).
    """
    check_choice("prediction", prediction, PREDICTIONS)

    def denoise(x: Array, sigma: Array, cond: Any = None) -> Array:
        out, ones, sig = _ve_call(model_fn, schedule, x, sigma, cond, prediction, sigma_data)
        out = split_output(out, x, "learned_range" if learned_variance else "fixed_small")[0]
        return prediction_to_x0(out, x, ones, sig, prediction, sigma_data)

    return denoise


def make_denoiser_with_variance(model_fn: Callable, schedule: Any, *, prediction: str,
                                sigma_data: float = 0.5) -> Callable:
    """Like `make_denoiser` for a learned-range (iDDPM) network, returning
    `denoise_with_variance(x, sigma, cond=None) -> (x0_hat, frac)` with frac = (v + 1) / 2
    ([B, ..., C], nominally in [0, 1]): a step's log-variance is
    frac log(beta) + (1 - frac) log(posterior variance) of that step."""
    check_choice("prediction", prediction, PREDICTIONS)

    def denoise_with_variance(x: Array, sigma: Array, cond: Any = None):
        out, ones, sig = _ve_call(model_fn, schedule, x, sigma, cond, prediction, sigma_data)
        mean_out, var_out = split_output(out, x, "learned_range")
        x0 = prediction_to_x0(mean_out, x, ones, sig, prediction, sigma_data)
        return x0, (var_out + 1.0) / 2.0

    return denoise_with_variance
