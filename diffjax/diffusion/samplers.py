"""Samplers over a VE denoiser, each one compiled ``lax.scan`` over its sigma sequence.

Convention (Karras et al. 2022): ``x = x0 + sigma * n``; a denoiser is
``denoise(x, sigma, cond) -> x0_hat`` with x: [B, ...], sigma: [B] (samplers pass the step's
sigma broadcast to [B]). The probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma.
A VP/DDPM model is wrapped into this convention by ``process.make_denoiser``; with log-SNR
lambda = -log sigma the DPM-Solver(++) formulas below are the published ones with alpha = 1.

Every sampler has the signature

    fn(denoise, x_init, sigmas, key, *, cond=None, return_trajectory=False, **options)
        -> x: [B, ...]                      (or (x, xs: [N, B, ...]) with return_trajectory)

x_init: [B, ...] = unit Gaussian noise * sigmas[0]; sigmas: [N + 1] decreasing, normally
ending with 0 (see ``diffjax.diffusion.sigmas``), a NumPy array or a traced jnp array; key: a
PRNG key, step i draws its noise from ``jax.random.fold_in(key, i)`` (deterministic samplers
ignore it). xs[i] is the state after step i. Float options (eta, s_noise, s_churn, s_tmin,
s_tmax) may be traced scalars, so one compiled program serves every value (a Python 0 for eta
or s_churn skips drawing the noise it would scale); string and integer options (e.g.
``unipc``'s variant and order) are fixed at trace time.
The caller jits and shards, e.g. ``jax.jit(lambda p, x, k: euler(partial(D, p), x, s, k))``
with x sharded over the batch axis; samplers contain no device logic.

Number of network evaluations: ``num_evals(name, num_steps)`` (num_steps = len(sigmas) - 1,
sigmas ending at 0).

Inversion (x0 -> x_T, e.g. DDIM inversion for editing): the deterministic ``ddim`` (eta=0)
and ``euler`` (s_churn=0) also accept an *increasing* sequence, normally a sampling sequence
reversed, ``[0, s_1, ..., s_max]`` (``conditional.ddim_invert`` does this). Each step is the
same Euler step of the probability-flow ODE, taken upward: x' = D + s' (x - D) / s with
D = D(x, s) at the step's start. The state at sigma 0 is clean data (x = x0), where the ODE's
slope is 0 / 0 and the denoiser is not evaluated: a step out of sigma 0 takes the noise
estimate at its end, x' = x + (x - D(x, s')) (a sequence may also start at the smallest
sigma the model knows; then x0 is taken as the state at that sigma, and no special step
occurs). For Gaussian data that first step inverts the last sampling step (s' -> 0,
x = D(x', s')) up to O(s'^4). Stochastic options are refused with increasing concrete sigmas
(a Python eta > 0 or s_churn > 0 raises ValueError); a traced eta is not applied on
increasing steps (DDIM's sigma_t(eta) exists only for steps toward the data).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Denoiser = Callable[[Array, Array, Any], Any]
Sampled = Array | tuple[Array, Array]  # x [B, ...], or (x, trajectory [N, B, ...])


def _call(denoise: Denoiser, x: Array, sigma: Array, cond: Any) -> Any:
    """denoise(x, sigma broadcast to [B], cond)."""
    return denoise(x, jnp.full((x.shape[0],), sigma, x.dtype), cond)


def _loop(step: Callable, carry: tuple, x_init: Array, sigmas: ArrayLike, key: Array,
          trajectory: bool) -> Sampled:
    """Runs ``step(carry, inputs, step_key) -> carry`` over the steps with one lax.scan.

    carry[0] is the state x; inputs holds i, sigma, sigma_next and the two previous sigmas
    (equal to sigma where they do not exist yet).
    """
    sigmas = jnp.asarray(sigmas, x_init.dtype)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {sigmas.shape}.")
    if not jnp.issubdtype(x_init.dtype, jnp.floating) or x_init.ndim < 1:
        raise ValueError("x_init must be a floating array [B, ...] (unit noise * sigmas[0]).")
    head = sigmas[:-1]
    inputs = {
        "i": jnp.arange(head.shape[0]),
        "sigma": head,
        "sigma_next": sigmas[1:],
        "sigma_prev": jnp.concatenate([head[:1], head[:-1]]),
        "sigma_prev2": jnp.concatenate([head[:1], head[:1], head[:-2]])[: head.shape[0]],
    }

    def body(c, inp):
        c = step(c, inp, jax.random.fold_in(key, inp["i"]))
        return c, (c[0] if trajectory else None)

    carry, xs = lax.scan(body, carry, inputs)
    return (carry[0], xs) if trajectory else carry[0]


def _noise(key: Array, x: Array) -> Array:
    return jax.random.normal(key, x.shape, x.dtype)


def has_increasing_step(sigmas: ArrayLike) -> bool:
    """Whether a concrete sigma sequence takes an increasing step (False when traced)."""
    try:
        s = np.asarray(sigmas, np.float64)
    except jax.errors.TracerArrayConversionError:
        return False
    return bool(np.any(s[1:] > s[:-1]))


def _check_deterministic(name: str, sigmas: ArrayLike, **options: Any) -> None:
    """ValueError if a Python-number stochastic option is on over an increasing sequence."""
    on = [f"{k}={v}" for k, v in options.items() if isinstance(v, (int, float)) and v != 0]
    if on and has_increasing_step(sigmas):
        raise ValueError(f"{name} with increasing sigmas (inversion) is deterministic only: "
                         f"got {', '.join(on)}; pass 0 (or give a decreasing sequence).")


def _eval_sigma(sigma: Array, sigma_next: Array) -> Array:
    """The sigma a step evaluates the denoiser at: its start, or its end out of sigma 0."""
    return jnp.where(sigma > 0, sigma, sigma_next)


def _static_zero(value: Any) -> bool:
    """Whether an option is a Python (not traced) zero, so the noise it scales can be skipped."""
    return isinstance(value, (int, float)) and value == 0


def _churn(x: Array, sigma: Array, key: Array, num_steps: int, s_churn: float, s_tmin: float,
           s_tmax: float, s_noise: float) -> tuple[Array, Array]:
    """Karras Alg. 2 churn: raise sigma to sigma_hat = (1 + gamma) sigma by adding noise."""
    if _static_zero(s_churn):
        return x, sigma
    gamma_max = jnp.minimum(s_churn / num_steps, math.sqrt(2.0) - 1.0)
    gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    # sqrt(sigma_hat^2 - sigma^2), written so that gamma = 0 gives exactly 0 (no FMA residue).
    x = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * _noise(key, x)
    return x, sigma_hat


def euler(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = math.inf, s_noise: float = 1.0,
) -> Sampled:
    """Euler steps on the probability-flow ODE; Karras Alg. 1 (s_churn=0) / Alg. 2 with Euler.

    Churn: gamma_i = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma_i <= s_tmax.
    With s_churn = 0, sigmas may increase (inversion; see the module docstring).
    """
    _check_deterministic("euler", sigmas, s_churn=s_churn)
    num_steps = jnp.shape(sigmas)[0] - 1

    def step(carry, inp, k):
        x, sigma_hat = _churn(carry[0], inp["sigma"], k, num_steps, s_churn, s_tmin, s_tmax,
                              s_noise)
        at = _eval_sigma(sigma_hat, inp["sigma_next"])
        d = (x - _call(denoise, x, at, cond)) / at
        return (x + (inp["sigma_next"] - sigma_hat) * d,)

    return _loop(step, (x_init,), x_init, sigmas, key, return_trajectory)


def heun(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = math.inf, s_noise: float = 1.0,
) -> Sampled:
    """Karras et al. (2022) Alg. 2 (Alg. 1 when s_churn=0): Heun's 2nd-order steps.

    The step into sigma_{i+1} = 0 is a plain Euler step ("if t_{i+1} != 0"), so N steps ending
    at 0 cost 2N - 1 evaluations.
    """
    num_steps = jnp.shape(sigmas)[0] - 1

    def step(carry, inp, k):
        x, sigma_hat = _churn(carry[0], inp["sigma"], k, num_steps, s_churn, s_tmin, s_tmax,
                              s_noise)
        sigma_next = inp["sigma_next"]
        d = (x - _call(denoise, x, sigma_hat, cond)) / sigma_hat
        x_euler = x + (sigma_next - sigma_hat) * d

        def correct():
            d_next = (x_euler - _call(denoise, x_euler, sigma_next, cond)) / sigma_next
            return x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)

        return (lax.cond(sigma_next > 0, correct, lambda: x_euler),)

    return _loop(step, (x_init,), x_init, sigmas, key, return_trajectory)


def dpm_2(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = math.inf, s_noise: float = 1.0,
) -> Sampled:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1 with r = 1/2) in Karras's Alg. 2; k-diffusion's DPM2.

    With alpha = 1 the eps-form DPM-Solver-2 step is a midpoint step in log sigma: with
    d = (x - D(x, s_hat)) / s_hat and s_mid = sqrt(s_hat s') (lambda's midpoint),
    x_mid = x + (s_mid - s_hat) d, then x' = x + (s' - s_hat) d(x_mid, s_mid). Churn as in
    ``heun``. The step into sigma 0 is an Euler step (x' = D), so N steps ending at 0 cost
    2N - 1 evaluations.
    """
    num_steps = jnp.shape(sigmas)[0] - 1

    def step(carry, inp, k):
        x, sigma_hat = _churn(carry[0], inp["sigma"], k, num_steps, s_churn, s_tmin, s_tmax,
                              s_noise)
        sigma_next = inp["sigma_next"]
        d = (x - _call(denoise, x, sigma_hat, cond)) / sigma_hat

        def midpoint():
            sigma_mid = jnp.sqrt(sigma_hat * sigma_next)
            x_mid = x + (sigma_mid - sigma_hat) * d
            d_mid = (x_mid - _call(denoise, x_mid, sigma_mid, cond)) / sigma_mid
            return x + (sigma_next - sigma_hat) * d_mid

        return (lax.cond(sigma_next > 0, midpoint, lambda: x + (sigma_next - sigma_hat) * d),)

    return _loop(step, (x_init,), x_init, sigmas, key, return_trajectory)


def ancestral_step(sigma: Array, sigma_next: Array, eta: float = 1.0) -> tuple[Array, Array]:
    """Split a step sigma -> sigma_next into a deterministic part and fresh noise.

    Returns (sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_next^2 and
    sigma_up = min(sigma_next, eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma); with
    eta = 1 this is the DDPM posterior standard deviation in VE units.
    """
    sigma_up = jnp.minimum(
        sigma_next, eta * sigma_next * jnp.sqrt((sigma - sigma_next) * (sigma + sigma_next)) / sigma
    )
    return jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0)), sigma_up


def euler_ancestral(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, eta: float = 1.0, s_noise: float = 1.0,
) -> Sampled:
    """Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion's Euler a)."""

    def step(carry, inp, k):
        x, sigma = carry[0], inp["sigma"]
        sigma_down, sigma_up = ancestral_step(sigma, inp["sigma_next"], eta)
        d = (x - _call(denoise, x, sigma, cond)) / sigma
        x = x + (sigma_down - sigma) * d
        return (x + s_noise * sigma_up * _noise(k, x),)

    return _loop(step, (x_init,), x_init, sigmas, key, return_trajectory)


def dpmpp_2s_ancestral(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, eta: float = 1.0, s_noise: float = 1.0,
) -> Sampled:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, r = 1/2) down to sigma_down, then fresh noise
    of std sigma_up (``ancestral_step``); k-diffusion's DPM++ 2S a.

    With h = log(s / s_down) and s_mid = sqrt(s s_down): u = (s_mid / s) x - expm1(-h/2) x0_i,
    x' = (s_down / s) x - expm1(-h) D(u, s_mid) + s_noise s_up z. Where sigma_down = 0 (the
    step into sigma 0) the step is Euler's, x' = x0_i, with one evaluation: N steps ending at
    0 cost 2N - 1 evaluations (for eta <= 1; eta > 1 can zero sigma_down earlier).
    """

    def step(carry, inp, k):
        x, sigma = carry[0], inp["sigma"]
        sigma_down, sigma_up = ancestral_step(sigma, inp["sigma_next"], eta)
        x0 = _call(denoise, x, sigma, cond)

        def second_order():
            h = _log_ratio(sigma, sigma_down)
            sigma_mid = jnp.sqrt(sigma * sigma_down)
            u = (sigma_mid / sigma) * x - jnp.expm1(-0.5 * h) * x0
            return (sigma_down / sigma) * x - jnp.expm1(-h) * _call(denoise, u, sigma_mid, cond)

        x = lax.cond(sigma_down > 0, second_order, lambda: x0)
        return (x if _static_zero(eta) else x + s_noise * sigma_up * _noise(k, x),)

    return _loop(step, (x_init,), x_init, sigmas, key, return_trajectory)


def ddim(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, eta: float = 0.0,
) -> Sampled:
    """Song et al. (2021) eq. 12 in VE units: x' = x0 + sqrt(s'^2 - c^2) eps_hat + c z.

    c = eta * s' sqrt(s^2 - s'^2) / s is DDIM's sigma_t(eta) / sqrt(abar_{t-1}); eta=0 is the
    deterministic DDIM (identical to ``euler`` in this convention), eta=1 is DDPM's posterior.
    With eta = 0, sigmas may increase: DDIM inversion (see the module docstring); there
    x' = x0_hat + s' eps_hat, and out of sigma 0, x' = x + s' eps_hat(x, s').
    """
    if isinstance(eta, (int, float)) and not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim eta must be in [0, 1], got {eta}.")
    _check_deterministic("ddim", sigmas, eta=eta)

    def step(carry, inp, k):
        x, sigma, sigma_next = carry[0], inp["sigma"], inp["sigma_next"]
        at = _eval_sigma(sigma, sigma_next)
        x0 = _call(denoise, x, at, cond)
        eps = (x - x0) / at
        if _static_zero(eta):
            c = 0.0
        else:  # 0 on increasing steps (the max), where no DDIM noise is defined
            gap = jnp.maximum((sigma - sigma_next) * (sigma + sigma_next), 0.0)
            c = eta * sigma_next * jnp.sqrt(gap) / at
        base = jnp.where(sigma > 0, x0, x)  # x at sigma 0 is the data itself
        x = base + jnp.sqrt(jnp.maximum(sigma_next**2 - c**2, 0.0)) * eps
        return (x if _static_zero(eta) else x + c * _noise(k, x),)

    return _loop(step, (x_init,), x_init, sigmas, key, return_trajectory)


VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned")


def ddpm_transition(x: Array, x0: Array, sigma: Array, sigma_next: Array,
                    variance: str = "fixed_small", frac: Array | None = None,
                    ) -> tuple[Array, Array]:
    """Mean and variance (VE units) of one ancestral DDPM step sigma -> sigma_next.

    With abar = 1 / (1 + sigma^2) the step's beta = 1 - abar/abar_next and
    beta_tilde = beta (1 - abar_next) / (1 - abar) (Ho et al.; iDDPM respacing). The mean is
    the posterior mean x0 + (s'^2 / s^2)(x - x0); the VP variance is beta_tilde
    ("fixed_small"), beta ("fixed_large") or exp(frac log beta + (1 - frac) log beta_tilde)
    ("learned", iDDPM); VE variance = VP variance / abar_next. iDDPM clips log beta_tilde only
    at t = 0, where the step ends at sigma 0 and adds no noise, so no clip is needed here.
    Returns (mean [B, ...], var broadcastable to x).
    """
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {variance!r}.")
    beta = (sigma - sigma_next) * (sigma + sigma_next) / (1.0 + sigma**2)
    ratio = (sigma_next / sigma) ** 2
    var_small = beta * ratio * (1.0 + sigma**2)
    if variance == "fixed_small":
        var = var_small
    elif variance == "fixed_large":
        var = beta * (1.0 + sigma_next**2)
    else:
        tiny = jnp.finfo(jnp.result_type(x)).tiny
        log_small = jnp.log(jnp.maximum(var_small / (1.0 + sigma_next**2), tiny))
        frac = jnp.reshape(frac, jnp.shape(frac) + (1,) * (x.ndim - jnp.ndim(frac)))
        var = jnp.exp(frac * jnp.log(beta) + (1.0 - frac) * log_small) * (1.0 + sigma_next**2)
    return x0 + ratio * (x - x0), var


def shift_variance(var: Array, sigma: Array, sigma_next: Array, sigma_prev: Array,
                   variance: str = "fixed_small", frac: Array | None = None) -> Array:
    """The VE variance guided-diffusion's ``condition_mean`` multiplies: ``var`` of
    :func:`ddpm_transition`, except in the step into sigma 0 (ADM's t = 0).

    There ADM's table entries are 0 ("fixed_small"), the previous step's beta_tilde
    ("fixed_large": its variance list starts with posterior_variance[1]) and
    exp(frac log beta + (1 - frac) log beta_tilde_prev) ("learned": the log beta_tilde clipped
    at t = 0); beta_tilde_prev is that of the step sigma_prev -> sigma. No noise is drawn
    there, but the mean shift uses it.
    """
    ratio = (sigma / sigma_prev) ** 2
    tilde_prev = (sigma_prev - sigma) * (sigma_prev + sigma) / (1.0 + sigma_prev**2) * ratio * (
        (1.0 + sigma_prev**2) / (1.0 + sigma**2))
    if variance == "fixed_small":
        last = jnp.zeros_like(tilde_prev)
    elif variance == "fixed_large":
        last = tilde_prev
    else:
        tiny = jnp.finfo(jnp.result_type(var)).tiny
        beta = sigma**2 / (1.0 + sigma**2)
        frac = jnp.reshape(frac, jnp.shape(frac) + (1,) * (jnp.ndim(var) - jnp.ndim(frac)))
        last = jnp.exp(frac * jnp.log(beta) + (1.0 - frac) * jnp.log(jnp.maximum(tilde_prev,
                                                                                  tiny)))
    return jnp.where(sigma_next > 0, var, last)


def ddpm(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, variance: str = "fixed_small",
    mean_shift: Callable[[Array, Array, Any], Array] | None = None,
) -> Sampled:
    """Ancestral sampling (Ho et al. 2020 Alg. 2; iDDPM's learned range variance).

    With variance="learned", ``denoise`` must be ``denoise_with_variance(x, sigma, cond) ->
    (x0_hat, frac)`` with frac: [B, ...] (or [B]) in [0, 1]. No noise is added into sigma 0.

    mean_shift: ``fn(x, sigma [B], cond) -> g [B, ...]``, g = s grad_{x_ve} log p(y | x_ve,
    sigma) at the step's start (``guidance.classifier_mean_shift``): Dhariwal & Nichol's
    Alg. 1 (guided-diffusion's ``condition_mean``), mean_vp + Sigma_vp s grad_{x_vp} log p.
    With x_vp = x / sqrt(1 + s^2), mean_vp = mean / sqrt(1 + s'^2) and Sigma_vp =
    var / (1 + s'^2) that is, in VE units, mean + var sqrt((1 + s^2) / (1 + s'^2)) g, i.e.
    var g / sqrt(alpha_t), with var of :func:`shift_variance`.
    """

    def step(carry, inp, k):
        x = carry[0]
        return (ddpm_step(denoise, x, inp["sigma"], inp["sigma_next"], inp["sigma_prev"],
                          _noise(k, x), cond=cond, variance=variance, mean_shift=mean_shift),)

    return _loop(step, (x_init,), x_init, sigmas, key, return_trajectory)


def ddpm_step(denoise: Denoiser, x: Array, sigma: Array, sigma_next: Array,
              sigma_prev: Array, noise: Array, *, cond: Any = None,
              variance: str = "fixed_small",
              mean_shift: Callable[[Array, Array, Any], Array] | None = None) -> Array:
    """One step of :func:`ddpm` with explicit unit noise [B, ...] (e.g. to replay another
    implementation's draws; zeros give the step's mean). sigma_prev: the previous step's
    sigma (sigma itself at the first step), used only by ``mean_shift`` into sigma 0."""
    out = _call(denoise, x, sigma, cond)
    x0, frac = out if variance == "learned" else (out, None)
    mean, var = ddpm_transition(x, x0, sigma, sigma_next, variance, frac)
    if mean_shift is not None:
        g = mean_shift(x, jnp.full((x.shape[0],), sigma, x.dtype), cond)
        var_g = shift_variance(var, sigma, sigma_next, sigma_prev, variance, frac)
        mean = mean + var_g * jnp.sqrt((1.0 + sigma**2) / (1.0 + sigma_next**2)) * g
    std = jnp.where(sigma_next > 0, jnp.sqrt(var), 0.0)
    return mean + std * noise


def _finite_next(sigma: Array, sigma_next: Array) -> Array:
    """sigma_next, or sigma / 2 in the step into 0 (whose multistep branch is discarded), so
    that h = log(sigma / sigma_next) stays finite and gradients through the scan stay finite."""
    return jnp.where(sigma_next > 0, sigma_next, 0.5 * sigma)


def _log_ratio(sigma_a: Array, sigma_b: Array) -> Array:
    """lambda_b - lambda_a = log(sigma_a / sigma_b) with lambda = -log sigma."""
    return jnp.log(sigma_a) - jnp.log(sigma_b)


def dpmpp_2m(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False,
) -> Sampled:
    """DPM-Solver++(2M), Lu et al. (2022) Alg. 2 with alpha = 1, lambda = -log sigma.

    Step 0 is first order; later steps use D = (1 + 1/2r) x0_i - 1/2r x0_{i-1},
    r = h_{i-1} / h_i. The step into sigma 0 (h = inf) returns the denoised x0_i.
    """

    def step(carry, inp, k):
        x, old = carry
        sigma, sigma_next = inp["sigma"], inp["sigma_next"]
        x0 = _call(denoise, x, sigma, cond)
        safe_next = _finite_next(sigma, sigma_next)
        h = _log_ratio(sigma, safe_next)
        r = jnp.where(inp["i"] == 0, 1.0, _log_ratio(inp["sigma_prev"], sigma) / h)
        d = jnp.where(inp["i"] == 0, x0, (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old)
        x_next = (safe_next / sigma) * x - jnp.expm1(-h) * d
        return jnp.where(sigma_next > 0, x_next, x0), x0

    return _loop(step, (x_init, jnp.zeros_like(x_init)), x_init, sigmas, key, return_trajectory)


def _sde_noise(key: Array, x: Array, sigma_next: Array, h: Array, eta: float,
               s_noise: float) -> Array:
    """Fresh noise of the DPM-Solver++ SDE step: s' sqrt(1 - e^{-2 eta h}) s_noise z."""
    return sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)) * s_noise * _noise(key, x)


def dpmpp_2m_sde(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, eta: float = 1.0, s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Sampled:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, as in k-diffusion); eta=0 gives dpmpp_2m.

    With h = log(s / s'), h_eta = (1 + eta) h and q = 1 - e^{-h_eta}:
    x' = (s'/s) e^{-eta h} x + q x0_i + c (x0_i - x0_{i-1}) / r + s' sqrt(1 - e^{-2 eta h}) z,
    r = h_{i-1} / h, c = q / 2 ("midpoint") or 1 - q / h_eta ("heun"); step 0 has no
    correction and the step into sigma 0 returns x0_i. Noise is independent Gaussian per step
    (k-diffusion defaults to a Brownian tree; the same law for a fixed sigma sequence).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}.")

    def step(carry, inp, k):
        x, old = carry
        sigma, sigma_next = inp["sigma"], inp["sigma_next"]
        x0 = _call(denoise, x, sigma, cond)
        safe_next = _finite_next(sigma, sigma_next)
        h = _log_ratio(sigma, safe_next)
        h_eta = h * (1.0 + eta)
        one_minus = -jnp.expm1(-h_eta)
        x_next = (safe_next / sigma) * jnp.exp(-eta * h) * x + one_minus * x0
        r = _log_ratio(inp["sigma_prev"], sigma) / h
        coef = 0.5 * one_minus if solver_type == "midpoint" else 1.0 - one_minus / h_eta
        x_next = x_next + jnp.where(inp["i"] > 0, coef / r, 0.0) * (x0 - old)
        if not _static_zero(eta):
            x_next = x_next + _sde_noise(k, x, safe_next, h, eta, s_noise)
        return jnp.where(sigma_next > 0, x_next, x0), x0

    return _loop(step, (x_init, jnp.zeros_like(x_init)), x_init, sigmas, key, return_trajectory)


def dpmpp_3m_sde(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, eta: float = 1.0, s_noise: float = 1.0,
) -> Sampled:
    """DPM-Solver++(3M) SDE (k-diffusion's 3rd-order multistep); eta=0 is the 3M ODE solver.

    With h = log(s / s'), h_eta = (1 + eta) h, phi_2 = 1 - (1 - e^{-h_eta}) / h_eta and
    phi_3 = phi_2 / h_eta - 1/2: x' = e^{-h_eta} x + (1 - e^{-h_eta}) x0_i + phi_2 D1 - phi_3 D2
    + s' sqrt(1 - e^{-2 eta h}) z, where D1, D2 are first and second divided differences of
    the last three x0's in lambda (only D1 = (x0_i - x0_{i-1}) / r0 at step 1, none at step 0);
    the step into sigma 0 returns x0_i.
    """

    def step(carry, inp, k):
        x, x0_1, x0_2 = carry
        sigma, sigma_next, i = inp["sigma"], inp["sigma_next"], inp["i"]
        x0 = _call(denoise, x, sigma, cond)
        safe_next = _finite_next(sigma, sigma_next)
        h = _log_ratio(sigma, safe_next)
        h_eta = h * (1.0 + eta)
        x_next = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * x0
        # r0, r1 are set to 1 where their history does not exist yet (unused, finite grads).
        r0 = jnp.where(i >= 1, _log_ratio(inp["sigma_prev"], sigma) / h, 1.0)
        r1 = jnp.where(i >= 2, _log_ratio(inp["sigma_prev2"], inp["sigma_prev"]) / h, 1.0)
        phi_2 = jnp.expm1(-h_eta) / h_eta + 1.0
        phi_3 = phi_2 / h_eta - 0.5
        d1_0 = (x0 - x0_1) / r0
        d1_1 = (x0_1 - x0_2) / r1
        third = phi_2 * (d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)) - phi_3 * (d1_0 - d1_1) / (r0 + r1)
        x_next = x_next + jnp.where(i >= 2, third, jnp.where(i == 1, phi_2 * d1_0, 0.0))
        if not _static_zero(eta):
            x_next = x_next + _sde_noise(k, x, safe_next, h, eta, s_noise)
        return jnp.where(sigma_next > 0, x_next, x0), x0, x0_1

    zeros = jnp.zeros_like(x_init)
    return _loop(step, (x_init, zeros, zeros), x_init, sigmas, key, return_trajectory)


UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc_rhos(nodes: list[Array], b: Array, n: Array) -> Array:
    """UniPC's coefficients: sum_k rho_k nodes_k^j = b_j for j < n, solved for rho_0..rho_{n-1}
    (rho_k = 0 for k >= n); (1/2, 0, ...) when n = 1, the official code's 1 x 1 case."""
    size = len(nodes)
    if size == 0:
        return b[:0]
    j = jnp.arange(size)
    vander = jnp.stack([jnp.stack(nodes) ** p for p in range(size)])  # [j, k] = nodes_k^j
    used = (j[:, None] < n) & (j[None, :] < n)
    rho = jnp.linalg.solve(jnp.where(used, vander, jnp.eye(size, dtype=b.dtype)),
                           jnp.where(j < n, b, 0.0))
    return jnp.where(n == 1, jnp.where(j == 0, 0.5, 0.0), rho)


def unipc(
    denoise: Denoiser, x_init: Array, sigmas: ArrayLike, key: Array, *, cond: Any = None,
    return_trajectory: bool = False, variant: str = "bh2", order: int = 2,
) -> Sampled:
    """UniPC (Zhao et al. 2023), multistep UniP-p predictor + UniC corrector, x0 prediction.

    With h = log(s / s'), m_k = x0 estimates at sigma_{i-k}, r_k = (lambda_{i-k} - lambda_i) / h
    and D_k = (m_k - m_0) / r_k: x_pred = (s'/s) x - expm1(-h) m_0 - B(h) sum_k rho^p_k D_k;
    the corrector evaluates m' = D(x_pred, s') and sets x' = (s'/s) x - expm1(-h) m_0
    - B(h) (sum_k rho^c_k D_k + rho^c_t (m' - m_0)); m' (at x_pred) joins the history. B(h)
    is -h ("bh1") or expm1(-h) ("bh2"); the rho solve the paper's order conditions
    R rho = b with b_k = k! phi_{k+1}(-h) (-h) / B(h) (rho = 1/2 in the 1 x 1 case). As in the
    official code (lower_order_final), step i has order min(order, i + 1, N - i) and the last
    step no corrector; into sigma 0 that first-order step is x' = m_0. N evaluations for N
    steps (m_0 at sigma_0 before the loop, one corrector evaluation per step but the last).
    variant and order (1 to 3) are fixed at trace time.
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unipc variant must be one of {UNIPC_VARIANTS}, got {variant!r}.")
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}.")
    num_steps = jnp.shape(sigmas)[0] - 1

    def step(carry, inp, k):
        x, ms = carry[0], carry[1:]  # ms[k]: the x0 estimate at sigma_{i-k}
        i, sigma, sigma_next = inp["i"], inp["sigma"], inp["sigma_next"]
        p = jnp.minimum(jnp.minimum(i + 1, num_steps - i), order)
        safe_next = _finite_next(sigma, sigma_next)
        h = _log_ratio(sigma, safe_next)
        past = (inp["sigma_prev"], inp["sigma_prev2"])[: order - 1]
        # r_k = -k where sigma_{i-k} does not exist yet: unused, keeps D_k finite.
        rks = [jnp.where(i >= n, _log_ratio(sigma, s) / h, -n) for n, s in enumerate(past, 1)]
        d1s = [(m - ms[0]) / r for m, r in zip(ms[1:], rks)]
        b_h = -h if variant == "bh1" else jnp.expm1(-h)
        phi, fact, b = jnp.expm1(-h) / -h - 1.0, 1.0, []
        for n in range(1, order + 1):
            b.append(phi * fact / b_h)
            fact *= n + 1
            phi = phi / -h - 1.0 / fact
        b = jnp.stack(b)
        x_lin = (safe_next / sigma) * x - jnp.expm1(-h) * ms[0]
        rho_p = _unipc_rhos(rks, b[:-1], p - 1)
        x_pred = x_lin - b_h * sum((r * d for r, d in zip(rho_p, d1s)), jnp.zeros_like(x))

        def correct():
            m_next = _call(denoise, x_pred, sigma_next, cond)
            rho_c = _unipc_rhos([jnp.ones_like(h)] + rks, b, p)
            res = rho_c[0] * (m_next - ms[0]) + sum(r * d for r, d in zip(rho_c[1:], d1s))
            return x_lin - b_h * res, m_next

        x_next, m_next = lax.cond(i < num_steps - 1, correct, lambda: (x_pred, ms[0]))
        return (jnp.where(sigma_next > 0, x_next, ms[0]), m_next) + ms[:-1]

    sigma_0 = jnp.asarray(sigmas, x_init.dtype)[0]
    ms = (_call(denoise, x_init, sigma_0, cond),) + (jnp.zeros_like(x_init),) * (order - 1)
    return _loop(step, (x_init,) + ms, x_init, sigmas, key, return_trajectory)


SAMPLERS: dict[str, Callable[..., Any]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpm_2": dpm_2,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "unipc": unipc,
}

_EVALS_PER_STEP = {name: 1 for name in SAMPLERS}
# Two evaluations per step but one in the step into sigma 0 (dpmpp_2s_ancestral: for eta <= 1).
_TWO_STAGE = ("heun", "dpm_2", "dpmpp_2s_ancestral")


def num_evals(name: str, num_steps: int) -> int:
    """Denoiser evaluations of sampler ``name`` over num_steps steps ending at sigma 0."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return 2 * num_steps - 1 if name in _TWO_STAGE else _EVALS_PER_STEP[name] * num_steps
