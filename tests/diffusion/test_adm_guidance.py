"""ADM's two ways of classifier guidance (Dhariwal & Nichol 2021), against float64 NumPy.

Alg. 1 (guided-diffusion's ``condition_mean``, ``classifier_mode="mean"``): in the VP frame
new_mean = mu + Sigma s grad_{x_t} log p(y | x_t), applied by ``samplers.ddpm(mean_shift=)``.
Alg. 2 (``condition_score``, ``classifier_mode="score"``): eps' = eps - sqrt(1 - abar) s grad,
the denoiser transform ``guidance.classifier_guidance``.

The problem is analytic: Gaussian data x0 ~ N(mu, v I) (exact denoiser) and a logistic
classifier on the VP input, log p(y=1 | x_t) = log sigmoid(w . x_t + b) with gradient
(1 - sigmoid(z)) w. The reference below is ADM's formulas in ADM's own variables (alphas
cumprod of the kept timesteps, posterior coefficients, clipped log variance), in NumPy
float64, written without diffjax's VE algebra; diffjax runs under ``jax.enable_x64``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import configlib, experiment, generate
from diffjax.configlib import ConfigError
from diffjax.diffusion import guidance as G
from diffjax.diffusion import samplers as S

D = 6
MU = np.linspace(-0.5, 0.7, D)
VAR0 = 0.3
W = np.linspace(1.0, -0.8, D)
B0 = 0.2
# A linear-beta table (Ho et al.), 1000 steps, 5 kept timesteps: respaced as in iDDPM.
ABAR_FULL = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
KEPT = np.array([0, 180, 420, 700, 999])
ABAR = ABAR_FULL[KEPT]
SIGMAS = np.append(np.sqrt((1.0 - ABAR) / ABAR)[::-1], 0.0)  # decreasing VE sigmas, then 0


def _denoise(x, sigma, cond):
    s2 = jnp.reshape(sigma, (-1, 1)) ** 2
    return MU + VAR0 / (VAR0 + s2) * (x - MU)


def _log_prob(x_ve, sigma, y):
    """log p(y | x) of the logistic classifier on the VP input (y in {0, 1}), [B]."""
    z = (x_ve / jnp.sqrt(1.0 + sigma[:, None] ** 2)) @ W + B0
    return jnp.where(y == 1, jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z))


# ----------------------------------------------------------------------------- NumPy ADM


def _adm_tables():
    """ADM's respaced tables (GaussianDiffusion.__init__ on SpacedDiffusion's new betas)."""
    betas = 1.0 - ABAR / np.append(1.0, ABAR[:-1])
    abar_prev = np.append(1.0, ABAR[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - ABAR)
    return {
        "betas": betas, "abar": ABAR, "abar_prev": abar_prev, "post_var": post_var,
        "post_logvar_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "coef1": betas * np.sqrt(abar_prev) / (1.0 - ABAR),
        "coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - ABAR),
    }


def _adm_step(x_vp, t, y, scale, mode, variance="fixed_small", frac=None):
    """(new mean, variance) of ADM's p_sample at respaced index t with condition_mean
    (mode "mean") or condition_score (mode "score"); VP frame, float64."""
    tb = _adm_tables()
    abar = tb["abar"][t]
    sigma = np.sqrt((1.0 - abar) / abar)
    x0 = MU + VAR0 / (VAR0 + sigma**2) * (x_vp / np.sqrt(abar) - MU)  # the model's pred_xstart
    z = x_vp @ W + B0
    p1 = 1.0 / (1.0 + np.exp(-z))
    grad = scale * np.where(y == 1, 1.0 - p1, -p1)[:, None] * W  # cond_fn: s grad_{x_t} log p
    if variance == "fixed_small":
        var = np.full_like(x_vp, tb["post_var"][t])
    elif variance == "fixed_large":
        var = np.full_like(x_vp, np.append(tb["post_var"][1], tb["betas"][1:])[t])
    else:
        log_var = frac * np.log(tb["betas"][t]) + (1.0 - frac) * tb["post_logvar_clipped"][t]
        var = np.exp(log_var) * np.ones_like(x_vp)
    if mode == "score":
        eps = (x_vp / np.sqrt(abar) - x0) / np.sqrt(1.0 / abar - 1.0)
        eps = eps - np.sqrt(1.0 - abar) * grad
        x0 = x_vp / np.sqrt(abar) - np.sqrt(1.0 / abar - 1.0) * eps
    mean = tb["coef1"][t] * x0 + tb["coef2"][t] * x_vp
    if mode == "mean":
        mean = mean + var * grad
    return mean, var


# ----------------------------------------------------------------------------- diffjax


def _diffjax_mean(x_vp, i, y, scale, mode, variance="fixed_small", frac=None):
    """diffjax's step i of the sigma sequence with zero noise, back in the VP frame of
    sigma_{i+1} (ADM's respaced index t = K - 1 - i)."""
    sig = jnp.asarray(SIGMAS)
    sigma, sigma_next, sigma_prev = sig[i], sig[i + 1], sig[max(i - 1, 0)]
    x = jnp.asarray(x_vp) * jnp.sqrt(1.0 + sigma**2)
    denoise, shift = _denoise, None
    if mode == "score":
        denoise = G.classifier_guidance(_denoise, _log_prob, scale)
    else:
        shift = G.classifier_mean_shift(_log_prob, scale)
    if variance == "learned":
        plain = denoise
        denoise = lambda x, s, c: (plain(x, s, c), jnp.full(x.shape, frac))
    out = S.ddpm_step(denoise, x, sigma, sigma_next, sigma_prev, jnp.zeros_like(x),
                      cond=jnp.asarray(y), variance=variance, mean_shift=shift)
    return np.asarray(out) / np.sqrt(1.0 + float(sigma_next) ** 2)


def _inputs(seed=0, n=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D)), rng.integers(0, 2, n)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


K = len(KEPT)


@pytest.mark.parametrize("mode", ["mean", "score"])
@pytest.mark.parametrize("i", range(K))
def test_shift_matches_adm(mode, i):
    """Every step of the chain, the last (t = 0) included: new mean and the shift itself."""
    x_vp, y = _inputs(i)
    t = K - 1 - i
    want, _ = _adm_step(x_vp, t, y, 3.0, mode)
    got = _diffjax_mean(x_vp, i, y, 3.0, mode)
    base, _ = _adm_step(x_vp, t, y, 0.0, mode)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    shift = want - base
    if mode == "score" or t > 0:  # ADM's fixed_small Sigma_0 = 0: no mean shift at t = 0
        assert np.abs(shift).max() > 1e-5
    np.testing.assert_allclose(got - _diffjax_mean(x_vp, i, y, 0.0, mode), shift,
                               rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("variance", ["fixed_large", "learned"])
@pytest.mark.parametrize("i", [K - 2, K - 1])
def test_mean_shift_variance_as_adm(variance, i):
    """Sigma of condition_mean, including ADM's t = 0 entries (fixed_large's first entry is
    posterior_variance[1]; learned's log beta_tilde is clipped to its t = 1 value)."""
    x_vp, y = _inputs(10 + i)
    t = K - 1 - i
    frac = 0.3
    want, _ = _adm_step(x_vp, t, y, 5.0, "mean", variance, frac)
    base, _ = _adm_step(x_vp, t, y, 0.0, "mean", variance, frac)
    got = _diffjax_mean(x_vp, i, y, 5.0, "mean", variance, frac)
    assert np.abs(want - base).max() > 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_mean_and_score_differ_by_adm_factor():
    """shift_mean / shift_score = Sigma_t sqrt(alpha_t) / beta_t, per step (issue 11)."""
    tb = _adm_tables()
    x_vp, y = _inputs(3)
    for i in range(K - 1):
        t = K - 1 - i
        mean = _diffjax_mean(x_vp, i, y, 2.0, "mean") - _diffjax_mean(x_vp, i, y, 0.0, "mean")
        score = _diffjax_mean(x_vp, i, y, 2.0, "score") - _diffjax_mean(x_vp, i, y, 0.0, "score")
        factor = tb["post_var"][t] * np.sqrt(1.0 - tb["betas"][t]) / tb["betas"][t]
        np.testing.assert_allclose(mean, factor * score, rtol=1e-10)


def test_ddpm_sampler_runs_the_mean_shift():
    """samplers.ddpm(mean_shift=) is the scan of ddpm_step with the sampler's own noise."""
    x_vp, y = _inputs(5, 4)
    key = jax.random.PRNGKey(1)
    shift = G.classifier_mean_shift(_log_prob, 2.0)
    sig = jnp.asarray(SIGMAS)
    x = jnp.asarray(x_vp) * sig[0]
    got = S.ddpm(_denoise, x, sig, key, cond=jnp.asarray(y), mean_shift=shift)
    want = x
    for i in range(K):
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        want = S.ddpm_step(_denoise, want, sig[i], sig[i + 1], sig[max(i - 1, 0)], noise,
                           cond=jnp.asarray(y), mean_shift=shift)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
    plain = S.ddpm(_denoise, x, sig, key, cond=jnp.asarray(y))
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3


# ----------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("sampler, mode, want", [
    ("ddpm", "auto", "mean"), ("ddim", "auto", "score"), ("heun", "auto", "score"),
    ("dpmpp_2m", "auto", "score"), ("ddpm", "score", "score"), ("ddpm", "mean", "mean"),
])
def test_auto_is_adm_choice(sampler, mode, want):
    c = configlib.base_config()
    c.sampler.name = sampler
    c.guidance.classifier_mode = mode
    assert experiment._classifier_mode(c) == want


@pytest.mark.parametrize("sampler, repaint", [("ddim", 1), ("euler", 1), ("ddpm", 3)])
def test_mean_mode_needs_the_ancestral_sampler(sampler, repaint):
    c = configlib.base_config()
    c.sampler.name = sampler
    c.condition.type = "inpaint"
    c.condition.repaint_resample = repaint
    c.guidance.classifier_mode = "mean"
    with pytest.raises(ConfigError, match="classifier_mode"):
        experiment._classifier_mode(c)
    c.guidance.classifier_mode = "auto"
    assert experiment._classifier_mode(c) == "score"


def test_unknown_mode_lists_the_choices():
    c = configlib.base_config()
    c.guidance.classifier_mode = "sum"
    with pytest.raises(ConfigError, match="mean"):
        configlib.validate(c)


class _Classifier:
    """Stands in for a ClassifierTask: log_prob(params, x, sigma, y)."""

    @staticmethod
    def log_prob(params, x, sigma, y):
        return params * _log_prob(x, sigma, y)


def _sampling(mode):
    spec = generate.GuidanceSpec(name="classifier", fn=G.classifier_guidance, static={},
                                 knobs={"scale": 2.0}, classifier=_Classifier(), mode=mode)
    return generate.Sampling(
        sampler=None, guidance=spec,
        threshold=generate.ThresholdSpec(name="none", fn=G.no_guidance, knobs={}),
        condition=generate.FromNoise(), condition_type="none", condition_input="",
        with_variance=False, batch_size=4, num_samples=4, seed=0)


def test_mean_mode_moves_guidance_from_the_denoiser_to_the_sampler():
    x_vp, y = _inputs(7, 4)
    x, sigma, y = jnp.asarray(x_vp), jnp.full((4,), 0.8), jnp.asarray(y)
    knobs = {"guidance": {"scale": jnp.asarray(3.0)}, "threshold": {}}
    params = jnp.asarray(1.0)
    mean = _sampling("mean")
    assert generate.guided_denoiser(mean, _denoise, knobs, params) is _denoise
    extra = generate.sampler_guidance(mean, knobs, params)
    want = G.classifier_mean_shift(_log_prob, 3.0)(x, sigma, y)
    np.testing.assert_array_equal(np.asarray(extra["mean_shift"](x, sigma, y)), np.asarray(want))

    score = _sampling("score")
    assert generate.sampler_guidance(score, knobs, params) == {}
    guided = generate.guided_denoiser(score, _denoise, knobs, params)
    want = G.classifier_guidance(_denoise, _log_prob, 3.0)(x, sigma, y)
    np.testing.assert_array_equal(np.asarray(guided(x, sigma, y)), np.asarray(want))
