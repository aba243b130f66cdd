"""Training losses and the variational bound (bits/dim), computed from model outputs.

The caller (the trainer) samples t and noise, builds x_t with `process.q_sample_discrete`
(or `q_sample` in continuous time), evaluates the network on
`process.discrete_model_input(...)` / `process.model_input(...)` and passes the output here,
so RNG and model application stay with the trainer.

Loss types (`LOSS_TYPES`):
* "simple": weighted MSE on the prediction target (Ho et al.'s L_simple when uniform).
* "hybrid": L_simple + lambda * L_vlb (iDDPM): the VLB term sees the mean part of the output
  through a stop-gradient, so it trains only the learned variance. L_vlb is the one-sample
  estimate T * L_t of the full bound in bits/dim, so lambda = 1e-3 is iDDPM's setting.
* "vlb": T * L_t, an unbiased estimate of the full bound (iDDPM's rescaled "kl" loss).

Weightings (`WEIGHTINGS`) multiply the per-example MSE of the prediction target. "uniform"
is 1. The others are defined in x0 space, ||x0_hat - x0||^2 w_x0(SNR), and converted to the
target (eps-MSE = SNR x0-MSE, v-MSE = (1 + SNR) x0-MSE, EDM F-MSE = x0-MSE / c_out^2):
"snr": w_x0 = SNR (equal to uniform for eps); "min_snr": w_x0 = min(SNR, gamma) (Hang et
al. 2023); "p2": w_x0 = SNR / (k + SNR)^gamma, i.e. eps-MSE times (k + SNR)^-gamma (Choi et
al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from diffjax.diffusion import process as P
from diffjax.diffusion.schedules import DiscreteSchedule

Array = jax.Array

LOSS_TYPES = ("simple", "hybrid", "vlb")
WEIGHTINGS = ("uniform", "snr", "min_snr", "p2")
PREDICTIONS = P.PREDICTIONS
VARIANCE_TYPES = P.VARIANCE_TYPES
LOSSES = LOSS_TYPES


def mean_over_event(x: Array, batch_ndim: int) -> Array:
    """Mean over all but the first `batch_ndim` axes."""
    return jnp.mean(x, axis=tuple(range(batch_ndim, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    diff = logvar1 - logvar2  # exp(d) - 1 - d via expm1: no cancellation against the 1
    return 0.5 * (jnp.expm1(diff) - diff + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array,
                                        num_bins: int = 256) -> Array:
    """log P(bin of x) under N(mean, exp(log_scale)^2) discretised into `num_bins` bins on
    [-1, 1] (width 2 / (num_bins - 1)); the edge bins extend to -inf / +inf. Elementwise,
    nats. Uses the exact normal CDF (iDDPM uses a tanh approximation of it), with the
    difference of CDFs taken on the side of the mean where it does not cancel.

    The middle bins' probability is floored at 1e-30 before the log (log P >= -69.1 nats,
    about 99.7 bits): a bin many standard deviations from the mean has a CDF difference that
    underflows to 0 (float32 ndtr tails end near 1e-38..1e-45, and a difference of two tail
    values can round to 0 well before), and log(0) = -inf would make the bound and its
    gradient infinite / NaN for a whole batch. The floor changes the value only for bins
    with true probability below 1e-30, i.e. a decoder already more than ~11 standard
    deviations off; the edge bins use log_ndtr directly and need no floor. iDDPM clamps at
    1e-12 for the same reason; 1e-30 keeps the clamp far below any probability a fitted
    model produces, float32 or float64."""
    half = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-log_scale)
    lo, hi = (x - half - mean) * inv_std, (x + half - mean) * inv_std
    log_cdf_hi = log_ndtr(hi)  # bottom edge bin
    log_sf_lo = log_ndtr(-lo)  # top edge bin
    delta = jnp.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
    log_mid = jnp.log(jnp.maximum(delta, 1e-30))
    edge = 1.0 - half  # the bottom bin's centre is -1, the top's +1
    return jnp.where(x < -edge, log_cdf_hi, jnp.where(x > edge, log_sf_lo, log_mid))


def prior_bpd(ds: DiscreteSchedule, x0: Array, batch_ndim: int = 1) -> Array:
    """KL(q(x_T | x0) || N(0, I)) in bits/dim: [*batch]."""
    t = jnp.full(x0.shape[:batch_ndim], ds.num_timesteps - 1)
    mean = P.extract(ds.sqrt_alphas_cumprod, t, x0) * x0
    logvar = P.extract(np.log1p(-ds.alphas_cumprod), t, x0)
    kl = normal_kl(mean, jnp.broadcast_to(logvar, x0.shape), 0.0, 0.0)
    return mean_over_event(kl, batch_ndim) / math.log(2.0)


def vlb_terms(ds: DiscreteSchedule, model_output: Array, x0: Array, x_t: Array, t: Array, *,
              prediction: str, variance_type: str, clip_denoised: bool = False,
              sigma_data: float = 0.5) -> dict[str, Array]:
    """L_t in bits/dim: [*batch] under "vlb": KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for
    t > 0 and the discretised decoder NLL -log p(x0 | x_0) at t = 0. Also "pred_x0"."""
    t = jnp.asarray(t)
    out = P.p_mean_variance(ds, model_output, x_t, t, prediction=prediction,
                            variance_type=variance_type, clip_denoised=clip_denoised,
                            sigma_data=sigma_data)
    true_mean, _, true_logvar = P.q_posterior(ds, x0, x_t, t)
    kl = normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])
    nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    kl = mean_over_event(kl, t.ndim) / math.log(2.0)
    nll = mean_over_event(nll, t.ndim) / math.log(2.0)
    return {"vlb": jnp.where(t == 0, nll, kl), "pred_x0": out["pred_x0"]}


def loss_weight(prediction: str, weighting: str, logsnr: Array, *, min_snr_gamma: float = 5.0,
                p2_gamma: float = 1.0, p2_k: float = 1.0, sigma_data: float = 0.5) -> Array:
    """Per-example multiplier of the target MSE (see module docstring); logsnr: [*batch]."""
    P.check_choice("weighting", weighting, WEIGHTINGS)
    P.check_choice("prediction", prediction, PREDICTIONS)
    lam = jnp.asarray(logsnr, P.coef_dtype(logsnr))
    snr = jnp.exp(lam)
    if weighting == "uniform":
        return jnp.ones_like(lam)
    if prediction == "eps":  # x0 weight / SNR, written to stay finite at SNR = 0 or inf
        table = {"snr": jnp.ones_like(lam),
                 "min_snr": jnp.minimum(1.0, min_snr_gamma * jnp.exp(-lam)),
                 "p2": (p2_k + snr) ** -p2_gamma}
        return table[weighting]
    w_x0 = {"snr": snr, "min_snr": jnp.minimum(snr, min_snr_gamma),
            "p2": snr * (p2_k + snr) ** -p2_gamma}[weighting]
    if prediction == "x0":
        return w_x0
    if prediction == "v":
        return w_x0 * jax.nn.sigmoid(-lam)  # / (1 + SNR)
    return w_x0 * sigma_data**2 / (1.0 + sigma_data**2 * snr)  # * c_out^2


def _logsnr_table(ds: DiscreteSchedule) -> np.ndarray:
    return np.log(ds.alphas_cumprod) - np.log1p(-ds.alphas_cumprod)


def training_losses(model_output: Array, x0: Array, x_t: Array, noise: Array, t: Array,
                    ds: DiscreteSchedule, *, prediction: str = "eps", loss_type: str = "simple",
                    variance_type: str = "fixed_small", weighting: str = "uniform",
                    min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0,
                    vlb_weight: float = 1e-3, clip_denoised: bool = False,
                    sigma_data: float = 0.5) -> dict[str, Array]:
    """Per-example losses at integer timesteps t [*batch] for x_t = q_sample_discrete(ds, x0,
    noise, t) and model_output = model(*discrete_model_input(ds, x_t, t, ...)).

    model_output: x0's shape, or 2C channels on the last axis for learned variance types.
    Returns {"loss", "mse"} and "vlb" (L_t in bits/dim) for loss types hybrid and vlb; all
    [*batch]. Average "loss" over the batch (or weight it for importance sampling).
    """
    P.check_choice("loss_type", loss_type, LOSS_TYPES)
    t = jnp.asarray(t)
    mean_out, var_out = P.split_output(model_output, x_t, variance_type)
    if loss_type == "hybrid" and var_out is None:
        raise ValueError("loss_type 'hybrid' trains a learned variance: use variance_type "
                         "'learned_range' or 'learned', or loss_type 'simple'.")
    dtype = P.float_dtype(x_t)
    alpha = jnp.asarray(ds.sqrt_alphas_cumprod, dtype)[t]
    sigma = jnp.asarray(ds.sqrt_one_minus_alphas_cumprod, dtype)[t]
    target = P.prediction_target(prediction, x0, noise, alpha, sigma, sigma_data)
    mse = mean_over_event((mean_out - target) ** 2, t.ndim)
    logsnr = jnp.asarray(_logsnr_table(ds), dtype)[t]
    weight = loss_weight(prediction, weighting, logsnr, min_snr_gamma=min_snr_gamma,
                         p2_gamma=p2_gamma, p2_k=p2_k, sigma_data=sigma_data)
    terms = {"mse": mse}
    kwargs = dict(prediction=prediction, variance_type=variance_type,
                  clip_denoised=clip_denoised, sigma_data=sigma_data)
    if loss_type == "simple":
        terms["loss"] = weight * mse
    elif loss_type == "hybrid":
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
        terms["vlb"] = vlb_terms(ds, frozen, x0, x_t, t, **kwargs)["vlb"]
        terms["loss"] = weight * mse + vlb_weight * ds.num_timesteps * terms["vlb"]
    else:
        terms["vlb"] = vlb_terms(ds, model_output, x0, x_t, t, **kwargs)["vlb"]
        terms["loss"] = ds.num_timesteps * terms["vlb"]
    return terms


def continuous_training_losses(model_output: Array, x0: Array, noise: Array, t: Array,
                               schedule: Any, *, prediction: str = "eps",
                               weighting: str = "uniform", min_snr_gamma: float = 5.0,
                               p2_gamma: float = 1.0, p2_k: float = 1.0,
                               sigma_data: float = 0.5) -> dict[str, Array]:
    """MSE-family loss in continuous time t [*batch] in [0, 1] for any schedule.

    x_t = q_sample(x0, noise, schedule.alpha(t), schedule.sigma(t)) and model_output =
    model(*model_input(schedule, x_t, t, prediction=...)). With a KarrasSchedule and
    prediction "edm", weighting "uniform" is EDM's loss (lambda(sigma) c_out^2 = 1); draw t
    as schedule.t_from_logsnr(-2 ln sigma) to use EDM's log-normal sigmas.
    Returns {"loss", "mse"}: [*batch].
    """
    t = jnp.asarray(t, P.coef_dtype(t))
    target = P.prediction_target(prediction, x0, noise, schedule.alpha(t), schedule.sigma(t),
                                 sigma_data)
    mse = mean_over_event((model_output - target) ** 2, t.ndim)
    weight = loss_weight(prediction, weighting, schedule.logsnr(t), min_snr_gamma=min_snr_gamma,
                         p2_gamma=p2_gamma, p2_k=p2_k, sigma_data=sigma_data)
    return {"loss": weight * mse, "mse": mse}


def sigma_training_losses(model_output: Array, x0: Array, noise: Array, sigma: Array, *,
                          prediction: str = "edm", weighting: str = "uniform",
                          min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0,
                          sigma_data: float = 0.5) -> dict[str, Array]:
    """MSE-family loss at continuous VE noise levels sigma [*batch] (no timestep table).

    x = x0 + sigma noise and model_output = model(*process.ve_model_input(schedule, x, sigma,
    prediction=...)). With prediction "edm" and weighting "uniform" this is EDM's loss
    (Karras et al. 2022, eq. 8 with lambda(sigma) = (sigma^2 + sigma_data^2) /
    (sigma sigma_data)^2): lambda ||D - x0||^2 = ||F - target||^2, since D - x0 = c_out
    (F - target) and lambda c_out^2 = 1; here averaged over pixels where EDM sums (a constant
    factor). Draw ln sigma ~ N(P_mean, P_std^2) for EDM's log-normal training distribution.
    Returns {"loss", "mse"}: [*batch].
    """
    sigma = jnp.asarray(sigma, P.coef_dtype(sigma))
    ones = jnp.ones_like(sigma)
    target = P.prediction_target(prediction, x0, noise, ones, sigma, sigma_data)
    mse = mean_over_event((model_output - target) ** 2, sigma.ndim)
    weight = loss_weight(prediction, weighting, -2.0 * jnp.log(sigma),
                         min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma, p2_k=p2_k,
                         sigma_data=sigma_data)
    return {"loss": weight * mse, "mse": mse}


def nll_bpd(model_fn: Callable, ds: DiscreteSchedule, x0: Array, key: Array, *,
            prediction: str, variance_type: str, clip_denoised: bool = False, cond: Any = None,
            sigma_data: float = 0.5, timestep_map: np.ndarray | None = None
            ) -> dict[str, Array]:
    """The full variational bound on -log2 p(x0) in bits/dim (iDDPM's calc_bpd_loop).

    model_fn(x_in, c_noise, cond) is evaluated at every timestep (one `lax.scan`) on
    `discrete_model_input(ds, x_t, t)`; x_t uses fresh noise from fold_in(key, t).
    x0: [B, ...] in [-1, 1] (256-level data for an exact likelihood). For a respaced `ds`
    pass its `timestep_map` (the network then sees the original timestep indices).
    Returns {"total_bpd": [B], "prior_bpd": [B], "vb": [B, T] (L_t per timestep),
    "x0_mse": [B, T]}.
    """
    batch = x0.shape[:1]
    kwargs = dict(prediction=prediction, variance_type=variance_type,
                  clip_denoised=clip_denoised, sigma_data=sigma_data)

    def step(carry, t_scalar):
        t = jnp.full(batch, t_scalar)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = P.q_sample_discrete(ds, x0, noise, t)
        x_in, c_noise = P.discrete_model_input(ds, x_t, t, prediction=prediction,
                                               sigma_data=sigma_data, timestep_map=timestep_map)
        terms = vlb_terms(ds, model_fn(x_in, c_noise, cond), x0, x_t, t, **kwargs)
        return carry, (terms["vlb"], mean_over_event((terms["pred_x0"] - x0) ** 2, 1))

    _, (vb, mse) = jax.lax.scan(step, None, jnp.arange(ds.num_timesteps))
    prior = prior_bpd(ds, x0)
    return {"total_bpd": vb.sum(0) + prior, "prior_bpd": prior, "vb": vb.T, "x0_mse": mse.T}
