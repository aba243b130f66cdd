"""float64 end to end under jax_enable_x64 (issue 11): the posterior, p(x_{t-1} | x_t), the
VLB terms and one ddpm / ddim sampler step against NumPy float64 written here independently
from the papers' formulas (Ho et al. 2020, iDDPM, Karras et al. 2022), to 1e-12 relative.

x64 is switched on only inside each test (``jax.enable_x64`` context, an autouse fixture), so
it never leaks into other tests; jit caches are keyed on the flag.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr, ndtr

from diffjax.diffusion import losses as L
from diffjax.diffusion import process as P
from diffjax.diffusion import samplers as SA
from diffjax.diffusion import schedules as S

T = 1000
DS = S.LinearSchedule().discretize(T)
TOL = 1e-12
TS = np.array([0, 1, 2, 17, 400, 998, 999])
SHAPE = (len(TS), 3, 2)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got), np.asarray(ref, np.float64)
    assert got.dtype == np.float64, got.dtype
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ---- NumPy float64 reference (Ho et al. linear betas, T = 1000) ----

BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1.0 - BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
POST_VAR = BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR)
POST_LOGVAR = np.log(np.concatenate([[POST_VAR[1]], POST_VAR[1:]]))
VE_SIGMAS = np.sqrt((1.0 - ABAR) / ABAR)


def _b(v):  # per-example [B] -> [B, 1, 1]
    return np.asarray(v)[:, None, None]


def ref_posterior(x0, x_t, t):
    coef1 = BETAS[t] * np.sqrt(ABAR_PREV[t]) / (1.0 - ABAR[t])
    coef2 = (1.0 - ABAR_PREV[t]) * np.sqrt(1.0 - BETAS[t]) / (1.0 - ABAR[t])
    return _b(coef1) * x0 + _b(coef2) * x_t, _b(POST_VAR[t]), _b(POST_LOGVAR[t])


def ref_x0(out, x_t, t, prediction, sd=0.5):
    a, s = np.sqrt(ABAR[t]), np.sqrt(1.0 - ABAR[t])
    if prediction == "eps":
        return (x_t - _b(s) * out) / _b(a)
    if prediction == "x0":
        return out
    if prediction == "v":
        return _b(a) * x_t - _b(s) * out
    sig = VE_SIGMAS[t]  # EDM: D = c_skip x_ve + c_out F
    c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / np.sqrt(sig**2 + sd**2)
    return _b(c_skip) * (x_t / _b(a)) + _b(c_out) * out


def ref_log_var(var_out, t, variance_type):
    if variance_type == "fixed_small":
        return _b(POST_LOGVAR[t]) + 0 * var_out
    if variance_type == "fixed_large":
        return _b(np.log(np.concatenate([[POST_VAR[1]], BETAS[1:]]))[t]) + 0 * var_out
    frac = (var_out + 1.0) / 2.0
    return frac * _b(np.log(BETAS[t])) + (1.0 - frac) * _b(POST_LOGVAR[t])


def ref_p_mean_variance(output, x_t, t, prediction, variance_type):
    mean_out, var_out = output[..., :2], output[..., 2:]
    x0 = ref_x0(mean_out, x_t, t, prediction)
    mean = ref_posterior(x0, x_t, t)[0]
    return mean, ref_log_var(var_out if var_out.size else 0 * x_t, t, variance_type), x0


def ref_vlb_bits(x0, x_t, t, output, prediction, variance_type):
    mean, log_var, _ = ref_p_mean_variance(output, x_t, t, prediction, variance_type)
    true_mean, _, true_logvar = ref_posterior(x0, x_t, t)
    d = true_logvar - log_var
    kl = 0.5 * (np.expm1(d) - d + (true_mean - mean) ** 2 * np.exp(-log_var))
    # Decoder: 256 bins of width 2/255 on [-1, 1], open edge bins, exact normal CDF.
    std = np.exp(0.5 * log_var)
    lo, hi = (x0 - 1 / 255 - mean) / std, (x0 + 1 / 255 - mean) / std
    mid = np.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
    log_p = np.where(x0 < -0.999, log_ndtr(hi), np.where(x0 > 0.999, log_ndtr(-lo), np.log(mid)))
    def per_example(v):
        return v.reshape(v.shape[0], -1).mean(1) / np.log(2.0)

    return np.where(t == 0, per_example(-log_p), per_example(kl))


def _inputs(channels_out, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.integers(0, 256, SHAPE) / 127.5 - 1.0  # 256-level data, edge bins included
    x0[0, 0, 0], x0[0, 1, 0] = -1.0, 1.0
    noise = rng.standard_normal(SHAPE)
    x_t = _b(np.sqrt(ABAR[TS])) * x0 + _b(np.sqrt(1 - ABAR[TS])) * noise
    out = np.concatenate([noise + 0.05 * rng.standard_normal(SHAPE),
                          rng.uniform(-1, 1, SHAPE[:-1] + (channels_out - 2,))], -1)
    return x0, x_t, out


# ---- tests ----


def test_tables_match_reference():
    np.testing.assert_allclose(DS.alphas_cumprod, ABAR, rtol=1e-14)


def test_q_posterior_float64():
    x0, x_t, _ = _inputs(2)
    mean, var, log_var = P.q_posterior(DS, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(TS))
    m_ref, v_ref, lv_ref = ref_posterior(x0, x_t, TS)
    assert rel_err(mean, m_ref) < TOL
    assert rel_err(var, np.broadcast_to(v_ref, SHAPE)) < TOL
    assert rel_err(log_var, np.broadcast_to(lv_ref, SHAPE)) < TOL


@pytest.mark.parametrize("prediction", P.PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_p_mean_variance_float64(prediction, variance_type):
    learned = variance_type == "learned_range"
    _, x_t, out = _inputs(4 if learned else 2)
    got = P.p_mean_variance(DS, jnp.asarray(out), jnp.asarray(x_t), jnp.asarray(TS),
                            prediction=prediction, variance_type=variance_type)
    mean, log_var, pred_x0 = ref_p_mean_variance(out, x_t, TS, prediction, variance_type)
    assert rel_err(got["pred_x0"], pred_x0) < TOL
    assert rel_err(got["mean"], mean) < TOL
    assert rel_err(got["log_variance"], np.broadcast_to(log_var, SHAPE)) < TOL


@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_vlb_terms_float64(prediction, variance_type):
    learned = variance_type == "learned_range"
    x0, x_t, out = _inputs(4 if learned else 2, seed=1)
    got = L.vlb_terms(DS, jnp.asarray(out), jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(TS),
                      prediction=prediction, variance_type=variance_type)["vlb"]
    ref = ref_vlb_bits(x0, x_t, TS, out, prediction, variance_type)
    assert np.all(ref > 0)
    got = np.asarray(got)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=TOL, atol=0)


def _model_fn(x_in, c_noise, cond):
    """A smooth toy eps-network that depends on its time input."""
    c = c_noise.reshape(c_noise.shape + (1,) * (x_in.ndim - 1))
    return 0.4 * x_in + 1e-3 * c * jnp.sin(x_in)


def _ref_denoise(x, sigma):
    """make_denoiser(_model_fn, DS, prediction="eps") in NumPy: x_in = x / sqrt(1 + s^2),
    c_noise = the fractional timestep index of log s over the table, x0 = x - s eps_hat."""
    c = np.interp(np.log(sigma), np.log(VE_SIGMAS), np.arange(T, dtype=np.float64))
    x_in = x / np.sqrt(1.0 + sigma**2)
    eps = 0.4 * x_in + 1e-3 * c * np.sin(x_in)
    return x - sigma * eps


# Two sigmas between table entries (fractional time inputs), a DDIM-like stride.
SIGMAS = np.array([0.5 * (VE_SIGMAS[600] + VE_SIGMAS[601]), 0.5 * (VE_SIGMAS[400] + VE_SIGMAS[401])])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_one_sampler_step_float64(sampler):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4)) * SIGMAS[0]
    key = jax.random.key(3)
    denoise = P.make_denoiser(_model_fn, DS, prediction="eps")
    got = SA.SAMPLERS[sampler](denoise, jnp.asarray(x), jnp.asarray(SIGMAS), key)
    s, s_next = SIGMAS
    x0 = _ref_denoise(x, s)
    if sampler == "ddim":  # Song et al. eq. 12, eta = 0, in VP form with abar = 1 / (1 + s^2)
        a, a_next = 1 / (1 + s**2), 1 / (1 + s_next**2)
        x_vp = x * np.sqrt(a)
        eps = (x_vp - np.sqrt(a) * x0) / np.sqrt(1 - a)
        ref = (np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps) / np.sqrt(a_next)
    else:  # Ho et al. Alg. 2 over the respaced step: the posterior with beta = 1 - a / a'
        a, a_next = 1 / (1 + s**2), 1 / (1 + s_next**2)
        beta = 1 - a / a_next
        mean = (beta * np.sqrt(a_next) / (1 - a)) * x0 + (
            (1 - a_next) * np.sqrt(1 - beta) / (1 - a)) * (x * np.sqrt(a))
        var = beta * (1 - a_next) / (1 - a)
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), x.shape, jnp.float64))
        ref = (mean + np.sqrt(var) * z) / np.sqrt(a_next)
    assert rel_err(got, ref) < TOL


def test_float32_inputs_stay_float32_under_x64():
    """float32 arrays keep float32 math (no silent upcast) and no float64 -> float32 writes."""
    x0, x_t, out = _inputs(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for variance_type in ("fixed_large", "learned_range"):
            channels = 4 if variance_type == "learned_range" else 2
            got = P.p_mean_variance(DS, jnp.asarray(out[..., :channels], jnp.float32),
                                    jnp.asarray(x_t, jnp.float32), jnp.asarray(TS),
                                    prediction="eps", variance_type=variance_type)
            assert all(v.dtype == jnp.float32 for v in got.values())
        vlb = L.vlb_terms(DS, jnp.asarray(out, jnp.float32), jnp.asarray(x0, jnp.float32),
                          jnp.asarray(x_t, jnp.float32), jnp.asarray(TS), prediction="v",
                          variance_type="learned_range")["vlb"]
        assert vlb.dtype == jnp.float32
        denoise = P.make_denoiser(_model_fn, DS, prediction="eps")
        assert denoise(jnp.ones((2, 3), jnp.float32), jnp.float32(0.7)).dtype == jnp.float32


def test_training_target_and_continuous_schedule_float64():
    rng = np.random.default_rng(4)
    x0, noise = rng.uniform(-1, 1, SHAPE), rng.standard_normal(SHAPE)
    x_t = _b(np.sqrt(ABAR[TS])) * x0 + _b(np.sqrt(1 - ABAR[TS])) * noise
    got = L.training_losses(jnp.zeros(SHAPE, jnp.float64), jnp.asarray(x0), jnp.asarray(x_t),
                            jnp.asarray(noise), jnp.asarray(TS), DS, prediction="v")["mse"]
    v = _b(np.sqrt(ABAR[TS])) * noise - _b(np.sqrt(1 - ABAR[TS])) * x0
    np.testing.assert_allclose(np.asarray(got), (v**2).mean((1, 2)), rtol=TOL, atol=0)
    t = np.linspace(0.05, 0.95, 7)  # VP-SDE limit of linear betas: abar = exp(-int beta)
    abar = np.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
    schedule = S.LinearSchedule()
    assert rel_err(schedule.alpha(jnp.asarray(t)), np.sqrt(abar)) < TOL
    assert rel_err(schedule.t_from_logsnr(jnp.asarray(np.log(abar / (1 - abar)))), t) < TOL
